/* The exact engine's hot loops in C: integer attention over an int8 key/value cache, and the
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

/* out[n][g][s] = sum_d q[n][g][d] * keys[n * key_stride + s * hd + d]
 * q: (rows, group, hd) int16, |q| <= 32639; keys: int8, |k| <= 127.
 * |sum| <= 32639 * 127 * hd < 2^31 for hd <= 518. */
void attention_scores(const int16_t *q, const int8_t *keys, int32_t *out, int64_t rows, int64_t group,
                      int64_t hd, int64_t length, int64_t key_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < rows; n++) {
        const int16_t *qn = q + n * group * hd;
        const int8_t *kn = keys + n * key_stride;
        int32_t *on = out + n * group * length;
        int16_t k[MAX_HEAD_DIM];  /* the key widened first: int16 x int16 sums compile to multiply-add pairs */
        for (int64_t s = 0; s < length; s++) {
            const int8_t *key = kn + s * hd;
            for (int64_t d = 0; d < hd; d++) k[d] = key[d];
            for (int64_t g = 0; g < group; g++) {
                const int16_t *qg = qn + g * hd;
                int32_t acc = 0;
                for (int64_t d = 0; d < hd; d++) acc += qg[d] * k[d];
                on[g * length + s] = acc;
            }
        }
    }
}

/* out[n][g][d] = sum_s weights[n][g][s] * values[n * value_stride + s * hd + d]
 * weights: (rows, group, length) int32, each row summing to at most 2^15 + length / 2
 * (exact_transformer's requantised attention weights); values: int8, |v| <= 127.
 * |sum| <= 127 * (2^15 + length / 2) < 2^31 for length < 2^24. */
void attention_mix(const int32_t *weights, const int8_t *values, int32_t *out, int64_t rows, int64_t group,
                   int64_t hd, int64_t length, int64_t value_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < rows; n++) {
        const int32_t *wn = weights + n * group * length;
        const int8_t *vn = values + n * value_stride;
        int32_t *on = out + n * group * hd;
        for (int64_t i = 0; i < group * hd; i++) on[i] = 0;
        for (int64_t s = 0; s < length; s++) {
            const int8_t *v = vn + s * hd;
            for (int64_t g = 0; g < group; g++) {
                const int32_t w = wn[g * length + s];
                if (w == 0) continue; /* weights round to 0 far from the attended positions */
                int32_t *og = on + g * hd;
                for (int64_t d = 0; d < hd; d++) og[d] += w * (int32_t)v[d];
            }
        }
    }
}

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
