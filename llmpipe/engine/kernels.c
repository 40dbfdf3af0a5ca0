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
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

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

/* ---- exact_transformer.ExactWeight: int16-range rows times int8 weights, fused with the output's scaling ----
 *
 * The spec (FORMAT.md, "Matmul") splits q = 256 hi + lo and rounds f32(f32(H) * 256 + f32(L)) with the
 * exact H = hi . w, L = lo . w. Here the exact D = q . w = 256 H + L comes from one int16 product per
 * weight (AVX2: vpmaddwd, 16 of them per instruction) instead of two int8 ones. Where |H| and |L| are
 * below 2^24, f32(H) and f32(L) are exact and the spec's float is f32(D), rounded once; that holds for a
 * row when 128 sum|hi| and 128 sum|lo| are below 2^24 (always for K <= 1,024, and for the rows of small
 * models all but always). Rows past that bound take H from a second product of their hi parts, and
 * L = D - 256 H: the spec's two roundings, exactly. LayerNorm rows need only D (FORMAT.md: f64(256 H + L)).
 * int32 sums of at most PRODUCT_DEPTH products (|a| <= 32767, |w| <= 128) stay below 2^31; longer
 * reductions add such sums in int64. Attention's long passes use the same tiles (attention_tiles). */
#define PRODUCT_ROWS 6        /* a micro-tile: rows ... */
#define PRODUCT_COLS 16       /* ... times columns (two 8-lane vectors of int32 sums) */
#define PRODUCT_DEPTH 512     /* 512 * 32767 * 128 < 2^31 (rows of |a| <= 32767) */
#define PRODUCT_TILE_ROWS 96  /* rows sharing one packed column strip */
#define PRODUCT_PACKED_STRIPS 4 /* strips packed together: a 64-byte line of each weight row */
#define PRODUCT_EXACT_SUM (1 << 17) /* 128 * sum|part| < 2^24 */
#define PRODUCT_INT32_SUM (1 << 24) /* 128 * sum|a| < 2^31 */

enum product_mode { PRODUCT_DIRECT, PRODUCT_MEAN, PRODUCT_SPLIT };

typedef struct {
    const int16_t *a; /* (rows, lda) int16, lda even, zero past depth */
    int64_t lda, rows, depth, cols;
    const int8_t *w;  /* (depth, cols); with `transposed`, (cols, depth): attention's keys */
    int transposed;
    int64_t block;    /* products summed in int32 at a time: PRODUCT_DEPTH, or more where every row's
                       * 128 sum|a| is below 2^31 (then no sum of its products can leave int32) */
    int mode;
    const int64_t *out_row;   /* output row of each row of a (NULL: the same) */
    const int64_t *pending_at; /* DIRECT: NULL, or per row -1 or its slot in pending (SPLIT: row r is slot r) */
    int64_t *pending;         /* (slots, cols) D of the rows past the bound */
    const float *row_scale, *scale, *bias; /* bias may be NULL */
    const double *mean, *row_sums;         /* MEAN only */
    float *out;                            /* (., cols) */
} product_job;

/* Write one micro-tile's exact sums (mr rows from `row`, nr columns from `col`). */
static void product_store(const product_job *job, int64_t row, int mr, int64_t col, int nr,
                          const int64_t (*sums)[PRODUCT_COLS]) {
    for (int i = 0; i < mr; i++) {
        const int64_t r = row + i, target = job->out_row != NULL ? job->out_row[r] : r;
        float *o = job->out + target * job->cols + col;
        const float rs = job->row_scale[target];
        const float *sc = job->scale + col;
        const float *bias = job->bias != NULL ? job->bias + col : NULL;
        if (job->mode == PRODUCT_DIRECT && job->pending_at != NULL && job->pending_at[r] >= 0) { /* past the bound: H comes later */
            int64_t *park = job->pending + job->pending_at[r] * job->cols + col;
            for (int j = 0; j < nr; j++) park[j] = sums[i][j];
            continue;
        }
        for (int j = 0; j < nr; j++) {
            float y;
            if (job->mode == PRODUCT_DIRECT) {
                y = (float)sums[i][j];
            } else if (job->mode == PRODUCT_MEAN) {
                y = (float)((double)sums[i][j] - job->mean[target] * job->row_sums[col + j]);
            } else { /* SPLIT: sums are H, the pending slot holds D */
                const int64_t high = sums[i][j];
                const int64_t low = job->pending[r * job->cols + col + j] - 256 * high;
                y = (float)high * 256.0f + (float)low;
            }
            o[j] = (y * rs) * sc[j];
            if (bias != NULL) o[j] += bias[j];
        }
    }
}

