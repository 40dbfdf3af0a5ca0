/* The exact engine's hot loops in C: attention over the int8 key/value cache for decoding steps, and the
 * per-row quantisation and byte split before every matrix product.
 *
 * Built on first use by llmpipe/engine/native.py (cc -O3 -march=native -fopenmp
 * -ffp-contract=off) and called through ctypes. Each function computes exactly what
 * its torch counterpart computes: integer sums with bounds that keep them inside
 * int32 (stated at each function), or the same single IEEE float32 operations in
 * the same order, so results are identical on any machine and thread count.
 * Why: at ~640 positions of context a 64-row decoding step reads the whole cache
 * (int8 keys and values are a quarter of float32 ones), and the elementwise passes
 * torch makes over small activations cost more in dispatch than in arithmetic.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_MIN (1 << 18) /* elements below which the elementwise loops run on one thread (waking
                                * a second one costs more than a decoding step's row of a few thousand) */

#define MAX_HEAD_DIM 512 /* the scores bound below allows head_dim <= 518 */

/* integer_ops.quantize_rows for float32 (rows, cols): amax = max |x| per row (NaN if any is NaN),
 * inverse = qmax / amax (0 for an all-zero row), q = clamp(round_half_even(x * inverse), -qmax, qmax).
 * (A NaN amax here keeps its payload where torch's may differ; no finite input gives one.) */
void quantize_rows(const float *x, float *q, float *amax_out, int64_t rows, int64_t cols, float qmax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *qr = q + r * cols;
        /* max |x| on the bit patterns: for non-negative floats they order as unsigned integers, and an
         * integer max vectorises; any NaN pattern is above infinity's, so the result is NaN as in torch */
        const uint32_t *bits = (const uint32_t *)xr;
        uint32_t top = 0;
        for (int64_t c = 0; c < cols; c++) {
            const uint32_t magnitude = bits[c] & 0x7fffffffu;
            top = magnitude > top ? magnitude : top;
        }
        float amax;
        memcpy(&amax, &top, sizeof amax);
        const float inverse = amax > 0.0f ? qmax / amax : 0.0f;
        for (int64_t c = 0; c < cols; c++) {
            const float v = nearbyintf(xr[c] * inverse);
            qr[c] = v < -qmax ? -qmax : (v > qmax ? qmax : v);
        }
        amax_out[r] = amax;
    }
}

/* integer_ops.split_bytes for integer-valued float32 q in [-32639, 32639], (rows, cols) ->
 * int8 (2 rows, cols): q = 256 high + low, low in [-128, 127]; high rows first. */
void split_bytes(const float *q, int8_t *out, int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *qr = q + r * cols;
        int8_t *high = out + r * cols;
        int8_t *low = out + (rows + r) * cols;
        for (int64_t c = 0; c < cols; c++) {
            const int32_t v = (int32_t)qr[c];
            const int32_t h = (v + 128) >> 8; /* arithmetic shift: floor division by 256 */
            high[c] = (int8_t)h;
            low[c] = (int8_t)(v - h * 256);
        }
    }
}

/* The last `queries` positions of attention, scores to output, for rows n = (batch row, key/value head),
 * each with `group` query heads: exact_transformer._attention's steps in one pass over the cache, for
 * decoding steps and short passes. Query i of a row sees the first visible_i = length - queries + 1 + i
 * cached positions (the torch path masks the rest to weight 0, which is the same sums).
 * q: (rows, group, queries, hd) int16; qscale: (rows, group, queries) float32, the query scales times the
 * score factor; keys/values: int8, position s of row n at n * kv_stride + s * hd; key_scales/value_scales:
 * float32, at n * scale_stride + s; exp: the attention exp table (table_len entries, the last 0);
 * scratch: (rows, group * queries, length) float32; out: (rows, group, queries, hd) float32.
 * Per query, the same operations in the same order as the torch path:
 *   score_s = (float(dot(q, key_s)) * qscale) * key_scale_s    (|dot| < 2^31 for hd <= 518)
 *   e_s = exp[min(rint(max_s score - score_s), table_len - 1)]
 *   common = max of value_scale over the visible positions
 *   factor = float(2^15 / (double(sum_s e_s) * common))      (the sum: integers, exact in any order)
 *   w_s = rint((e_s * value_scale_s) * factor)                (sum_s w_s <= 2^15 + visible / 2)
 *   out = float(sum_s w_s * value_s) * (common * 2^-15)      (|sum| <= 127 (2^15 + visible / 2) < 2^31) */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VECTOR_ATTENTION 1 /* hd a multiple of 32: 16 positions at a time in 512-bit registers */

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

