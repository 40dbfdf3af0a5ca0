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

/* max |x| over n floats, on the bit patterns: for non-negative floats they order as unsigned integers,
 * and an integer max vectorises; any NaN pattern is above infinity's, so the result is NaN as in torch */
static inline float max_magnitude(const float *x, int64_t n) {
    const uint32_t *bits = (const uint32_t *)x;
    uint32_t top = 0;
    for (int64_t c = 0; c < n; c++) {
        const uint32_t magnitude = bits[c] & 0x7fffffffu;
        top = magnitude > top ? magnitude : top;
    }
    float amax;
    memcpy(&amax, &top, sizeof amax);
    return amax;
}

/* One row of quantize_rows (below) into float32 q; returns amax. */
static inline float quantize_row(const float *x, float *q, int64_t n, float qmax) {
    const float amax = max_magnitude(x, n);
    const float inverse = amax > 0.0f ? qmax / amax : 0.0f;
    for (int64_t c = 0; c < n; c++) {
        const float v = nearbyintf(x[c] * inverse);
        q[c] = v < -qmax ? -qmax : (v > qmax ? qmax : v);
    }
    return amax;
}

/* integer_ops.quantize_rows for float32 (rows, cols): amax = max |x| per row (NaN if any is NaN),
 * inverse = qmax / amax (0 for an all-zero row), q = clamp(round_half_even(x * inverse), -qmax, qmax).
 * (A NaN amax here keeps its payload where torch's may differ; no finite input gives one.) */
void quantize_rows(const float *x, float *q, float *amax_out, int64_t rows, int64_t cols, float qmax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        amax_out[r] = quantize_row(x + r * cols, q + r * cols, cols, qmax);
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

/* The largest of n > 0 floats (none NaN): a maximum, the same in any order. */
static inline float row_max(const float *x, int64_t n) {
    float top = x[0];
    int64_t i = 0;
#ifdef VECTOR_512
    __m512 tops = _mm512_set1_ps(top);
    for (; i + 16 <= n; i += 16) tops = _mm512_max_ps(tops, _mm512_loadu_ps(x + i));
    top = _mm512_reduce_max_ps(tops);
#endif
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    return top;
}

/* The scores of `group` query heads (at most MAX_SHARED_GROUP) that share one key/value head:
 * scores_g[s] = ((float)(q_g . key_s) * qscale_g) * key_scale_s, the dot product an exact integer sum.
 * With AVX-512 and hd a multiple of 32, 16 positions at a time, each key widened to int16 once for
 * all the heads. */
#define MAX_SHARED_GROUP 4
static inline __attribute__((always_inline)) void group_scores(const int16_t *const *q, const float *qscale,
                                                              const int8_t *keys, const float *key_scales,
                                                              float *const *scores, int64_t group, int64_t hd,
                                                              int64_t visible) {
    int64_t s = 0;
#ifdef VECTOR_512
    if (hd % 32 == 0) {
        for (; s + 16 <= visible; s += 16) {
            __m512i dots[MAX_SHARED_GROUP][16];
            for (int j = 0; j < 16; j++) {
                const int8_t *key = keys + (s + j) * hd;
                for (int64_t g = 0; g < group; g++) dots[g][j] = _mm512_setzero_si512();
                for (int64_t d = 0; d < hd; d += 32) {
                    const __m512i k = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(key + d)));
                    for (int64_t g = 0; g < group; g++)
                        dots[g][j] = multiply_add_pairs(dots[g][j], _mm512_loadu_si512(q[g] + d), k);
                }
            }
            const __m512 key_scale = _mm512_loadu_ps(key_scales + s);
            for (int64_t g = 0; g < group; g++) {
                const __m512 products = _mm512_mul_ps(_mm512_cvtepi32_ps(sum_lanes16(dots[g])), _mm512_set1_ps(qscale[g]));
                _mm512_storeu_ps(scores[g] + s, _mm512_mul_ps(products, key_scale));
            }
        }
    }
#endif
    for (int64_t g = 0; g < group; g++)
        for (int64_t t = s; t < visible; t++) {
            const int8_t *key = keys + t * hd;
            int32_t acc = 0;
            for (int64_t d = 0; d < hd; d++) acc += q[g][d] * (int16_t)key[d];
            scores[g][t] = ((float)acc * qscale[g]) * key_scales[t];
        }
}