/* Columns col.. col+nr of k-pairs 0..depth/2 as int16 pairs, the layout vpmaddwd reads: for pair p,
 * 32 values: (w[2p][c], w[2p+1][c]) for c < 8, then for 8 <= c < 16 (zeros past nr and past depth). */
static void product_pack_rest(const product_job *job, int64_t col, int nr, int64_t p, int16_t *packed);

static void product_pack(const product_job *job, int64_t col, int nr, int16_t *packed) {
    const int64_t pairs = (job->depth + 1) / 2;
    int64_t p = 0;
    if (job->transposed) { /* column c is row col + c of w: its pairs are consecutive bytes */
#ifdef __AVX2__
        if (nr == PRODUCT_COLS && job->depth % 16 == 0) { /* 8 keys x 8 pairs at a time, transposed */
            for (int half = 0; half < 2; half++)
                for (int64_t p0 = 0; p0 < pairs; p0 += 8) {
                    __m256i r[8], t[8], u[8];
                    for (int c = 0; c < 8; c++) {
                        const int8_t *src = job->w + (col + 8 * half + c) * job->depth + 2 * p0;
                        r[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)src)); /* 8 pairs */
                    }
                    for (int c = 0; c < 8; c += 2) {
                        t[c] = _mm256_unpacklo_epi32(r[c], r[c + 1]);
                        t[c + 1] = _mm256_unpackhi_epi32(r[c], r[c + 1]);
                    }
                    for (int c = 0; c < 8; c += 4) {
                        u[c] = _mm256_unpacklo_epi64(t[c], t[c + 2]);
                        u[c + 1] = _mm256_unpackhi_epi64(t[c], t[c + 2]);
                        u[c + 2] = _mm256_unpacklo_epi64(t[c + 1], t[c + 3]);
                        u[c + 3] = _mm256_unpackhi_epi64(t[c + 1], t[c + 3]);
                    }
                    for (int j = 0; j < 4; j++) { /* pair p0 + j: keys 0..7 */
                        _mm256_storeu_si256((__m256i *)(packed + (p0 + j) * 32 + 16 * half),
                                            _mm256_permute2x128_si256(u[j], u[j + 4], 0x20));
                        _mm256_storeu_si256((__m256i *)(packed + (p0 + j + 4) * 32 + 16 * half),
                                            _mm256_permute2x128_si256(u[j], u[j + 4], 0x31));
                    }
                }
            return;
        }
#endif
        for (int c = 0; c < PRODUCT_COLS; c++) {
            const int8_t *src = job->w + (col + c) * job->depth;
            for (int64_t k = 0; k < 2 * pairs; k++)
                packed[(k / 2) * 32 + (c / 8) * 16 + (c % 8) * 2 + k % 2] =
                    (c < nr && k < job->depth) ? (int16_t)src[k] : 0;
        }
        return;
    }
#ifdef __AVX2__
    if (nr == PRODUCT_COLS)
        for (; 2 * p + 1 < job->depth; p++) {
            const __m128i even = _mm_loadu_si128((const __m128i *)(job->w + 2 * p * job->cols + col));
            const __m128i odd = _mm_loadu_si128((const __m128i *)(job->w + (2 * p + 1) * job->cols + col));
            _mm256_storeu_si256((__m256i *)(packed + p * 32), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(even, odd)));
            _mm256_storeu_si256((__m256i *)(packed + p * 32 + 16), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(even, odd)));
        }
