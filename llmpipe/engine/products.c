/* The exact engine's matrix products: int16-range rows times int8 weights (every matmul of the network),
 * in exact integer arithmetic (llmpipe/engine/exact_weights.py and integer_ops.py have the torch path).
 *
 * Built with attention.c and rows.c into one library by llmpipe/engine/kernels.py and called through
 * ctypes. Every sum is an integer with a bound that keeps it inside its accumulator (stated at each
 * function), and every float operation is the torch path's, in its order, so results are identical on any
 * machine and thread count. Why: torch has no exact int8 product that is fast on every CPU.
 */
#include "products.h"

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

/* Columns col.. col+nr of k-pairs 0..depth/2 of a PLAIN or TRANSPOSED weight as int16 pairs, the layout
 * vpmaddwd reads: for pair p, 32 values: (w[2p][c], w[2p+1][c]) for c < 8, then for 8 <= c < 16 (zeros
 * past nr and past depth). PAIRED weights hold that order already (product_pack_pair). */
static void product_pack_rest(const product_job *job, int64_t col, int nr, int64_t p, int16_t *packed);

/* Pair p of the strip of columns col.. col + nr of a PAIRED weight, packed: its bytes (w[2p][c], w[2p+1][c])
 * are the packed order already, 16 of them widened per 8 columns. */
static inline void product_pack_pair(const product_job *job, int64_t p, int64_t col, int nr, int16_t *dst) {
    const int8_t *src = job->w + (p * job->cols + col) * 2;
#ifdef __AVX2__
    if (nr == PRODUCT_COLS) {
        _mm256_storeu_si256((__m256i *)dst, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)src)));
        _mm256_storeu_si256((__m256i *)(dst + 16), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + 16))));
        return;
    }
#endif
    for (int c = 0; c < PRODUCT_COLS; c++)
        for (int half = 0; half < 2; half++) dst[(c / 8) * 16 + (c % 8) * 2 + half] = c < nr ? src[2 * c + half] : 0;
}

