/* Integer attention for one decoding step, over an int8 key/value cache.
 *
 * Built on first use by llmpipe/engine/native.py (cc -O3 -march=native -fopenmp)
 * and called through ctypes. Only integer arithmetic, with bounds that keep every
 * sum inside int32 (stated at each function), so the results are the same exact
 * integers the pure-torch path computes, on any machine, with any thread count.
 * Why it exists: at ~640 positions of context a 64-row decoding step reads the
 * whole cache; int8 keys and values are a quarter of the float32 ones.
 */
#include <stdint.h>

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