#endif
    product_pack_rest(job, col, nr, p, packed);
}

/* product_pack of `count` consecutive strips from column col (each `pairs * 32` values apart in packed),
 * reading each row of w once for all of them: for wide weights (the output head's 49,152 columns) one
 * strip at a time touches a new page per row. */
static void product_pack_strips(const product_job *job, int64_t col, int count, int16_t *packed) {
    const int64_t pairs = (job->depth + 1) / 2;
    const int last = (int)((job->cols - col - 1) / PRODUCT_COLS); /* the strip that may be partial */
    if (job->transposed || count == 1 || last < count - 1 || (job->cols - col) < (int64_t)count * PRODUCT_COLS) {
        for (int j = 0; j < count; j++) {
            const int64_t c = col + j * PRODUCT_COLS;
            const int nr = job->cols - c < PRODUCT_COLS ? (int)(job->cols - c) : PRODUCT_COLS;
            product_pack(job, c, nr, packed + j * pairs * 32);
        }
        return;
    }
    int64_t p = 0;
#ifdef __AVX2__
    for (; 2 * p + 1 < job->depth; p++)
        for (int j = 0; j < count; j++) {
            const int8_t *at = job->w + 2 * p * job->cols + col + j * PRODUCT_COLS;
            const __m128i even = _mm_loadu_si128((const __m128i *)at);
            const __m128i odd = _mm_loadu_si128((const __m128i *)(at + job->cols));
            int16_t *dst = packed + j * pairs * 32 + p * 32;
            _mm256_storeu_si256((__m256i *)dst, _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(even, odd)));
            _mm256_storeu_si256((__m256i *)(dst + 16), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(even, odd)));
        }
#endif
    for (int j = 0; j < count; j++)
        product_pack_rest(job, col + j * PRODUCT_COLS, PRODUCT_COLS, p, packed + j * pairs * 32);
}

/* product_pack's plain loop, for the pairs from p on. */
static void product_pack_rest(const product_job *job, int64_t col, int nr, int64_t p, int16_t *packed) {
    const int64_t pairs = (job->depth + 1) / 2;
    for (; p < pairs; p++) {
        int16_t *dst = packed + p * 2 * PRODUCT_COLS;
        for (int half = 0; half < 2; half++) {
            const int64_t k = 2 * p + half;
            const int8_t *src = job->w + k * job->cols + col;
            for (int c = 0; c < PRODUCT_COLS; c++)
                dst[(c / 8) * 16 + (c % 8) * 2 + half] = (k < job->depth && c < nr) ? (int16_t)src[c] : 0;
        }
    }
}

#ifdef __AVX2__
/* product_store for a micro-tile whose whole sums are the int32 `part` (one block of depth): the
 * common rows (DIRECT, all 16 columns, none parked) in 8-lane float operations, the same ones in the same
 * order; the others through product_store. */
static void product_store32(const product_job *job, int64_t row, int mr, int64_t col, int nr,
                            const int32_t part[PRODUCT_ROWS][PRODUCT_COLS]) {
    for (int i = 0; i < mr; i++) {
        const int64_t r = row + i, target = job->out_row != NULL ? job->out_row[r] : r;
        const int parked = job->pending_at != NULL && job->pending_at[r] >= 0;
        if (job->mode == PRODUCT_DIRECT && !parked && nr == PRODUCT_COLS) {
            float *o = job->out + target * job->cols + col;
            const __m256 rs = _mm256_set1_ps(job->row_scale[target]);
            for (int h = 0; h < 2; h++) {
                const __m256i sums = _mm256_loadu_si256((const __m256i *)(part[i] + 8 * h));
                __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), rs),
                                         _mm256_loadu_ps(job->scale + col + 8 * h));
                if (job->bias != NULL) y = _mm256_add_ps(y, _mm256_loadu_ps(job->bias + col + 8 * h));
                _mm256_storeu_ps(o + 8 * h, y);
            }
            continue;
        }
        int64_t sums[1][PRODUCT_COLS];
        for (int j = 0; j < PRODUCT_COLS; j++) sums[0][j] = part[i][j];
        product_store(job, r, 1, col, nr, sums);
    }
}
#endif