static void product_pack(const product_job *job, int64_t col, int nr, int16_t *packed) {
    const int64_t pairs = (job->depth + 1) / 2;
    int64_t p = 0;
    if (job->layout == PRODUCT_TRANSPOSED) { /* column c is row col + c of w: its pairs are consecutive bytes */
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
    if (job->layout == PRODUCT_PAIRED) { /* pair by pair: one run of 32 * count bytes each */
        for (int64_t p = 0; p < pairs; p++)
            for (int j = 0; j < count; j++) {
                const int64_t c = col + j * PRODUCT_COLS;
                const int nr = job->cols - c < PRODUCT_COLS ? (int)(job->cols - c) : PRODUCT_COLS;
                product_pack_pair(job, p, c, nr, packed + j * pairs * 32 + p * 32);
            }
        return;
    }
    const int partial = last < count - 1 || (job->cols - col) < (int64_t)count * PRODUCT_COLS;
    if (job->layout == PRODUCT_TRANSPOSED || count == 1 || partial) {
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

#ifdef VECTOR_512
/* Micro-tile of `count` (1 or 2, a constant where inlined) strips: rows row.. row + mr against the strip
 * packed at `first` (columns col.. col + nr) and, for 2, the one at `second` (the next 16; then nr = 16).
 * A strip's pair p is one 512-bit row of 16 columns x 2, summed with one multiply_add_pairs (vpdpwssd with
 * VNNI) per row and pair; with two strips each row's pair is broadcast once for both, half the loads per
 * multiply-add. The sums are the 256-bit path's: int32 over blocks of PRODUCT_DEPTH, int64 across them,
 * stored strip by strip. */
static inline __attribute__((always_inline)) void product_tile_strips(const product_job *job, int64_t row,
                                                                     const int mr, const int16_t *first,
                                                                     const int16_t *second, int64_t col, int nr,
                                                                     const int count) {
    const int16_t *packed[2] = {first, second};
    const int width[2] = {nr, PRODUCT_COLS};
    const int64_t pairs = (job->depth + 1) / 2;
    int64_t sums[2][PRODUCT_ROWS][PRODUCT_COLS];
    for (int h = 0; h < count; h++)
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < PRODUCT_COLS; j++) sums[h][i][j] = 0;
    const int64_t block = (job->block + 1) / 2;
    for (int64_t p0 = 0; p0 < pairs; p0 += block) {
        const int64_t p1 = p0 + block < pairs ? p0 + block : pairs;
        int32_t part[2][PRODUCT_ROWS][PRODUCT_COLS];
        __m512i acc[2][PRODUCT_ROWS];
        for (int h = 0; h < count; h++)
            for (int i = 0; i < mr; i++) acc[h][i] = _mm512_setzero_si512();
        for (int64_t p = p0; p < p1; p++) {
            __m512i b[2];
            for (int h = 0; h < count; h++) b[h] = _mm512_loadu_si512((const void *)(packed[h] + p * 32));
            for (int i = 0; i < mr; i++) {
                int32_t pair;
                memcpy(&pair, job->a + (row + i) * job->lda + 2 * p, sizeof pair);
                const __m512i x = _mm512_set1_epi32(pair);
                for (int h = 0; h < count; h++) acc[h][i] = multiply_add_pairs(acc[h][i], x, b[h]);
            }
        }
        for (int h = 0; h < count; h++)
            for (int i = 0; i < mr; i++) _mm512_storeu_si512((void *)part[h][i], acc[h][i]);
        if (p0 == 0 && p1 == pairs) { /* one block: the int32 sums are the sums */
            for (int h = 0; h < count; h++) product_store32(job, row, mr, col + h * PRODUCT_COLS, width[h], part[h]);
            return;
        }
        for (int h = 0; h < count; h++)
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < PRODUCT_COLS; j++) sums[h][i][j] += part[h][i][j];
    }
    for (int h = 0; h < count; h++) product_store(job, row, mr, col + h * PRODUCT_COLS, width[h], sums[h]);
}
#endif

/* Micro-tile (row.. row + mr, col.. col + nr): the exact sums a[row + i] . w[:, col + j] from the packed
 * strip, in int32 over blocks of PRODUCT_DEPTH and int64 across them, then stored. */
static inline __attribute__((always_inline)) void product_tile(const product_job *job, int64_t row, const int mr,
                                                              const int16_t *packed, int64_t col, int nr) {
#ifdef VECTOR_512
    product_tile_strips(job, row, mr, packed, packed, col, nr, 1);
#else
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
#endif
}

#define PRODUCT_TILE_CASE(n)                             \
    case n:                                              \
        product_tile(job, row, n, strip, col, nr);       \
        break;

#ifdef VECTOR_512
#define PRODUCT_PAIR_CASE(n)                                                          \
    case n:                                                                           \
        product_tile_strips(job, row, n, strip, strip + strip_size, col, PRODUCT_COLS, 2); \
        break;
#endif


#ifdef __AVX2__
/* Pairs p.. p + count of a PAIRED weight's rows times rows 0.. mr, columns 0.. `vector_cols` (a multiple of
 * 8), added to the int32 sums in `part` (mr x width): each 16 bytes of weights widened once for all rows,
 * `count` pairs summed in registers before one pass over `part` (in L1 or L2). */
static inline __attribute__((always_inline)) void product_small_pass(const product_job *job, const int16_t *a,
                                                                    const int mr, int64_t p, const int count,
                                                                    int64_t vector_cols, int64_t width,
                                                                    int32_t *part) {
    __m256i x[PRODUCT_SMALL_PASS][PRODUCT_SMALL_ROWS];
    for (int g = 0; g < count; g++)
        for (int i = 0; i < mr; i++) {
            int32_t pair;
            memcpy(&pair, a + i * job->lda + 2 * (p + g), sizeof pair);
            x[g][i] = _mm256_set1_epi32(pair);
        }
    const int8_t *rows = job->w + p * job->cols * 2;
    for (int64_t c = 0; c < vector_cols; c += 8) {
        __m256i b[PRODUCT_SMALL_PASS];
        for (int g = 0; g < count; g++)
            b[g] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rows + (g * job->cols + c) * 2)));
        for (int i = 0; i < mr; i++) {
            __m256i total = _mm256_madd_epi16(x[0][i], b[0]);
            for (int g = 1; g < count; g++) total = _mm256_add_epi32(total, _mm256_madd_epi16(x[g][i], b[g]));
            __m256i *sum = (__m256i *)(part + i * width + c);
            _mm256_storeu_si256(sum, _mm256_add_epi32(_mm256_loadu_si256(sum), total));
        }
    }
}
#endif

/* Rows row0.. row0 + mr (at most PRODUCT_SMALL_ROWS of them) times pairs pair0.. pair1 of a PAIRED
 * weight's rows, all columns, into `sums` (mr x width int64): the weights read straight from w, front to
 * back (one stream through memory), every column's int32 sums waiting in `part` (mr x width) for the next
 * pass. A decoding step of one or a few rows reads every weight once: a packed copy (product_run) then
 * costs more than it saves. int32 sums never span more than one of job->block's blocks, as in
 * product_tile. */
