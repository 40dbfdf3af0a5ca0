/* The exact products' tiles (products.c), shared with attention.c, whose long passes run as products. */
#ifndef LLMPIPE_ENGINE_PRODUCTS_H
#define LLMPIPE_ENGINE_PRODUCTS_H
#include "kernels.h"

/* ---- exact_transformer.ExactWeight: int16-range rows times int8 weights, fused with the output's scaling ----
 *
 * The spec (FORMAT.md, "Matmul") splits q = 256 hi + lo and rounds f32(f32(H) * 256 + f32(L)) with the
 * exact H = hi . w, L = lo . w. Here the exact D = q . w = 256 H + L comes from one int16 product per
 * weight (AVX2: vpmaddwd, 16 per instruction; AVX-512: 32, as vpdpwssd with VNNI) instead of two int8
 * ones. Where |H| and |L| are below 2^24, f32(H) and f32(L) are exact and the spec's float is f32(D),
 * rounded once; that holds for a row when 128 sum|hi| and 128 sum|lo| are below 2^24 (always for
 * K <= 1,024, and for the rows of small models all but always). Rows past that bound take H from a
 * second product of their hi parts, and L = D - 256 H: the spec's two roundings, exactly. LayerNorm rows
 * need only D (FORMAT.md: f64(256 H + L)).
 * int32 sums of at most PRODUCT_DEPTH products (|a| <= 32767, |w| <= 128) stay below 2^31; longer
 * reductions add such sums in int64. Attention's long passes use the same tiles (attention_tiles). */
#define PRODUCT_ROWS 6        /* a micro-tile: rows ... */
#define PRODUCT_COLS 16       /* ... times columns (two 8-lane vectors of int32 sums) */
#define PRODUCT_DEPTH 512     /* 512 * 32767 * 128 < 2^31 (rows of |a| <= 32767) */
#define PRODUCT_TILE_ROWS 96  /* rows sharing one packed column strip */
#define PRODUCT_SMALL_ROWS 8  /* rows product_run_small takes through the weights at a time */
#define PRODUCT_SMALL_JOB_ROWS 24 /* jobs of at most this many rows read the weights unpacked, a pass of
                                   * PRODUCT_SMALL_ROWS at a time (a decoding step of 10 rows took half the
                                   * time of packed tiles, of 16 rows 0.75, of 24 0.95, of 32 the same) */
#define PRODUCT_SMALL_PASS 8  /* pairs of weight rows product_run_small adds to its sums in one pass over them */
#define PRODUCT_PACKED_STRIPS 4 /* strips packed together: a 64-byte line of each weight row */
#define PRODUCT_EXACT_SUM (1 << 17) /* 128 * sum|part| < 2^24 */
#define PRODUCT_INT32_SUM (1 << 24) /* 128 * sum|a| < 2^31 */

enum product_mode { PRODUCT_DIRECT, PRODUCT_MEAN, PRODUCT_SPLIT };

/* How w holds the (depth, cols) weight. PAIRED is the network's weights (exact_weights.pair_rows): rows 2p
 * and 2p + 1 interleaved column by column, (depth + 1) / 2 rows of (w[2p][c], w[2p+1][c]) byte pairs, a
 * zero row after an odd depth, so that 16 bytes widen to the int16 pairs of 8 columns vpmaddwd reads in
 * one instruction (a decoding step reads every weight once: widening is most of its arithmetic). */
enum product_layout { PRODUCT_PLAIN, PRODUCT_TRANSPOSED, PRODUCT_PAIRED };

typedef struct {
    const int16_t *a; /* (rows, lda) int16, lda even, zero past depth */
    int64_t lda, rows, depth, cols;
    const int8_t *w;  /* PLAIN: (depth, cols), attention's values; TRANSPOSED: (cols, depth), its keys;
                       * PAIRED: ((depth + 1) / 2, cols, 2), the network's weights */
    int layout;       /* enum product_layout */
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

/* All of a job: tiles of PRODUCT_TILE_ROWS rows times a run of column strips, shared out between threads.
 * `scratch`: NULL (each thread makes its own), or, for one thread, room for product_scratch_size(depth)
 * values (attention's tiles: hundreds of products per pass; one thread with its scratch cannot fail).
 * Returns 0, or -1 when scratch memory could not be had (the output is then incomplete). */
int product_run(const product_job *job, int threads, int16_t *scratch);

/* The int16 values of product_run's scratch for a reduction of `depth`: the packed column strips. */
int64_t product_scratch_size(int64_t depth);

#endif