/* Micro-tile (row.. row + mr, col.. col + nr): the exact sums a[row + i] . w[:, col + j] from the packed
 * strip, in int32 over blocks of PRODUCT_DEPTH and int64 across them, then stored. */
static inline __attribute__((always_inline)) void product_tile(const product_job *job, int64_t row, const int mr,
                                                              const int16_t *packed, int64_t col, int nr) {
    const int64_t pairs = (job->depth + 1) / 2;
    int64_t sums[PRODUCT_ROWS][PRODUCT_COLS];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < PRODUCT_COLS; j++) sums[i][j] = 0;
    const int64_t block = (job->block + 1) / 2;
    for (int64_t p0 = 0; p0 < pairs; p0 += block) {
        const int64_t p1 = p0 + block < pairs ? p0 + block : pairs;
        int32_t part[PRODUCT_ROWS][PRODUCT_COLS];
#ifdef __AVX2__
        __m256i acc[PRODUCT_ROWS][2];
        for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        for (int64_t p = p0; p < p1; p++) {
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(packed + p * 32));
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(packed + p * 32 + 16));
            for (int i = 0; i < mr; i++) {
                int32_t pair;
                memcpy(&pair, job->a + (row + i) * job->lda + 2 * p, sizeof pair);
                const __m256i x = _mm256_set1_epi32(pair);
                acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(x, b0));
                acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(x, b1));
            }
        }
        for (int i = 0; i < mr; i++) {
            _mm256_storeu_si256((__m256i *)part[i], acc[i][0]);
            _mm256_storeu_si256((__m256i *)(part[i] + 8), acc[i][1]);
        }
        if (p0 == 0 && p1 == pairs) { /* one block: the int32 sums are the sums */
            product_store32(job, row, mr, col, nr, part);
            return;
        }
#else
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < PRODUCT_COLS; j++) part[i][j] = 0;
        for (int64_t p = p0; p < p1; p++) {
            const int16_t *b = packed + p * 32;
            for (int i = 0; i < mr; i++) {
                const int16_t *x = job->a + (row + i) * job->lda + 2 * p;
                for (int j = 0; j < PRODUCT_COLS; j++) {
                    const int16_t *pair = b + (j / 8) * 16 + (j % 8) * 2;
                    part[i][j] += (int32_t)x[0] * pair[0] + (int32_t)x[1] * pair[1];
                }
            }
        }
#endif
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < PRODUCT_COLS; j++) sums[i][j] += part[i][j];
    }
    product_store(job, row, mr, col, nr, sums);
}

#define PRODUCT_TILE_CASE(n)                             \
    case n:                                              \
        product_tile(job, row, n, strip, col, nr);       \
        break;

