/* A decoding step's layers in one call: the Llama layer (RMSNorm, RoPE, grouped-query attention over the
 * int8 cache, gated MLP, sequential residual) of exact_transformer._hidden, for one new position of each
 * row, made of the same kernels in the same order (products.c, attention.c, rows.c), so the same bits.
 *
 * Why: a decoding step of one or a few rows (a small input, the tail of a group) spends a third of its
 * time between the kernels (about 13 calls a layer through ctypes, their tensors, the Python around them).
 */
#include "kernels.h"
#include <omp.h>

enum { LAYER_QKV, LAYER_O, LAYER_GATE_UP, LAYER_DOWN, LAYER_MATRICES };
enum { SPENT_PRODUCTS, SPENT_ATTENTION, SPENT_ELEMENTWISE }; /* the parts of `seconds` (bench.py throughput) */

/* Runs `call`, adding its wall time to seconds[part] when seconds is not NULL. */
#define TIMED(part, call)                                            \
    do {                                                             \
        const double started = seconds ? omp_get_wtime() : 0.0;      \
        call;                                                        \
        if (seconds) seconds[part] += omp_get_wtime() - started;     \
    } while (0)

/* out = q_out scaled as integer_ops.quantize_rows returns it: amax * (float)(1 / qmax), per row */
static void quantized_scales(const float *amax, float *scale, int64_t rows, float qmax) {
    for (int64_t r = 0; r < rows; r++) scale[r] = amax[r] * (float)(1.0 / qmax);
}

/* The residual rows x (rows, hidden) float32 after `layers` layers at position `start` (the cache's
 * length; its keys and values for it are written). weights: per layer LAYER_MATRICES pairs of
 * addresses, the int8 (K, N) matrix (PAIRED, products.h) then its float32 (N,) scales, for the fused
 * q|k|v, o, fused gate|up and down matmuls (no biases). cos/sin: the `rotary` RoPE values of position
 * `start`. The cache planes are (layers, cache_rows, kv_heads, capacity, hd) int8 and (..., capacity) float32.
 * seconds: NULL, or three sums the wall time of the products, the attention (with its queries' and cache
 * writes' preparation) and the norms, activations and quantisations is added to (a profile).
 * Returns 0, or -1 when scratch memory could not be had (the step must then be run again another way:
 * x and the cache may be half updated). */
int decode_layers(float *x, int64_t rows, int64_t hidden, int64_t layers, const int64_t *weights, int64_t heads,
                  int64_t kv_heads, int64_t hd, int64_t inner, const float *cos, const float *sin, int64_t rotary,
                  float score_factor, float act_max, float kv_max, int8_t *keys, int8_t *values, float *key_scales,
                  float *value_scales, int64_t cache_rows, int64_t capacity, int64_t start, const float *exp,
                  int64_t exp_len, const float *act_table, int64_t act_limit, float act_grid, double eps,
                  double *seconds, int threads) {
    const int64_t qkv_width = (heads + 2 * kv_heads) * hd, group = heads / kv_heads;
    const int64_t widest = qkv_width > 2 * inner ? qkv_width : 2 * inner;
    int64_t longest = hidden > inner ? hidden : inner; /* the rows quantised before a matmul */
    longest = longest > heads * hd ? longest : heads * hd;
    float *q = malloc(sizeof(float) * rows * longest);
    float *wide = malloc(sizeof(float) * rows * widest), *attended = malloc(sizeof(float) * rows * heads * hd);
    float *mixed = malloc(sizeof(float) * rows * inner), *out = malloc(sizeof(float) * rows * hidden);
    float *scale = malloc(sizeof(float) * rows), *amax = malloc(sizeof(float) * rows);
    float *q_scale = malloc(sizeof(float) * rows * heads);
    int16_t *queries = malloc(sizeof(int16_t) * rows * heads * hd);
    int failed = !(q && wide && attended && mixed && out && scale && amax && q_scale && queries);
    const int64_t plane = cache_rows * kv_heads * capacity;
    for (int64_t l = 0; l < layers && !failed; l++) {
        const int64_t *w = weights + l * 2 * LAYER_MATRICES;
#define MATRIX(m) (const int8_t *)(intptr_t)w[2 * (m)], (const float *)(intptr_t)w[2 * (m) + 1]
        int8_t *k = keys + l * plane * hd, *v = values + l * plane * hd;
        float *ks = key_scales + l * plane, *vs = value_scales + l * plane;
        TIMED(SPENT_ELEMENTWISE, rms_norm_quantize(x, q, scale, rows, hidden, act_max, eps, threads));
        TIMED(SPENT_PRODUCTS, failed |= exact_matmul(q, scale, MATRIX(LAYER_QKV), NULL, NULL, NULL, wide, rows, hidden,
                                                     qkv_width, threads));
        TIMED(SPENT_ATTENTION, prepare_qkv(wide, qkv_width, rows, 1, heads, kv_heads, hd, rotary, cos, sin,
                                           score_factor, act_max, kv_max, queries, q_scale, k, v, ks, vs, capacity,
                                           start, threads));
        TIMED(SPENT_ATTENTION, failed |= attention(queries, q_scale, k, v, ks, vs, exp, exp_len, attended,
                                                   rows * kv_heads, group, 1, hd, start + 1, capacity * hd, capacity,
                                                   threads));
        TIMED(SPENT_ELEMENTWISE, quantize_rows(attended, q, amax, rows, heads * hd, act_max, threads));
        quantized_scales(amax, scale, rows, act_max);
        TIMED(SPENT_PRODUCTS, failed |= exact_matmul(q, scale, MATRIX(LAYER_O), NULL, NULL, NULL, out, rows, heads * hd,
                                                     hidden, threads));
        for (int64_t i = 0; i < rows * hidden; i++) x[i] = x[i] + out[i];
        TIMED(SPENT_ELEMENTWISE, rms_norm_quantize(x, q, scale, rows, hidden, act_max, eps, threads));
        TIMED(SPENT_PRODUCTS, failed |= exact_matmul(q, scale, MATRIX(LAYER_GATE_UP), NULL, NULL, NULL, wide, rows,
                                                     hidden, 2 * inner, threads));
        TIMED(SPENT_ELEMENTWISE, activation(wide, wide + inner, 2 * inner, act_grid, act_table, act_limit, mixed, rows,
                                            inner, threads));
        TIMED(SPENT_ELEMENTWISE, quantize_rows(mixed, q, amax, rows, inner, act_max, threads));
        quantized_scales(amax, scale, rows, act_max);
        TIMED(SPENT_PRODUCTS, failed |= exact_matmul(q, scale, MATRIX(LAYER_DOWN), NULL, NULL, NULL, out, rows, inner,
                                                     hidden, threads));
        for (int64_t i = 0; i < rows * hidden; i++) x[i] = x[i] + out[i];
#undef MATRIX
    }
    free(q), free(wide), free(attended), free(mixed), free(out), free(scale), free(amax), free(q_scale), free(queries);
    return failed ? -1 : 0;
}