static void query_weights(float *scores, const float *value_scales, float common, const float *exp,
                          int64_t table_len, int64_t visible) {
    const float top = row_max(scores, visible);
    const float last = (float)(table_len - 1);
    double denominator = 0.0; /* integers below 2^15 each: exact in any order */
    int64_t s = 0;
#ifdef VECTOR_512
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
#ifdef VECTOR_512
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
#ifdef VECTOR_512
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

/* The attention (above) of the query heads that share one key/value head, at one position; inlined
 * with hd a constant for the common head sizes, which lets the compiler keep a head's sums in vector
 * registers. */
static inline __attribute__((always_inline)) void heads_attention(
    const int16_t *const *q, const float *qscale, float *const *scratch, float *const *out, int64_t group,
    const int8_t *keys, const int8_t *values, const float *key_scales, const float *value_scales, float common,
    const float *exp, int64_t table_len, int64_t hd, int64_t visible) {
    group_scores(q, qscale, keys, key_scales, scratch, group, hd, visible);
    for (int64_t g = 0; g < group; g++) {
        query_weights(scratch[g], value_scales, common, exp, table_len, visible);
        query_mix((const int32_t *)scratch[g], values, common * (1.0f / 32768.0f), out[g], hd, visible);
    }
}

void attention(const int16_t *q, const float *qscale, const int8_t *keys, const int8_t *values,
               const float *key_scales, const float *value_scales, const float *exp, int64_t table_len,
               float *scratch, float *out, int64_t rows, int64_t group, int64_t queries, int64_t hd,
               int64_t length, int64_t kv_stride, int64_t scale_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < rows; n++) {
        const float *ks = key_scales + n * scale_stride;
        const float *vs = value_scales + n * scale_stride;
        const int8_t *kn = keys + n * kv_stride, *vn = values + n * kv_stride;
        const int64_t first = length - queries + 1; /* what query 0 sees */
        float common = vs[0];
        for (int64_t s = 1; s < first; s++) common = vs[s] > common ? vs[s] : common;
        for (int64_t i = 0; i < queries; i++) {
            const int64_t visible = first + i;
            common = vs[visible - 1] > common ? vs[visible - 1] : common;
            for (int64_t g0 = 0; g0 < group; g0 += MAX_SHARED_GROUP) { /* the heads, a few at a time */
                const int64_t count = group - g0 < MAX_SHARED_GROUP ? group - g0 : MAX_SHARED_GROUP;
                const int16_t *heads[MAX_SHARED_GROUP];
                float scales[MAX_SHARED_GROUP], *scores[MAX_SHARED_GROUP], *outs[MAX_SHARED_GROUP];
                for (int64_t g = 0; g < count; g++) {
                    const int64_t at = (n * group + g0 + g) * queries + i;
                    heads[g] = q + at * hd;
                    scales[g] = qscale[at];
                    scores[g] = scratch + at * length;
                    outs[g] = out + at * hd;
                }
                if (hd == 64)
                    heads_attention(heads, scales, scores, outs, count, kn, vn, ks, vs, common, exp, table_len, 64, visible);
                else if (hd == 128)
                    heads_attention(heads, scales, scores, outs, count, kn, vn, ks, vs, common, exp, table_len, 128, visible);
                else
                    heads_attention(heads, scales, scores, outs, count, kn, vn, ks, vs, common, exp, table_len, hd, visible);
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
        const float top = row_max(l, vocab);
        const float last = (float)(table_len - 1);
        double total = 0.0; /* integers below 2^53: exact in any order */
        int64_t v = 0;
#ifdef VECTOR_512
        const __m512 top16 = _mm512_set1_ps(top), grid16 = _mm512_set1_ps(grid), last16 = _mm512_set1_ps(last);
        __m512d sums = _mm512_setzero_pd();
        for (; v + 16 <= vocab; v += 16) {
            const __m512 scaled = _mm512_mul_ps(_mm512_sub_ps(top16, _mm512_loadu_ps(l + v)), grid16);
            const __m512 step = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i index = _mm512_cvttps_epi32(_mm512_min_ps(step, last16));
            const __m512d low = _mm512_i32gather_pd(_mm512_castsi512_si256(index), exp, 8);
            const __m512d high = _mm512_i32gather_pd(_mm512_extracti64x4_epi64(index, 1), exp, 8);
            _mm512_storeu_pd(f + v, low);
            _mm512_storeu_pd(f + v + 8, high);
            sums = _mm512_add_pd(sums, _mm512_add_pd(low, high));
        }
        total = _mm512_reduce_add_pd(sums);
#endif
        for (; v < vocab; v++) {
            float step = nearbyintf((top - l[v]) * grid);
            step = step > last ? last : step;
            f[v] = exp[(int64_t)step];
            total += f[v];
        }
        const double share = budget / total;
        v = 0;
#ifdef VECTOR_512
        const __m512d share8 = _mm512_set1_pd(share), one8 = _mm512_set1_pd(1.0);
        for (; v + 8 <= vocab; v += 8) {
            const __m512d product = _mm512_mul_pd(_mm512_loadu_pd(f + v), share8);
            _mm512_storeu_pd(f + v, _mm512_add_pd(one8, _mm512_roundscale_pd(product, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)));
        }
#endif
        for (; v < vocab; v++) f[v] = 1.0 + floor(f[v] * share);
        for (v = vocab; v < width; v++) f[v] = 1.0;
    }
}

/* exact_transformer._rms_norm_quantize: q and amax as quantize_rows (qmax = ACT_MAX), then with
 * scale = amax * (float)(1 / qmax) and the exact integer sum of squares S (below C 2^30 < 2^53):
 * row_scale = (float)((double)scale / sqrt(((S * scale) * scale) * (1 / C) + eps)), as float64
 * operations in the torch path's order (its reciprocal of the root is the same one division). */
void rms_norm_quantize(const float *x, float *q, float *row_scale, int64_t rows, int64_t cols, float qmax, double eps,
                       int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        float *qr = q + r * cols;
        const float amax = quantize_row(x + r * cols, qr, cols, qmax);
        double squares = 0.0;
        for (int64_t c = 0; c < cols; c++) squares += (double)qr[c] * (double)qr[c];
        const double scale = (double)(amax * (float)(1.0 / qmax));
        const double mean_square = squares * scale * scale * (1.0 / (double)cols) + eps;
        row_scale[r] = (float)(scale * (1.0 / sqrt(mean_square)));
    }
}

/* Rotate one head (exact_transformer._rope): for d < rotary, x_d cos_d + r_d sin_d with r the first
 * half's negated second half then the first half; dims past `rotary` unchanged. */
static inline void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t hd, int64_t rotary) {
    const int64_t half = rotary / 2;
    for (int64_t d = 0; d < rotary; d++) {
        const float turned = d < half ? -x[d + half] : x[d - half];
        out[d] = x[d] * cos[d] + turned * sin[d];
    }
    for (int64_t d = rotary; d < hd; d++) out[d] = x[d];
}