static inline __attribute__((always_inline)) void product_small_pairs(const product_job *job, int64_t row0,
                                                                     const int mr, int64_t pair0, int64_t pair1,
                                                                     int64_t width, int32_t *part, int64_t *sums) {
    const int64_t block = (job->block + 1) / 2;
    const int16_t *a = job->a + row0 * job->lda;
    for (int64_t p0 = pair0; p0 < pair1; p0 = (p0 / block + 1) * block) {
        const int64_t p1 = (p0 / block + 1) * block < pair1 ? (p0 / block + 1) * block : pair1;
        memset(part, 0, sizeof(int32_t) * mr * width);
#ifdef __AVX2__
        const int64_t vector_cols = job->cols / 8 * 8;
        int64_t p = p0;
        for (; p + PRODUCT_SMALL_PASS <= p1; p += PRODUCT_SMALL_PASS)
            product_small_pass(job, a, mr, p, PRODUCT_SMALL_PASS, vector_cols, width, part);
        for (; p < p1; p++) product_small_pass(job, a, mr, p, 1, vector_cols, width, part);
#else
        const int64_t vector_cols = 0;
#endif
        for (int64_t q = p0; q < p1; q++) { /* the columns the vectors left (all of them without AVX2) */
            const int8_t *w = job->w + q * job->cols * 2;
            for (int i = 0; i < mr; i++) {
                const int32_t x0 = a[i * job->lda + 2 * q], x1 = a[i * job->lda + 2 * q + 1];
                for (int64_t c = vector_cols; c < job->cols; c++)
                    part[i * width + c] += x0 * w[2 * c] + x1 * w[2 * c + 1];
            }
        }
        if (p0 == pair0)
            for (int64_t k = 0; k < mr * width; k++) sums[k] = part[k];
        else
            for (int64_t k = 0; k < mr * width; k++) sums[k] += part[k];
    }
    if (pair0 >= pair1) memset(sums, 0, sizeof(int64_t) * mr * width); /* more threads than pairs */
}

#define PRODUCT_SMALL_CASE(n)                                                       \
    case n:                                                                         \
        product_small_pairs(job, row0, n, pair0, pair1, width, part, mine);         \
        break;

/* A job of at most PRODUCT_SMALL_JOB_ROWS rows, no packing: PRODUCT_SMALL_ROWS rows at a time (each such
 * pass reads the weights again, which up to PRODUCT_SMALL_JOB_ROWS rows costs less than packing them), each
 * thread takes one run of w's row pairs (one stream through memory), then the threads' exact sums are added
 * and stored strip by strip, all in one parallel region (a decoding step makes hundreds of these products).
 * Returns -1 when its scratch sums could not be had (nothing written). */
static int product_run_small(const product_job *job, int threads) {
    const int64_t strips = (job->cols + PRODUCT_COLS - 1) / PRODUCT_COLS, width = strips * PRODUCT_COLS;
    const int64_t pairs = (job->depth + 1) / 2;
    const int64_t most = job->rows < PRODUCT_SMALL_ROWS ? job->rows : PRODUCT_SMALL_ROWS;
    const int parallel = threads > 1 && most * job->depth * job->cols >= PARALLEL_MIN;
    const int64_t runs = parallel ? threads : 1;
    int64_t *sums = malloc(sizeof(int64_t) * (runs * most * width + 1));
    int32_t *parts = malloc(sizeof(int32_t) * (runs * most * width + 1));
    if (sums == NULL || parts == NULL) {
        free(sums);
        free(parts);
        return -1;
    }
#pragma omp parallel num_threads(threads) if (parallel)
    for (int64_t row0 = 0; row0 < job->rows; row0 += PRODUCT_SMALL_ROWS) {
        const int64_t mr = job->rows - row0 < PRODUCT_SMALL_ROWS ? job->rows - row0 : PRODUCT_SMALL_ROWS;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < runs; t++) {
            const int64_t pair0 = pairs * t / runs, pair1 = pairs * (t + 1) / runs;
            int32_t *part = parts + t * mr * width;
            int64_t *mine = sums + t * mr * width;
            switch (mr) {
                PRODUCT_SMALL_CASE(1)
                PRODUCT_SMALL_CASE(2)
                PRODUCT_SMALL_CASE(3)
                PRODUCT_SMALL_CASE(4)
                PRODUCT_SMALL_CASE(5)
                PRODUCT_SMALL_CASE(6)
                PRODUCT_SMALL_CASE(7)
                PRODUCT_SMALL_CASE(8)
            }
        }
#pragma omp for schedule(static)
        for (int64_t s = 0; s < strips; s++) {
            const int64_t col = s * PRODUCT_COLS;
            int64_t strip[PRODUCT_SMALL_ROWS][PRODUCT_COLS];
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < PRODUCT_COLS; j++) {
                    int64_t total = 0;
                    for (int64_t t = 0; t < runs; t++) total += sums[(t * mr + i) * width + col + j];
                    strip[i][j] = total;
                }
            const int nr = job->cols - col < PRODUCT_COLS ? (int)(job->cols - col) : PRODUCT_COLS;
            product_store(job, row0, (int)mr, col, nr, strip);
        }
    }
    free(sums);
    free(parts);
    return 0;
}

