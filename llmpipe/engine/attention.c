/* The exact engine's attention over the int8 key/value cache: scores, softmax from a table and the
 * weighted values in exact integer arithmetic (llmpipe/engine/exact_transformer.py has the torch path).
 *
 * Built with products.c and rows.c into one library by llmpipe/engine/kernels.py. Why: at ~640
 * positions of context a 64-row decoding step reads the whole cache (int8 keys and values are a
 * quarter of float32 ones); full-sequence passes take queries in tiles, as exact products (products.h).
 */
#include "products.h"

/* The last `queries` positions of attention, scores to output, for rows n = (batch row, key/value head),
 * each with `group` query heads: exact_transformer._attention's steps in one pass over the cache, for
 * decoding steps and short passes. Query i of a row sees the first visible_i = length - queries + 1 + i
 * cached positions (the torch path masks the rest to weight 0, which is the same sums).
 * q: (rows, group, queries, hd) int16; qscale: (rows, group, queries) float32, the query scales times the
 * score factor; keys/values: int8, position s of row n at n * kv_stride + s * hd; key_scales/value_scales:
 * float32, at n * scale_stride + s; exp: the attention exp table (table_len entries, the last 0);
 * out: (rows, group, queries, hd) float32.
 * Per query, the same operations in the same order as the torch path:
 *   score_s = (float(dot(q, key_s)) * qscale) * key_scale_s    (|dot| < 2^31 for hd <= 518)
 *   e_s = exp[min(rint(max_s score - score_s), table_len - 1)]
 *   common = max of value_scale over the visible positions
 *   factor = float(2^15 / (double(sum_s e_s) * common))      (the sum: integers, exact in any order)
 *   w_s = rint((e_s * value_scale_s) * factor)                (sum_s w_s <= 2^15 + visible / 2)
 *   out = float(sum_s w_s * value_s) * (common * 2^-15)      (|sum| <= 127 (2^15 + visible / 2) < 2^31) */

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
#elif defined(VECTOR_256)
    if (hd % 16 == 0) {
        for (; s + 8 <= visible; s += 8) {
            __m256i dots[MAX_SHARED_GROUP][8];
            for (int j = 0; j < 8; j++) {
                const int8_t *key = keys + (s + j) * hd;
                for (int64_t g = 0; g < group; g++) dots[g][j] = _mm256_setzero_si256();
                for (int64_t d = 0; d < hd; d += 16) {
                    const __m256i k = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(key + d)));
                    for (int64_t g = 0; g < group; g++)
                        dots[g][j] = _mm256_add_epi32(dots[g][j], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(q[g] + d)), k));
                }
            }
            const __m256 key_scale = _mm256_loadu_ps(key_scales + s);
            for (int64_t g = 0; g < group; g++) {
                const __m256 products = _mm256_mul_ps(_mm256_cvtepi32_ps(sum_lanes8(dots[g])), _mm256_set1_ps(qscale[g]));
                _mm256_storeu_ps(scores[g] + s, _mm256_mul_ps(products, key_scale));
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
#elif defined(VECTOR_256)
    const __m256 top8 = _mm256_set1_ps(top), last8 = _mm256_set1_ps(last);
    __m256d sums = _mm256_setzero_pd();
    for (; s + 8 <= visible; s += 8) {
        const __m256 distance = _mm256_sub_ps(top8, _mm256_loadu_ps(scores + s));
        const __m256 step = _mm256_round_ps(distance, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 e = _mm256_i32gather_ps(exp, _mm256_cvttps_epi32(_mm256_min_ps(step, last8)), 4);
        _mm256_storeu_ps(scores + s, e);
        sums = _mm256_add_pd(sums, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        sums = _mm256_add_pd(sums, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, sums);
    denominator = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
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
#elif defined(VECTOR_256)
    const __m256 factor8 = _mm256_set1_ps(factor);
    for (; s + 8 <= visible; s += 8) {
        const __m256 w = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(scores + s), _mm256_loadu_ps(value_scales + s)),
                                       factor8);
        const __m256 rounded = _mm256_round_ps(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256((__m256i *)(weights + s), _mm256_cvttps_epi32(rounded));
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
#elif defined(VECTOR_256)
    /* two positions per vpmaddwd: (w_s, w_s+1) against (v_s[d], v_s+1[d]) as int16 pairs; a weight of
     * 2^15 (one position taking it all) does not fit int16, and takes the loop below */
    int32_t top = 0;
    for (int64_t s = 0; s < visible; s++) top = weights[s] > top ? weights[s] : top;
    if (hd % 16 == 0 && top < 32768) {
        for (int64_t d0 = 0; d0 < hd; d0 += 64) { /* at most eight registers of sums at a time */
            const int64_t parts = (hd - d0 < 64 ? hd - d0 : 64) / 16;
            __m256i sums[8];
            for (int64_t p = 0; p < 2 * parts; p++) sums[p] = _mm256_setzero_si256();
            for (int64_t s = 0; s < visible; s += 2) {
                const int32_t w0 = weights[s], w1 = s + 1 < visible ? weights[s + 1] : 0;
                if ((w0 | w1) == 0) continue; /* weights round to 0 far from the attended positions */
                const __m256i w = _mm256_set1_epi32((int32_t)(((uint32_t)(uint16_t)w1 << 16) | (uint16_t)w0));
                const int8_t *v0 = values + s * hd + d0, *v1 = s + 1 < visible ? v0 + hd : v0;
                for (int64_t p = 0; p < parts; p++) {
                    const __m128i a = _mm_loadu_si128((const __m128i *)(v0 + 16 * p));
                    const __m128i b = _mm_loadu_si128((const __m128i *)(v1 + 16 * p));
                    const __m256i low = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
                    const __m256i high = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));
                    sums[2 * p] = _mm256_add_epi32(sums[2 * p], _mm256_madd_epi16(w, low));
                    sums[2 * p + 1] = _mm256_add_epi32(sums[2 * p + 1], _mm256_madd_epi16(w, high));
                }
            }
            const __m256 unit8 = _mm256_set1_ps(unit);
            for (int64_t p = 0; p < 2 * parts; p++)
                _mm256_storeu_ps(out + d0 + 8 * p, _mm256_mul_ps(_mm256_cvtepi32_ps(sums[p]), unit8));
        }
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

/* One thread's scratch for attention_tile, made once per call of `attention` for the longest span: a
 * full-sequence pass has hundreds of tiles per row, and scratch of a few hundred KB made and freed per
 * tile went back to the kernel each time (a quarter of the attention's time in page faults). */
typedef struct {
    int16_t *rows, *weights, *packed; /* packed: product_run's, for a depth of hd or the span */
    float *row_factor, *ones, *scores, *mixed;
    uint8_t *whole;
} tile_scratch;

static void tile_scratch_free(tile_scratch *t) {
    free(t->rows), free(t->weights), free(t->packed), free(t->row_factor), free(t->ones), free(t->scores);
    free(t->mixed), free(t->whole);
}

/* Room for tiles of up to m query rows, spans up to `length` and head size hd; 0, or -1 (all freed). */
static int tile_scratch_make(tile_scratch *t, int64_t m, int64_t length, int64_t hd) {
    const int64_t lda = length + (length & 1), depth = length > hd ? length : hd;
    t->rows = malloc(sizeof(int16_t) * m * hd);
    t->weights = malloc(sizeof(int16_t) * m * lda);
    t->packed = malloc(sizeof(int16_t) * product_scratch_size(depth));
    t->row_factor = malloc(sizeof(float) * m);
    t->ones = malloc(sizeof(float) * hd);
    t->scores = malloc(sizeof(float) * m * length);
    t->mixed = malloc(sizeof(float) * m * hd);
    t->whole = malloc(m);
    if (t->rows && t->weights && t->packed && t->row_factor && t->ones && t->scores && t->mixed && t->whole) {
        for (int64_t d = 0; d < hd; d++) t->ones[d] = 1.0f;
        return 0;
    }
    tile_scratch_free(t);
    return -1;
}

/* The attention of `tile` consecutive queries (from query i0) of one row, for all its heads, as two exact
 * products on the tiles above: the scores of the G x tile query rows against the visible keys (the keys
 * as a transposed weight), then query_weights per query, then the int16 weights against the values. The
 * same integers and float operations as the per-query loops, so the same bits. Positions past a query's
 * own visible ones get weight 0 (the products cover the tile's last query's span). A query whose
 * weights hold 2^15 (one position taking it all), which int16 cannot, is mixed by query_mix. */
static void attention_tile(const int16_t *q, const float *qscale, const int8_t *kn, const int8_t *vn, const float *ks,
                           const float *vs, const float *exp, int64_t table_len, float *out, int64_t n, int64_t group,
                           int64_t queries, int64_t hd, int64_t length, int64_t i0, int64_t tile,
                           const tile_scratch *t) {
    const int64_t first = length - queries + 1;         /* what query 0 sees */
    const int64_t span = first + i0 + tile - 1;         /* what the tile's last query sees */
    const int64_t m = group * tile, lda = span + (span & 1);
    int16_t *rows = t->rows, *weights = t->weights;
    float *row_factor = t->row_factor, *scores = t->scores, *mixed = t->mixed;
    uint8_t *whole = t->whole;
    for (int64_t g = 0; g < group; g++)
        for (int64_t i = 0; i < tile; i++) {
            const int64_t at = (n * group + g) * queries + i0 + i;
            memcpy(rows + (g * tile + i) * hd, q + at * hd, sizeof(int16_t) * hd);
            row_factor[g * tile + i] = qscale[at];
        }
    const product_job scoring = {rows, hd, m, hd, span, kn, PRODUCT_TRANSPOSED, PRODUCT_DEPTH, PRODUCT_DIRECT,
                                 NULL, NULL, NULL, row_factor, ks, NULL, NULL, NULL, scores};
    product_run(&scoring, 1, t->packed);
    float common = vs[0];
    for (int64_t s = 1; s < first + i0 - 1; s++) common = vs[s] > common ? vs[s] : common;
    for (int64_t i = 0; i < tile; i++) {
        const int64_t visible = first + i0 + i;
        common = vs[visible - 1] > common ? vs[visible - 1] : common;
        for (int64_t g = 0; g < group; g++) {
            const int64_t r = g * tile + i;
            float *row = scores + r * span;
            query_weights(row, vs, common, exp, table_len, visible);
            const int32_t *w = (const int32_t *)row;
            int32_t top = 0;
            for (int64_t s = 0; s < visible; s++) {
                weights[r * lda + s] = (int16_t)w[s];
                top = w[s] > top ? w[s] : top;
            }
            for (int64_t s = visible; s < lda; s++) weights[r * lda + s] = 0;
            whole[r] = top >= 32768;
            if (whole[r]) /* int16 cannot hold it: mixed on its own below, no part of the product */
                for (int64_t s = 0; s < lda; s++) weights[r * lda + s] = 0;
            row_factor[r] = common * (1.0f / 32768.0f);
        }
    }
    /* a row's weights sum to at most 2^15 + span / 2, so 128 times that stays in int32 (span < 2^24) */
    const product_job mixing = {weights, lda, m, span, hd, vn, PRODUCT_PLAIN, span, PRODUCT_DIRECT,
                                NULL, NULL, NULL, row_factor, t->ones, NULL, NULL, NULL, mixed};
    product_run(&mixing, 1, t->packed);
    for (int64_t g = 0; g < group; g++)
        for (int64_t i = 0; i < tile; i++) {
            const int64_t r = g * tile + i;
            float *to = out + ((n * group + g) * queries + i0 + i) * hd;
            if (whole[r])
                query_mix((const int32_t *)(scores + r * span), vn, row_factor[r], to, hd, first + i0 + i);
            else
                memcpy(to, mixed + r * hd, sizeof(float) * hd);
        }
}

#define ATTENTION_TILE 16 /* queries of one row attended together (as products) in full-sequence passes */
#define ATTENTION_PARALLEL_MIN (1 << 15) /* head-positions x hd below which a step's attention takes one thread */

/* Returns 0, or -1 when scratch memory could not be had. */
int attention(const int16_t *q, const float *qscale, const int8_t *keys, const int8_t *values,
              const float *key_scales, const float *value_scales, const float *exp, int64_t table_len,
              float *out, int64_t rows, int64_t group, int64_t queries, int64_t hd, int64_t length,
              int64_t kv_stride, int64_t scale_stride, int threads) {
    int failed = 0;
    if (queries >= ATTENTION_TILE) {
        const int64_t tiles = (queries + ATTENTION_TILE - 1) / ATTENTION_TILE;
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            tile_scratch scratch;
            failed = tile_scratch_make(&scratch, group * ATTENTION_TILE, length, hd);
#pragma omp for schedule(dynamic) collapse(2)
            for (int64_t n = 0; n < rows; n++)
                for (int64_t t = 0; t < tiles; t++) {
                    if (failed) continue;
                    const int64_t i0 = t * ATTENTION_TILE;
                    const int64_t tile = queries - i0 < ATTENTION_TILE ? queries - i0 : ATTENTION_TILE;
                    attention_tile(q, qscale, keys + n * kv_stride, values + n * kv_stride,
                                   key_scales + n * scale_stride, value_scales + n * scale_stride, exp, table_len, out,
                                   n, group, queries, hd, length, i0, tile, &scratch);
                }
            if (!failed) tile_scratch_free(&scratch);
        }
        return failed ? -1 : 0;
    }
    /* heads sharing one pass over their keys; one at a time where a step has too few rows to share out
     * between the threads otherwise (a decoding step of one row: 3 key/value heads of SmolLM2 for 2 threads) */
    const int64_t per = rows * queries >= 4 * (int64_t)threads ? MAX_SHARED_GROUP : 1;
    const int64_t chunks = (group + per - 1) / per, tasks = rows * queries * chunks;
#pragma omp parallel num_threads(threads) reduction(| : failed) if (tasks * per * length * hd >= ATTENTION_PARALLEL_MIN)
    {
        float *scratch = malloc(sizeof(float) * per * length);
        failed = scratch == NULL;
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < tasks; task++) {
            if (scratch == NULL) continue;
            const int64_t n = task / (queries * chunks), i = task / chunks % queries, g0 = task % chunks * per;
            const float *ks = key_scales + n * scale_stride;
            const float *vs = value_scales + n * scale_stride;
            const int8_t *kn = keys + n * kv_stride, *vn = values + n * kv_stride;
            const int64_t visible = length - queries + 1 + i; /* query i sees this many positions */
            float common = vs[0];
            for (int64_t s = 1; s < visible; s++) common = vs[s] > common ? vs[s] : common;
            const int64_t count = group - g0 < per ? group - g0 : per;
            const int16_t *heads[MAX_SHARED_GROUP];
            float scales[MAX_SHARED_GROUP], *scores[MAX_SHARED_GROUP], *outs[MAX_SHARED_GROUP];
            for (int64_t g = 0; g < count; g++) {
                const int64_t at = (n * group + g0 + g) * queries + i;
                heads[g] = q + at * hd;
                scales[g] = qscale[at];
                scores[g] = scratch + g * length;
                outs[g] = out + at * hd;
            }
            if (hd == 64)
                heads_attention(heads, scales, scores, outs, count, kn, vn, ks, vs, common, exp, table_len, 64, visible);
            else if (hd == 128)
                heads_attention(heads, scales, scores, outs, count, kn, vn, ks, vs, common, exp, table_len, 128, visible);
            else
                heads_attention(heads, scales, scores, outs, count, kn, vn, ks, vs, common, exp, table_len, hd, visible);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