/* The qkv matmul's output for a decoding step or short pass, made ready for `attention`: per token m =
 * (b, t) (rows qkv_stride apart: H query heads, then KV key heads, then KV value heads, hd each), RoPE
 * on queries and keys (`rotary` dims, cos/sin rows from position `start`, rotary 0: none), then per head
 * quantize_rows: queries to int16 (act_max) into q_out (B, KV, G, T, hd) with q_scale (B, KV, G, T) =
 * (amax * (float)(1 / act_max)) * score_factor; keys and values to int8 (kv_max) into the cache layer
 * planes (B', KV, capacity, hd) at position start + t, scales (B', KV, capacity) amax * (float)(1 / kv_max). */
void prepare_qkv(const float *qkv, int64_t qkv_stride, int64_t batch, int64_t tokens, int64_t heads, int64_t kv_heads,
                 int64_t hd, int64_t rotary, const float *cos, const float *sin, float score_factor, float act_max,
                 float kv_max, int16_t *q_out, float *q_scale, int8_t *keys, int8_t *values, float *key_scales,
                 float *value_scales, int64_t capacity, int64_t start, int threads) {
    const int64_t group = heads / kv_heads, all = heads + 2 * kv_heads;
#pragma omp parallel for num_threads(threads) schedule(static) if (batch * tokens * all * hd >= PARALLEL_MIN)
    for (int64_t m = 0; m < batch * tokens; m++) {
        const int64_t b = m / tokens, t = m % tokens;
        const float *row = qkv + m * qkv_stride;
        const float *c = cos + t * rotary, *s = sin + t * rotary;
        float turned[MAX_HEAD_DIM], quantised[MAX_HEAD_DIM];
        for (int64_t h = 0; h < all; h++) {
            const float *x = row + h * hd;
            if (h < heads + kv_heads && rotary > 0) {
                rotate(x, c, s, turned, hd, rotary);
                x = turned;
            }
            const float qmax = h < heads ? act_max : kv_max;
            const float amax = quantize_row(x, quantised, hd, qmax);
            const float scale = amax * (float)(1.0 / qmax);
            if (h < heads) {
                const int64_t at = ((b * kv_heads + h / group) * group + h % group) * tokens + t;
                for (int64_t d = 0; d < hd; d++) q_out[at * hd + d] = (int16_t)quantised[d];
                q_scale[at] = scale * score_factor;
            } else {
                const int is_key = h < heads + kv_heads;
                const int64_t j = is_key ? h - heads : h - heads - kv_heads;
                const int64_t at = (b * kv_heads + j) * capacity + start + t;
                int8_t *plane = is_key ? keys : values;
                for (int64_t d = 0; d < hd; d++) plane[at * hd + d] = (int8_t)quantised[d];
                (is_key ? key_scales : value_scales)[at] = scale;
            }
        }
    }
}