/* All of a job: tiles of PRODUCT_TILE_ROWS rows times a run of column strips, shared out between threads. */
static void product_run(const product_job *job, int threads) {
    if (job->rows == 0) return;
    const int64_t strips = (job->cols + PRODUCT_COLS - 1) / PRODUCT_COLS;
    const int64_t row_tiles = (job->rows + PRODUCT_TILE_ROWS - 1) / PRODUCT_TILE_ROWS;
    const int64_t wanted = 4 * (int64_t)threads; /* enough tiles that threads finish together */
    int64_t per = (strips * row_tiles + wanted - 1) / wanted;
    per = per < 1 ? 1 : (per > 16 ? 16 : per);
    const int64_t col_tiles = (strips + per - 1) / per;
    const int64_t strip_size = ((job->depth + 1) / 2) * 2 * PRODUCT_COLS;
#pragma omp parallel num_threads(threads) if (threads > 1 && job->rows * job->depth * job->cols >= PARALLEL_MIN)
    {
        int16_t *packed = malloc(sizeof(int16_t) * strip_size * PRODUCT_PACKED_STRIPS);
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t rt = 0; rt < row_tiles; rt++)
            for (int64_t ct = 0; ct < col_tiles; ct++) {
                const int64_t row0 = rt * PRODUCT_TILE_ROWS;
                const int64_t row1 = row0 + PRODUCT_TILE_ROWS < job->rows ? row0 + PRODUCT_TILE_ROWS : job->rows;
                const int64_t s1 = (ct + 1) * per < strips ? (ct + 1) * per : strips;
                for (int64_t s = ct * per; s < s1; s++) {
                    const int64_t col = s * PRODUCT_COLS;
                    const int nr = job->cols - col < PRODUCT_COLS ? (int)(job->cols - col) : PRODUCT_COLS;
                    const int64_t slot = (s - ct * per) % PRODUCT_PACKED_STRIPS;
                    if (slot == 0) {
                        const int64_t count = s1 - s < PRODUCT_PACKED_STRIPS ? s1 - s : PRODUCT_PACKED_STRIPS;
                        product_pack_strips(job, col, (int)count, packed);
                    }
                    const int16_t *strip = packed + slot * strip_size;
                    for (int64_t row = row0; row < row1; row += PRODUCT_ROWS) {
                        switch (row1 - row < PRODUCT_ROWS ? row1 - row : PRODUCT_ROWS) {
                            PRODUCT_TILE_CASE(1)
                            PRODUCT_TILE_CASE(2)
                            PRODUCT_TILE_CASE(3)
                            PRODUCT_TILE_CASE(4)
                            PRODUCT_TILE_CASE(5)
                            PRODUCT_TILE_CASE(6)
                        }
                    }
                }
            }
        free(packed);
    }
}

/* ExactWeight's float32 output (rows, cols) for integer-valued float32 q (rows, depth) in [-32639, 32639]
 * with row scales (rows, 1), weights w (depth, cols) int8, scales (cols,), bias (cols,) or NULL; with
 * mean (rows,) and row_sums (cols,) float64 (LayerNorm), y = f32(f64(D) - mean * row_sums) instead.
 * Returns 0, or -1 when scratch memory could not be had (nothing written). */
int exact_matmul(const float *q, const float *row_scale, const int8_t *w, const float *scale, const float *bias,
                 const double *mean, const double *row_sums, float *out, int64_t rows, int64_t depth, int64_t cols,
                 int threads) {
    const int64_t lda = depth + (depth & 1);
    int16_t *a = malloc(sizeof(int16_t) * (rows * lda + 1));
    int64_t *pending_at = malloc(sizeof(int64_t) * (rows + 1));
    if (a == NULL || pending_at == NULL) {
        free(a);
        free(pending_at);
        return -1;
    }
    int narrow = 0; /* some row's products could leave int32 over the whole depth */
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * depth >= PARALLEL_MIN) reduction(| : narrow)
    for (int64_t r = 0; r < rows; r++) {
        int64_t high_sum = 0, low_sum = 0;
        for (int64_t k = 0; k < depth; k++) {
            const int32_t v = (int32_t)q[r * depth + k];
            const int32_t h = (v + 128) >> 8;
            const int32_t l = v - h * 256;
            a[r * lda + k] = (int16_t)v;
            high_sum += h < 0 ? -h : h;
            low_sum += l < 0 ? -l : l;
        }
        if (256 * high_sum + low_sum >= PRODUCT_INT32_SUM) narrow = 1; /* sum|q| <= 256 sum|hi| + sum|lo| */
        if (lda != depth) a[r * lda + depth] = 0;
        pending_at[r] = (mean == NULL && (high_sum >= PRODUCT_EXACT_SUM || low_sum >= PRODUCT_EXACT_SUM)) ? 0 : -1;
    }
    int64_t slots = 0;
    for (int64_t r = 0; r < rows; r++)
        if (pending_at[r] >= 0) pending_at[r] = slots++;
    int64_t *pending = slots ? malloc(sizeof(int64_t) * slots * cols) : NULL;
    int16_t *highs = slots ? malloc(sizeof(int16_t) * slots * lda) : NULL;
    int64_t *slot_rows = slots ? malloc(sizeof(int64_t) * slots) : NULL;
    if (slots && (pending == NULL || highs == NULL || slot_rows == NULL)) {
        free(pending), free(highs), free(slot_rows), free(a), free(pending_at);
        return -1;
    }
    const int64_t block = narrow ? PRODUCT_DEPTH : depth;
    product_job job = {a, lda, rows, depth, cols, w, 0, block, mean != NULL ? PRODUCT_MEAN : PRODUCT_DIRECT, NULL,
                       pending_at, pending, row_scale, scale, bias, mean, row_sums, out};
    product_run(&job, threads);
    if (slots) { /* the rows past the bound: H from their hi parts, then the spec's two roundings */
        for (int64_t r = 0; r < rows; r++) {
            const int64_t slot = pending_at[r];
            if (slot < 0) continue;
            slot_rows[slot] = r;
            for (int64_t k = 0; k < lda; k++) highs[slot * lda + k] = (int16_t)((a[r * lda + k] + 128) >> 8);
        }
        product_job split = {highs, lda, slots, depth, cols, w, 0, depth, PRODUCT_SPLIT, slot_rows, NULL, pending,
                             row_scale, scale, bias, NULL, NULL, out};
        product_run(&split, threads);
    }
    free(pending), free(highs), free(slot_rows), free(a), free(pending_at);
    return 0;
}

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

