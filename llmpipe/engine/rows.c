/* The exact engine's elementwise kernels: per-row quantisation and the byte split before every matrix
 * product, the products' output scaling, activations, norms and the queries', keys' and values'
 * preparation for attention (llmpipe/engine/exact_transformer.py has the torch path of each).
 *
 * Built with products.c and attention.c into one library by llmpipe/engine/kernels.py (cc -O3
 * -march=native -fopenmp -ffp-contract=off) and called through ctypes. Each function computes exactly
 * what its torch counterpart computes: the same single IEEE float32 operations in the same order, or integer sums with
 * the bounds stated at each, so results are identical on any machine and thread count. Why: the
 * elementwise passes torch makes over small activations cost more in dispatch than in arithmetic.
 */
#include "kernels.h"

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