int64_t product_scratch_size(int64_t depth) { return ((depth + 1) / 2) * 2 * PRODUCT_COLS * PRODUCT_PACKED_STRIPS; }

int product_run(const product_job *job, int threads, int16_t *scratch) {
    if (job->rows == 0) return 0;
    if (job->rows <= PRODUCT_SMALL_JOB_ROWS && job->layout == PRODUCT_PAIRED && product_run_small(job, threads) == 0)
        return 0;
    const int64_t strips = (job->cols + PRODUCT_COLS - 1) / PRODUCT_COLS;
    const int64_t row_tiles = (job->rows + PRODUCT_TILE_ROWS - 1) / PRODUCT_TILE_ROWS;
    const int64_t wanted = 4 * (int64_t)threads; /* enough tiles that threads finish together */
    int64_t per = (strips * row_tiles + wanted - 1) / wanted;
    per = per < 1 ? 1 : (per > 16 ? 16 : per);
    const int64_t col_tiles = (strips + per - 1) / per;
    const int64_t strip_size = ((job->depth + 1) / 2) * 2 * PRODUCT_COLS;
    const int parallel = threads > 1 && job->rows * job->depth * job->cols >= PARALLEL_MIN;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (parallel) reduction(| : failed)
    {
        int16_t *packed = scratch != NULL && !parallel ? scratch
                                                       : malloc(sizeof(int16_t) * product_scratch_size(job->depth));
        failed = packed == NULL;
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t rt = 0; rt < row_tiles; rt++)
            for (int64_t ct = 0; ct < col_tiles; ct++) {
                if (failed) continue;
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
#ifdef VECTOR_512
                    /* this strip and the next, both full and packed together: as one pair tile */
                    if (slot + 1 < PRODUCT_PACKED_STRIPS && s + 1 < s1 && job->cols - col >= 2 * PRODUCT_COLS) {
                        for (int64_t row = row0; row < row1; row += PRODUCT_ROWS) {
                            switch (row1 - row < PRODUCT_ROWS ? row1 - row : PRODUCT_ROWS) {
                                PRODUCT_PAIR_CASE(1)
                                PRODUCT_PAIR_CASE(2)
                                PRODUCT_PAIR_CASE(3)
                                PRODUCT_PAIR_CASE(4)
                                PRODUCT_PAIR_CASE(5)
                                PRODUCT_PAIR_CASE(6)
                            }
                        }
                        s++; /* the next strip is done */
                        continue;
                    }
#endif
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
        if (packed != scratch) free(packed);
    }
    return failed ? -1 : 0;
}

/* ExactWeight's float32 output (rows, cols) for integer-valued float32 q (rows, depth) in [-32639, 32639]
 * with row scales (rows, 1), weights w (depth, cols) int8 in the PAIRED layout (products.h), scales (cols,),
 * bias (cols,) or NULL; with mean (rows,) and row_sums (cols,) float64 (LayerNorm),
 * y = f32(f64(D) - mean * row_sums) instead.
 * Returns 0, or -1 when scratch memory could not be had (the output is then incomplete). */
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
    const int mode = mean != NULL ? PRODUCT_MEAN : PRODUCT_DIRECT;
    product_job job = {a, lda, rows, depth, cols, w, PRODUCT_PAIRED, block, mode, NULL, pending_at, pending,
                       row_scale, scale, bias, mean, row_sums, out};
    int failed = product_run(&job, threads, NULL);
    if (slots && !failed) { /* the rows past the bound: H from their hi parts, then the spec's two roundings */
        for (int64_t r = 0; r < rows; r++) {
            const int64_t slot = pending_at[r];
            if (slot < 0) continue;
            slot_rows[slot] = r;
            for (int64_t k = 0; k < lda; k++) highs[slot * lda + k] = (int16_t)((a[r * lda + k] + 128) >> 8);
        }
        product_job split = {highs, lda, slots, depth, cols, w, PRODUCT_PAIRED, depth, PRODUCT_SPLIT, slot_rows,
                             NULL,  pending, row_scale, scale, bias, NULL, NULL, out};
        failed = product_run(&split, threads, NULL);
    }
    free(pending), free(highs), free(slot_rows), free(a), free(pending_at);
    return failed ? -1 : 0;
}

