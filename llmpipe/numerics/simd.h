/* What every compiled kernel of llmpipe shares: the headers, when a loop is worth a second thread, and
 * the vector forms this CPU has (AVX-512, else AVX2, else plain C; -march=native decides).
 *
 * Included by the engine's kernels (the .c files in llmpipe/engine) and the codec's (llmpipe/codec/kernels.c),
 * which llmpipe/numerics/native.py compiles into one library per owner. Every helper here computes an
 * order-independent result (integer sums, maxima), so the vector and plain forms agree bit for bit.
 */
#ifndef LLMPIPE_SIMD_H
#define LLMPIPE_SIMD_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define PARALLEL_MIN (1 << 18) /* elements below which the elementwise loops run on one thread (waking
                                * a second one costs more than a decoding step's row of a few thousand) */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VECTOR_512 1 /* loops below also have 512-bit forms (attention: for hd a multiple of 32) */

static inline __m512i multiply_add_pairs(__m512i sums, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(sums, a, b);
#else
    return _mm512_add_epi32(sums, _mm512_madd_epi16(a, b));
#endif
}

/* r[j] = the sum of v[j]'s sixteen lanes, for j < 16 (integer sums: any order is exact) */
static inline __m512i sum_lanes16(const __m512i v[16]) {
    __m512i pairs[8], quads[4];
    for (int i = 0; i < 8; i++)
        pairs[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                    _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        quads[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * i], pairs[2 * i + 1]),
                                    _mm512_unpackhi_epi64(pairs[2 * i], pairs[2 * i + 1]));
    /* quads[i], 128-bit lane l, element j: lane l's part of v[4i + j]; now add the four lanes */
    const __m512i a = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[0], quads[1], 0x88),
                                       _mm512_shuffle_i32x4(quads[0], quads[1], 0xdd));
    const __m512i b = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[2], quads[3], 0x88),
                                       _mm512_shuffle_i32x4(quads[2], quads[3], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xdd));
}
#endif

#if !defined(VECTOR_512) && defined(__AVX2__)
#define VECTOR_256 1 /* 256-bit forms of the attention loops, for CPUs with AVX2 but not AVX-512 */

/* r[j] = the sum of v[j]'s eight lanes, for j < 8 (integer sums: any order is exact) */
static inline __m256i sum_lanes8(const __m256i v[8]) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}
#endif

/* The largest of n > 0 floats (none NaN): a maximum, the same in any order. */
static inline float row_max(const float *x, int64_t n) {
    float top = x[0];
    int64_t i = 0;
#ifdef VECTOR_512
    __m512 tops = _mm512_set1_ps(top);
    for (; i + 16 <= n; i += 16) tops = _mm512_max_ps(tops, _mm512_loadu_ps(x + i));
    top = _mm512_reduce_max_ps(tops);
#elif defined(VECTOR_256)
    __m256 tops = _mm256_set1_ps(top);
    for (; i + 8 <= n; i += 8) tops = _mm256_max_ps(tops, _mm256_loadu_ps(x + i));
    float lanes[8];
    _mm256_storeu_ps(lanes, tops);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
#endif
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    return top;
}

#endif /* LLMPIPE_SIMD_H */
