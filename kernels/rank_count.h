/* The hot loop of the Cython ranking kernel (rank_cy.pyx). For RC_LANES positives of a query,
 * sorted by (distance, gallery index) -- t[k] and idx[k] -- count the gallery items that precede
 * each in that order, the order of a stable sort of the query's distance row:
 *
 *     out[k] = #{g < idx[k] : d[g] <= t[k]} + #{idx[k] <= g < n : d[g] < t[k]},   k < RC_LANES.
 *
 * "x <= t" is "x < nextafter(t, +inf)", so each lane compares against one threshold that drops to
 * t[k] when the scan reaches idx[k]: the gallery is scanned in at most RC_LANES + 1 segments
 * between the sorted idx[k], and inside a segment every item costs one SIMD compare and one
 * subtract for all lanes (the inner loop has a constant trip count and independent lanes: GCC/Clang
 * vector extensions). No histogram scatter, no horizontal sum, exact on ties; the only branch
 * skips items beyond the largest threshold, which cannot precede any positive.
 *
 * On x86-64 Linux with GCC the function is compiled for AVX-512, AVX2 and the baseline and the
 * loader picks the best the CPU has (target_clones / ifunc): one build runs on every node of a
 * heterogeneous cluster. Kept in C because Cython cannot attach target_clones. Padding lanes
 * (t[k] = -inf, idx[k] = 0) count nothing.
 */
#ifndef HPC_REID_RANK_COUNT_H
#define HPC_REID_RANK_COUNT_H

#include <math.h>
#include <stddef.h>

#define RC_LANES 16

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RC_CLONES
#endif

/* GCC/Clang vector extensions: one 16-lane vector of thresholds and two of counters; each clone
 * lowers them to its widest registers (one AVX-512 register, two AVX2 or four SSE ones). */
typedef float rc_f32x16 __attribute__((vector_size(64)));
typedef int rc_i32x16 __attribute__((vector_size(64)));
typedef double rc_f64x16 __attribute__((vector_size(128)));
typedef long long rc_i64x16 __attribute__((vector_size(128)));

#define RC_DEFINE(NAME, T, VT, VI, NEXTAFTER)                                              \
    RC_CLONES static void NAME(const T *d, ptrdiff_t n, const T *t, const ptrdiff_t *idx,       \
                               int *out) {                                                      \
        VT tt;                                                                                  \
        VI acc = {0};                                                                           \
        int order[RC_LANES];                                                                    \
        T last = -(T)INFINITY;                                                                  \
        for (int k = 0; k < RC_LANES; k++) {                                                    \
            tt[k] = t[k] == -(T)INFINITY ? t[k] : NEXTAFTER(t[k], (T)INFINITY);                 \
            last = tt[k] > last ? tt[k] : last;                                                 \
            int j = k; /* lanes by ascending idx: insertion sort of 16 */                       \
            while (j > 0 && idx[order[j - 1]] > idx[k]) {                                       \
                order[j] = order[j - 1];                                                        \
                j--;                                                                            \
            }                                                                                   \
            order[j] = k;                                                                       \
        }                                                                                       \
        ptrdiff_t g = 0;                                                                        \
        for (int s = 0; s <= RC_LANES; s++) {                                                   \
            ptrdiff_t end = s < RC_LANES ? idx[order[s]] : n;                                   \
            end = end < n ? end : n;                                                            \
            for (; g < end; g++) {                                                              \
                T x = d[g];                                                                     \
                if (x >= last) continue;                                                        \
                VT xv = tt * 0 + x; /* broadcast */                                             \
                acc -= (VI)(xv < tt); /* a true lane compares to -1 */                          \
            }                                                                                   \
            if (s < RC_LANES) {                                                                 \
                int k = order[s];                                                               \
                tt[k] = t[k]; /* from idx[k] on, ties with t[k] come after positive k */        \
            }                                                                                   \
        }                                                                                       \
        for (int k = 0; k < RC_LANES; k++) out[k] = (int)acc[k];                                \
    }

RC_DEFINE(rc_count_f32, float, rc_f32x16, rc_i32x16, nextafterf)
RC_DEFINE(rc_count_f64, double, rc_f64x16, rc_i64x16, nextafter)

#endif
