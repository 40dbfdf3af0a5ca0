/* The engine's kernels' shared settings (products.c, rows.c). */
#ifndef LLMPIPE_ENGINE_KERNELS_H
#define LLMPIPE_ENGINE_KERNELS_H
#include "simd.h"

#define MAX_HEAD_DIM 512 /* the scores bound in attention.c allows head_dim <= 518 (kernels.py: MAX_HEAD_DIM) */

/* The kernels layers.c runs a decoding step's layers with (each documented where it is defined). */
int exact_matmul(const float *q, const float *row_scale, const int8_t *w, const float *scale, const float *bias,
                 const double *mean, const double *row_sums, float *out, int64_t rows, int64_t depth, int64_t cols,
                 int threads);
int attention(const int16_t *q, const float *qscale, const int8_t *keys, const int8_t *values,
              const float *key_scales, const float *value_scales, const float *exp, int64_t table_len,
              float *out, int64_t rows, int64_t group, int64_t queries, int64_t hd, int64_t length,
              int64_t kv_stride, int64_t scale_stride, int threads);
void quantize_rows(const float *x, float *q, float *amax_out, int64_t rows, int64_t cols, float qmax, int threads);
void activation(const float *x, const float *up, int64_t stride, float grid, const float *table, int64_t limit,
                float *out, int64_t rows, int64_t cols, int threads);
void rms_norm_quantize(const float *x, float *q, float *row_scale, int64_t rows, int64_t cols, float qmax, double eps,
                       int threads);
void prepare_qkv(const float *qkv, int64_t qkv_stride, int64_t batch, int64_t tokens, int64_t heads, int64_t kv_heads,
                 int64_t hd, int64_t rotary, const float *cos, const float *sin, float score_factor, float act_max,
                 float kv_max, int16_t *q_out, float *q_scale, int8_t *keys, int8_t *values, float *key_scales,
                 float *value_scales, int64_t capacity, int64_t start, int threads);

#endif