/* The decoder's symbol search (coder.frequencies.find_symbols on mixer.mix_tables' output) without
 * building the mixed tables: row i is row index[i] of the LM tables freq (., width), float64 integers;
 * its mixed frequency of symbol v is m(v) = max(1, floor(F(v) * lm_weight[i])) + the masses of row i
 * (mass_symbols[mass_start[i] .. mass_start[i + 1]), ascending, with mass_values), as mix_tables
 * computes it (lm_weight 1 and no masses: the LM table itself). Every sum is of integers below 2^53, so
 * exact in any order. mixed_totals: the rows' totals. find_mixed: for each row, the first symbol whose
 * cumulative frequency exceeds targets[i] (searchsorted, right), its start and size, and its F. */
static inline double mixed_frequency(double f, double weight) {
    const double scaled = floor(f * weight);
    return scaled < 1.0 ? 1.0 : scaled;
}

void mixed_totals(const double *freq, const int64_t *index, const double *lm_weight, const int64_t *mass_start,
                  const double *mass_values, double *totals, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const double *f = freq + index[i] * width;
        const double w = lm_weight[i];
        double sums[8] = {0.0}; /* independent chains; their sum is exact in any order */
        int64_t v = 0;
        for (; v + 8 <= width; v += 8)
            for (int k = 0; k < 8; k++) sums[k] += mixed_frequency(f[v + k], w);
        for (; v < width; v++) sums[0] += mixed_frequency(f[v], w);
        for (int64_t j = mass_start[i]; j < mass_start[i + 1]; j++) sums[1] += mass_values[j];
        double total = 0.0;
        for (int k = 0; k < 8; k++) total += sums[k];
        totals[i] = total;
    }
}

void find_mixed(const double *freq, const int64_t *index, const double *lm_weight, const int64_t *mass_start,
                const int64_t *mass_symbols, const double *mass_values, const double *targets, int64_t *symbols,
                double *starts, double *sizes, double *lm_sizes, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const double *f = freq + index[i] * width;
        const double w = lm_weight[i], target = targets[i];
        int64_t j = mass_start[i];
        double below = 0.0, m = 0.0;
        int64_t v = 0;
        for (; v < width; v++) { /* targets lie below the total (the range decoder's target): it stops */
            m = mixed_frequency(f[v], w);
            if (j < mass_start[i + 1] && mass_symbols[j] == v) m += mass_values[j++];
            if (below + m > target) break;
            below += m;
        }
        if (v == width) { /* only for a target past the total: the last symbol, as a damaged stream may ask */
            v = width - 1;
            below -= m;
        }
        symbols[i] = v;
        starts[i] = below;
        sizes[i] = m;
        lm_sizes[i] = f[v];
    }
}

/* adaptive_bias.AdaptiveBias.tables: the model tables freq (n, width) float64 integers, row k biased by
 * bias row rows[k] (int32, width per row, |B| <= limit, limit a multiple of 256) -> out (n, width):
 * P = (F - 1) * multipliers[(B + limit) >> 8] (integers below 2^53), total = sum P (exact in any order),
 * out = 1 + floor(P * (budget / total)). */
void bias_tables(const double *freq, const int64_t *rows, const int32_t *bias, const double *multipliers,
                 int32_t limit, double budget, double *out, int64_t n, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < n; k++) {
        const double *f = freq + k * width;
        const int32_t *b = bias + rows[k] * width;
        double *o = out + k * width;
        double total = 0.0;
        for (int64_t v = 0; v < width; v++) {
            o[v] = (f[v] - 1.0) * multipliers[(b[v] + limit) >> 8];
            total += o[v];
        }
        const double share = budget / total;
        for (int64_t v = 0; v < width; v++) o[v] = 1.0 + floor(o[v] * share);
    }
}

/* adaptive_bias.AdaptiveBias.learn: for each k, bias row rows[k] takes one gradient step after its biased
 * table tables[k] (float64 integers) coded symbols[k]: B -= floor(t * (rate / sum t)), B[symbol] += rate,
 * clamped to [-limit, limit]. */
void bias_learn(const double *tables, const int64_t *rows, const int64_t *symbols, int32_t *bias, int32_t rate,
                int32_t limit, int64_t n, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < n; k++) {
        const double *t = tables + k * width;
        int32_t *b = bias + rows[k] * width;
        double total = 0.0; /* integers below 2^53: exact in any order */
        for (int64_t v = 0; v < width; v++) total += t[v];
        const double ratio = (double)rate / total;
        b[symbols[k]] += rate;
        for (int64_t v = 0; v < width; v++) {
            const int32_t x = b[v] - (int32_t)floor(t[v] * ratio);
            b[v] = x < -limit ? -limit : x > limit ? limit : x;
        }
    }
}
