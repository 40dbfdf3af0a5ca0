/* The codec's hot loops in C: frequency tables from logits, the mixed tables' totals and symbol search
 * (decoder) and coding positions (encoder), and the adaptive bias (the codec modules have the torch
 * path of each).
 *
 * Built on first use by llmpipe/codec/kernels.py (cc -O3 -march=native -fopenmp -ffp-contract=off) and
 * called through ctypes. Every sum here is of integers below 2^53 held in float64 (exact in any order)
 * and every other step the torch path's IEEE operation, so tables are identical on any machine and
 * thread count.
 */
#include "simd.h"

/* codec/frequencies.py: frequency_tables: logits (rows, vocab) float32 -> freq (rows, width) float64
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


/* The decoder's symbol search (codec/frequencies.py: find_symbols on mixer.mix_tables' output) without
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