static inline __attribute__((always_inline)) void query_scores(const int16_t *q, float qscale, const int8_t *keys,
                                                              const float *key_scales, float *scores, int64_t hd,
                                                              int64_t visible) {
    int64_t s = 0;
#ifdef VECTOR_ATTENTION
    if (hd % 32 == 0) {
        const __m512 scale = _mm512_set1_ps(qscale);
        for (; s + 16 <= visible; s += 16) {
            __m512i dots[16];
            for (int j = 0; j < 16; j++) {
                const int8_t *key = keys + (s + j) * hd;
                __m512i sums = _mm512_setzero_si512();
                for (int64_t d = 0; d < hd; d += 32) {
                    const __m512i k = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(key + d)));
                    sums = multiply_add_pairs(sums, _mm512_loadu_si512(q + d), k);
                }
                dots[j] = sums;
            }
            const __m512 products = _mm512_mul_ps(_mm512_cvtepi32_ps(sum_lanes16(dots)), scale);
            _mm512_storeu_ps(scores + s, _mm512_mul_ps(products, _mm512_loadu_ps(key_scales + s)));
        }
    }
#endif
    for (; s < visible; s++) {
        const int8_t *key = keys + s * hd;
        int32_t acc = 0;
        for (int64_t d = 0; d < hd; d++) acc += q[d] * (int16_t)key[d];
        scores[s] = ((float)acc * qscale) * key_scales[s];
    }
}

static void query_weights(float *scores, const float *value_scales, float common, const float *exp,
                          int64_t table_len, int64_t visible) {
    float top = scores[0];
    int64_t s = 0;
#ifdef VECTOR_ATTENTION
    __m512 tops = _mm512_set1_ps(top);
    for (; s + 16 <= visible; s += 16) tops = _mm512_max_ps(tops, _mm512_loadu_ps(scores + s));
    top = _mm512_reduce_max_ps(tops); /* a maximum: the same in any order */
#endif
    for (; s < visible; s++) top = scores[s] > top ? scores[s] : top;
    const float last = (float)(table_len - 1);
    double denominator = 0.0; /* integers below 2^15 each: exact in any order */
    s = 0;
#ifdef VECTOR_ATTENTION
    const __m512 top16 = _mm512_set1_ps(top), last16 = _mm512_set1_ps(last);
    __m512d sums = _mm512_setzero_pd();
    for (; s + 16 <= visible; s += 16) {
        const __m512 distance = _mm512_sub_ps(top16, _mm512_loadu_ps(scores + s));
        const __m512 step = _mm512_roundscale_ps(distance, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i index = _mm512_cvttps_epi32(_mm512_min_ps(step, last16));
        const __m512 e = _mm512_i32gather_ps(index, exp, 4);
        _mm512_storeu_ps(scores + s, e);
        sums = _mm512_add_pd(sums, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        sums = _mm512_add_pd(sums, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
    }
    denominator = _mm512_reduce_add_pd(sums);
#endif
    for (; s < visible; s++) {
        float step = nearbyintf(top - scores[s]);
        step = step > last ? last : step;
        scores[s] = exp[(int64_t)step];
        denominator += scores[s];
    }
    const float factor = (float)(32768.0 / (denominator * (double)common));
    int32_t *weights = (int32_t *)scores; /* each e_s is read before its weight replaces it */
    s = 0;
#ifdef VECTOR_ATTENTION
    const __m512 factor16 = _mm512_set1_ps(factor);
    for (; s + 16 <= visible; s += 16) {
        const __m512 w = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(scores + s), _mm512_loadu_ps(value_scales + s)),
                                       factor16);
        _mm512_storeu_si512(weights + s, _mm512_cvt_roundps_epi32(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    for (; s < visible; s++) weights[s] = (int32_t)nearbyintf((scores[s] * value_scales[s]) * factor);
}

static inline __attribute__((always_inline)) void query_mix(const int32_t *weights, const int8_t *values, float unit,
                                                           float *out, int64_t hd, int64_t visible) {
#ifdef VECTOR_ATTENTION
    if (hd % 16 == 0 && hd <= 128) { /* at most eight registers of sums */
        __m512i sums[8];
        const int64_t parts = hd / 16;
        for (int64_t p = 0; p < parts; p++) sums[p] = _mm512_setzero_si512();
        for (int64_t s = 0; s < visible; s++) {
            if (weights[s] == 0) continue; /* weights round to 0 far from the attended positions */
            const __m512i w = _mm512_set1_epi32(weights[s]);
            const int8_t *v = values + s * hd;
            for (int64_t p = 0; p < parts; p++) {
                const __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(v + 16 * p)));
                sums[p] = _mm512_add_epi32(sums[p], _mm512_mullo_epi32(w, wide));
            }
        }
        const __m512 unit16 = _mm512_set1_ps(unit);
        for (int64_t p = 0; p < parts; p++) _mm512_storeu_ps(out + 16 * p, _mm512_mul_ps(_mm512_cvtepi32_ps(sums[p]), unit16));
        return;
    }
#endif
    int32_t acc[MAX_HEAD_DIM] = {0};
    for (int64_t s = 0; s < visible; s++) {
        const int32_t w = weights[s];
        if (w == 0) continue; /* weights round to 0 far from the attended positions */
        const int8_t *v = values + s * hd;
        for (int64_t d = 0; d < hd; d++) acc[d] += w * (int32_t)v[d];
    }
    for (int64_t d = 0; d < hd; d++) out[d] = (float)acc[d] * unit;
}

/* One query's attention (above); inlined with hd a constant for the common head sizes, which lets the
 * compiler keep a head's sums in vector registers. */
static inline __attribute__((always_inline)) void query_attention(
    const int16_t *q, float qscale, const int8_t *keys, const int8_t *values, const float *key_scales,
    const float *value_scales, float common, const float *exp, int64_t table_len, float *scratch, float *out,
    int64_t hd, int64_t visible) {
    query_scores(q, qscale, keys, key_scales, scratch, hd, visible);
    query_weights(scratch, value_scales, common, exp, table_len, visible);
    query_mix((const int32_t *)scratch, values, common * (1.0f / 32768.0f), out, hd, visible);
}

void attention(const int16_t *q, const float *qscale, const int8_t *keys, const int8_t *values,
               const float *key_scales, const float *value_scales, const float *exp, int64_t table_len,
               float *scratch, float *out, int64_t rows, int64_t group, int64_t queries, int64_t hd,
               int64_t length, int64_t kv_stride, int64_t scale_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t n = 0; n < rows; n++) {
        for (int64_t g = 0; g < group; g++) {
            const float *ks = key_scales + n * scale_stride;
            const float *vs = value_scales + n * scale_stride;
            const int8_t *kn = keys + n * kv_stride, *vn = values + n * kv_stride;
            const int64_t first = length - queries + 1; /* what query 0 sees */
            float common = vs[0];
            for (int64_t s = 1; s < first; s++) common = vs[s] > common ? vs[s] : common;
            for (int64_t i = 0; i < queries; i++) {
                const int64_t visible = first + i, at = (n * group + g) * queries + i;
                common = vs[visible - 1] > common ? vs[visible - 1] : common;
                float *scores = scratch + at * length;
                const int16_t *qi = q + at * hd;
                float *oi = out + at * hd;
                if (hd == 64)
                    query_attention(qi, qscale[at], kn, vn, ks, vs, common, exp, table_len, scores, oi, 64, visible);
                else if (hd == 128)
                    query_attention(qi, qscale[at], kn, vn, ks, vs, common, exp, table_len, scores, oi, 128, visible);
                else
                    query_attention(qi, qscale[at], kn, vn, ks, vs, common, exp, table_len, scores, oi, hd, visible);
            }
        }
    }
}

/* exact_transformer.ExactWeight's output from int16_int8_matmul's two products, parts = (2 rows, cols)
 * int32, the high-byte products first: out = (((float)high * 256 + (float)low) * row_scale) * scale
 * (+ bias), the torch path's float32 operations in its order (bias may be NULL). */
void combine_products(const int32_t *parts, const float *row_scale, const float *scale, const float *bias,
                      float *out, int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *high = parts + r * cols, *low = parts + (rows + r) * cols;
        float *o = out + r * cols;
        const float rs = row_scale[r];
        for (int64_t c = 0; c < cols; c++) o[c] = (((float)high[c] * 256.0f + (float)low[c]) * rs) * scale[c];
        if (bias != NULL)
            for (int64_t c = 0; c < cols; c++) o[c] += bias[c];
    }
}