/* The attention of `tile` consecutive queries (from query i0) of one row, for all its heads, as two exact
 * products on the tiles above: the scores of the G x tile query rows against the visible keys (the keys
 * as a transposed weight), then query_weights per query, then the int16 weights against the values. The
 * same integers and float operations as the per-query loops, so the same bits. Positions past a query's
 * own visible ones get weight 0 (the products cover the tile's last query's span). A query whose
 * weights hold 2^15 (one position taking it all), which int16 cannot, is mixed by query_mix. */
static int attention_tile(const int16_t *q, const float *qscale, const int8_t *kn, const int8_t *vn, const float *ks,
                          const float *vs, const float *exp, int64_t table_len, float *out, int64_t n, int64_t group,
                          int64_t queries, int64_t hd, int64_t length, int64_t i0, int64_t tile) {
    const int64_t first = length - queries + 1;         /* what query 0 sees */
    const int64_t span = first + i0 + tile - 1;         /* what the tile's last query sees */
    const int64_t m = group * tile, lda = span + (span & 1);
    int16_t *rows = malloc(sizeof(int16_t) * m * hd);
    float *row_factor = malloc(sizeof(float) * m), *ones = malloc(sizeof(float) * hd);
    float *scores = malloc(sizeof(float) * m * span), *mixed = malloc(sizeof(float) * m * hd);
    int16_t *weights = malloc(sizeof(int16_t) * m * lda);
    uint8_t *whole = malloc(m);
    int ok = rows && row_factor && ones && scores && mixed && weights && whole;
    if (ok) {
        for (int64_t g = 0; g < group; g++)
            for (int64_t i = 0; i < tile; i++) {
                const int64_t at = (n * group + g) * queries + i0 + i;
                memcpy(rows + (g * tile + i) * hd, q + at * hd, sizeof(int16_t) * hd);
                row_factor[g * tile + i] = qscale[at];
            }
        for (int64_t d = 0; d < hd; d++) ones[d] = 1.0f;
        const product_job scoring = {rows, hd, m, hd, span, kn, 1, PRODUCT_DEPTH, PRODUCT_DIRECT, NULL, NULL, NULL,
                                     row_factor, ks, NULL, NULL, NULL, scores};
        product_run(&scoring, 1);
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
        const product_job mixing = {weights, lda, m, span, hd, vn, 0, span, PRODUCT_DIRECT, NULL, NULL, NULL,
                                    row_factor, ones, NULL, NULL, NULL, mixed};
        product_run(&mixing, 1);
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
    free(rows), free(row_factor), free(ones), free(scores), free(mixed), free(weights), free(whole);
    return ok ? 0 : -1;
}

#define ATTENTION_TILE 16 /* queries of one row attended together (as products) in full-sequence passes */

/* Returns 0, or -1 when scratch memory could not be had. */
int attention(const int16_t *q, const float *qscale, const int8_t *keys, const int8_t *values,
              const float *key_scales, const float *value_scales, const float *exp, int64_t table_len,
              float *out, int64_t rows, int64_t group, int64_t queries, int64_t hd, int64_t length,
              int64_t kv_stride, int64_t scale_stride, int threads) {
    int failed = 0;
    if (queries >= ATTENTION_TILE) {
        const int64_t tiles = (queries + ATTENTION_TILE - 1) / ATTENTION_TILE;
#pragma omp parallel for num_threads(threads) schedule(dynamic) collapse(2) reduction(| : failed)
        for (int64_t n = 0; n < rows; n++)
            for (int64_t t = 0; t < tiles; t++) {
                const int64_t i0 = t * ATTENTION_TILE;
                const int64_t tile = queries - i0 < ATTENTION_TILE ? queries - i0 : ATTENTION_TILE;
                failed |= attention_tile(q, qscale, keys + n * kv_stride, values + n * kv_stride,
                                         key_scales + n * scale_stride, value_scales + n * scale_stride, exp,
                                         table_len, out, n, group, queries, hd, length, i0, tile);
            }
        return failed ? -1 : 0;
    }
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * MAX_SHARED_GROUP * length);
        failed = scratch == NULL;
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t n = 0; n < rows; n++) {
            for (int64_t i = 0; i < queries; i++) {
                if (scratch == NULL) continue;
                const float *ks = key_scales + n * scale_stride;
                const float *vs = value_scales + n * scale_stride;
                const int8_t *kn = keys + n * kv_stride, *vn = values + n * kv_stride;
                const int64_t visible = length - queries + 1 + i; /* query i sees this many positions */
                float common = vs[0];
                for (int64_t s = 1; s < visible; s++) common = vs[s] > common ? vs[s] : common;
                for (int64_t g0 = 0; g0 < group; g0 += MAX_SHARED_GROUP) { /* the heads, a few at a time */
                    const int64_t count = group - g0 < MAX_SHARED_GROUP ? group - g0 : MAX_SHARED_GROUP;
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
            }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
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
#elif defined(VECTOR_256)
        const __m256 top8 = _mm256_set1_ps(top), grid8 = _mm256_set1_ps(grid), last8 = _mm256_set1_ps(last);
        __m256d sums = _mm256_setzero_pd();
        for (; v + 8 <= vocab; v += 8) {
            const __m256 scaled = _mm256_mul_ps(_mm256_sub_ps(top8, _mm256_loadu_ps(l + v)), grid8);
            const __m256 step = _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256i index = _mm256_cvttps_epi32(_mm256_min_ps(step, last8));
            const __m256d low = _mm256_i32gather_pd(exp, _mm256_castsi256_si128(index), 8);
            const __m256d high = _mm256_i32gather_pd(exp, _mm256_extracti128_si256(index, 1), 8);
            _mm256_storeu_pd(f + v, low);
            _mm256_storeu_pd(f + v + 4, high);
            sums = _mm256_add_pd(sums, _mm256_add_pd(low, high));
        }
        double lanes[4];
        _mm256_storeu_pd(lanes, sums);
        total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
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
#elif defined(VECTOR_256)
        const __m256d share4 = _mm256_set1_pd(share), one4 = _mm256_set1_pd(1.0);
        for (; v + 4 <= vocab; v += 4)
            _mm256_storeu_pd(f + v, _mm256_add_pd(one4, _mm256_floor_pd(_mm256_mul_pd(_mm256_loadu_pd(f + v), share4))));
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

/* adaptive_bias.AdaptiveBias.run, the encoder's side: n consecutive positions of one row, whose symbols
 * are known, biased and learned in turn: for position i, bias_tables of freq[i] by the row's bias (int32,
 * width) into out[i], its total into totals[i] and its symbol's frequency into sizes[i], then bias_learn
 * with out[i]. The learning step of position i and the tables of position i + 1 share one pass over the
 * row (each entry's new bias is read at once), and the threads split every pass, meeting after each sum
 * (integers below 2^53: exact in any order). */
void bias_run(const double *freq, int32_t *bias, const double *multipliers, const int64_t *symbols, int32_t rate,
              int32_t limit, double budget, double *out, double *totals, double *sizes, int64_t n, int64_t width,
              int threads) {
    double z = 0.0, t = 0.0, share = 0.0, ratio = 0.0;
#pragma omp parallel num_threads(threads) if (threads > 1 && width >= 4096)
    for (int64_t i = 0; i <= n; i++) {
        const double *learned = i > 0 ? out + (i - 1) * width : NULL; /* the table position i - 1 coded with */
        const double *f = freq + i * width;
        double *o = out + i * width;
#pragma omp single
        {
            if (i > 0) bias[symbols[i - 1]] += rate;
            z = 0.0;
        }
        if (i == 0) {
#pragma omp for schedule(static) reduction(+ : z)
            for (int64_t v = 0; v < width; v++) {
                o[v] = (f[v] - 1.0) * multipliers[(bias[v] + limit) >> 8];
                z += o[v];
            }
        } else if (i < n) {
#pragma omp for schedule(static) reduction(+ : z)
            for (int64_t v = 0; v < width; v++) {
                const int32_t x = bias[v] - (int32_t)floor(learned[v] * ratio);
                const int32_t b = x < -limit ? -limit : x > limit ? limit : x;
                bias[v] = b;
                o[v] = (f[v] - 1.0) * multipliers[(b + limit) >> 8];
                z += o[v];
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t v = 0; v < width; v++) {
                const int32_t x = bias[v] - (int32_t)floor(learned[v] * ratio);
                bias[v] = x < -limit ? -limit : x > limit ? limit : x;
            }
            break; /* every thread reaches this at the same i */
        }
#pragma omp single
        {
            share = budget / z;
            t = 0.0;
        }
#pragma omp for schedule(static) reduction(+ : t)
        for (int64_t v = 0; v < width; v++) {
            o[v] = 1.0 + floor(o[v] * share);
            t += o[v];
        }
#pragma omp single
        {
            totals[i] = t;
            sizes[i] = o[symbols[i]];
            ratio = (double)rate / t;
        }
    }
}

/* The encoder's coding of known symbols in the mixed tables (mixer.mix_tables, then the symbol's start,
 * size and the total) without building them: row index[i] of freq (., width) mixed with lm_weight[i] and the
 * masses of row i (as find_mixed reads them); weight 1 and no masses code the table as it is. */
void code_mixed(const double *freq, const int64_t *index, const double *lm_weight, const int64_t *mass_start,
                const int64_t *mass_symbols, const double *mass_values, const int64_t *symbols, double *starts,
                double *sizes, double *totals, int64_t n, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const double *f = freq + index[i] * width;
        const double w = lm_weight[i];
        const int64_t a = symbols[i];
        double below[4] = {0.0}, above[4] = {0.0}; /* integers below 2^53: exact in any order */
        int64_t v = 0;
        for (; v + 4 <= a; v += 4)
            for (int k = 0; k < 4; k++) below[k] += mixed_frequency(f[v + k], w);
        for (; v < a; v++) below[0] += mixed_frequency(f[v], w);
        double size = mixed_frequency(f[a], w);
        for (v = a + 1; v + 4 <= width; v += 4)
            for (int k = 0; k < 4; k++) above[k] += mixed_frequency(f[v + k], w);
        for (; v < width; v++) above[0] += mixed_frequency(f[v], w);
        for (int64_t j = mass_start[i]; j < mass_start[i + 1]; j++) {
            const int64_t s = mass_symbols[j];
            if (s < a) below[1] += mass_values[j];
            else if (s == a) size += mass_values[j];
            else above[1] += mass_values[j];
        }
        const double start = (below[0] + below[1]) + (below[2] + below[3]);
        starts[i] = start;
        sizes[i] = size;
        totals[i] = start + size + ((above[0] + above[1]) + (above[2] + above[3]));
    }
}
