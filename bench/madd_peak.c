/* The CPU's int16 multiply-add instruction at its best: what no product kernel can beat (bench/roofline.py).
 *
 * Ten chains of sums in registers, no memory: each step adds to a sum the pairwise products of its own
 * int16 halves and a weight vector (vpmaddwd then vpaddd with AVX2, 16 multiply-adds; one vpdpwssd with
 * AVX-512 VNNI, or vpmaddwd + vpaddd on 512 bits without it, 32), the instructions products.c's tiles issue
 * per pair of weight rows. Chains, so that no two products are alike for the compiler to merge; ten of
 * them, so that the instruction's latency is covered and its throughput is what is measured.
 * Built with llmpipe's flags and shared header (-march=native decides the width).
 */
#include "simd.h"
#include <omp.h>

#define PEAK_SUMS 10

/* Multiply-adds one vector instruction does here (0: no vector form, nothing to measure). */
int madd_width(void) {
#ifdef VECTOR_512
    return 32;
#elif defined(__AVX2__)
    return 16;
#else
    return 0;
#endif
}

/* Multiply-add instructions in one round of madd_peak, on each thread. */
int madd_round(void) { return PEAK_SUMS; }

/* `steps` rounds of PEAK_SUMS multiply-add instructions on each of `threads` threads; returns a checksum
 * (so that nothing is optimised away). */
int64_t madd_peak(int64_t steps, int threads) {
    int64_t checksum = 0;
#pragma omp parallel num_threads(threads) reduction(+ : checksum)
    {
#ifdef VECTOR_512
        __m512i w = _mm512_set1_epi16(3), sums[PEAK_SUMS];
        for (int j = 0; j < PEAK_SUMS; j++) sums[j] = _mm512_set1_epi32(j + 1);
        for (int64_t i = 0; i < steps; i++) {
            __asm__ volatile("" : "+v"(w)); /* a new weight every round, as far as the compiler knows */
            for (int j = 0; j < PEAK_SUMS; j++) sums[j] = multiply_add_pairs(sums[j], sums[j], w);
        }
        for (int j = 0; j < PEAK_SUMS; j++) checksum += _mm512_reduce_add_epi32(sums[j]);
#elif defined(__AVX2__)
        __m256i w = _mm256_set1_epi16(3), sums[PEAK_SUMS];
        for (int j = 0; j < PEAK_SUMS; j++) sums[j] = _mm256_set1_epi32(j + 1);
        for (int64_t i = 0; i < steps; i++) {
            __asm__ volatile("" : "+x"(w)); /* a new weight every round, as far as the compiler knows */
            for (int j = 0; j < PEAK_SUMS; j++) sums[j] = _mm256_add_epi32(sums[j], _mm256_madd_epi16(sums[j], w));
        }
        for (int j = 0; j < PEAK_SUMS; j++) checksum += _mm256_extract_epi32(sums[j], 0);
#else
        checksum += steps;
#endif
    }
    return checksum;
}