/* exact_transformer._activation (times `up` for gated MLPs; up may be NULL): x (rows, cols) at row
 * stride `stride`, up likewise; step = rint(x * grid); step >= limit: x; step <= -limit: 0; else
 * table[step + limit]; out (rows, cols) contiguous. */
void activation(const float *x, const float *up, int64_t stride, float grid, const float *table, int64_t limit,
                float *out, int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * stride;
        float *o = out + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            const float step = nearbyintf(xr[c] * grid);
            const float value = step >= (float)limit ? xr[c] : (step <= (float)-limit ? 0.0f : table[(int64_t)step + limit]);
            o[c] = up != NULL ? value * up[r * stride + c] : value;
        }
    }
}

/* coder.frequencies.frequency_tables: logits (rows, vocab) float32 -> freq (rows, width) float64
 * integers, width - vocab escape symbols of frequency 1: step = min(rint((max - logit) * grid),
 * table_len - 1); e = exp[step]; total = sum e (integers below 2^53: exact in any order);
 * freq = 1 + floor(e * (budget / total)). */
void frequency_tables(const float *logits, float grid, const double *exp, int64_t table_len, double budget,
                      double *freq, int64_t rows, int64_t vocab, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *l = logits + r * vocab;
        double *f = freq + r * width;
        float top = l[0];
        for (int64_t v = 1; v < vocab; v++) top = l[v] > top ? l[v] : top;
        const float last = (float)(table_len - 1);
        double total = 0.0;
        for (int64_t v = 0; v < vocab; v++) {
            float step = nearbyintf((top - l[v]) * grid);
            step = step > last ? last : step;
            f[v] = exp[(int64_t)step];
            total += f[v];
        }
        const double share = budget / total;
        for (int64_t v = 0; v < vocab; v++) f[v] = 1.0 + floor(f[v] * share);
        for (int64_t v = vocab; v < width; v++) f[v] = 1.0;
    }
}
