/* The hot loop of the Cython ranking kernel (rank_cy.pyx). For L = 16 or 32 positives of a query,
 * sorted by (distance, gallery index) -- t[k] and idx[k] -- count the gallery items that precede
 * each in that order, the order of a stable sort of the query's distance row:
 *
 *     out[k] = #{g < idx[k] : d[g] <= t[k]} + #{idx[k] <= g < n : d[g] < t[k]},   k < L.
 *
 * "x <= t" is "x < nextafter(t, +inf)", so each lane compares against one threshold that drops to
 * t[k] when the scan reaches idx[k]: the gallery is scanned in at most L + 1 segments between the
 * sorted idx[k], and inside a segment every item costs one SIMD compare and one subtract per 16
 * lanes (constant trip counts, independent lanes: GCC/Clang vector extensions). No histogram
 * scatter, no horizontal sum, exact on ties.
 *
 * On x86-64 Linux with GCC the functions are compiled for AVX-512, AVX2 and the baseline and the
 * loader picks the best the CPU has (target_clones / ifunc): one build runs on every node of a
 * heterogeneous cluster. Kept in C because Cython cannot attach target_clones. Padding lanes
 * (t[k] = -inf, idx[k] = 0) count nothing.
 */
#ifndef HPC_REID_RANK_COUNT_H
#define HPC_REID_RANK_COUNT_H

#include <math.h>
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RC_CLONES
#endif

/* GCC/Clang vector extensions: 16-lane vectors of thresholds and counters; each clone lowers them
 * to its widest registers (one AVX-512 register, two AVX2 or four SSE ones per float vector). */
typedef float rc_f32x16 __attribute__((vector_size(64)));
typedef int rc_i32x16 __attribute__((vector_size(64)));
typedef double rc_f64x16 __attribute__((vector_size(128)));
typedef long long rc_i64x16 __attribute__((vector_size(128)));

/* Items are taken 8 at a time: a block whose items all lie at or beyond the largest threshold
 * costs one vector compare (most blocks, with a useful model); the others go through the lanes
 * without a per-item branch, which random distances would mispredict near the last positive. */
#define RC_BLOCK 8

#define RC_DEFINE(NAME, T, VT, VI, NEXTAFTER, NV)                                              \
    RC_CLONES static void NAME(const T *d, ptrdiff_t n, const T *t, const ptrdiff_t *idx,       \
                               int *out) {                                                      \
        enum { L = 16 * NV };                                                                   \
        VT tt[NV];                                                                              \
        VI acc[NV];                                                                             \
        int order[L];                                                                           \
        T last = -(T)INFINITY;                                                                  \
        for (int v = 0; v < NV; v++) acc[v] = (VI){0};                                          \
        for (int k = 0; k < L; k++) {                                                           \
            tt[k / 16][k % 16] =                                                                \
                t[k] == -(T)INFINITY ? t[k] : NEXTAFTER(t[k], (T)INFINITY);                     \
            last = tt[k / 16][k % 16] > last ? tt[k / 16][k % 16] : last;                       \
            int j = k; /* lanes by ascending idx: insertion sort */                             \
            while (j > 0 && idx[order[j - 1]] > idx[k]) {                                       \
                order[j] = order[j - 1];                                                        \
                j--;                                                                            \
            }                                                                                   \
            order[j] = k;                                                                       \
        }                                                                                       \
        ptrdiff_t g = 0;                                                                        \
        for (int s = 0; s <= L; s++) {                                                          \
            ptrdiff_t end = s < L ? idx[order[s]] : n;                                          \
            end = end < n ? end : n;                                                            \
            for (; g + RC_BLOCK <= end; g += RC_BLOCK) {                                        \
                int any = 0;                                                                    \
                for (int i = 0; i < RC_BLOCK; i++) any |= d[g + i] < last;                      \
                if (!any) continue;                                                             \
                for (int i = 0; i < RC_BLOCK; i++) {                                            \
                    VT xv = tt[0] * 0 + d[g + i]; /* broadcast */                               \
                    for (int v = 0; v < NV; v++) acc[v] -= (VI)(xv < tt[v]); /* true: -1 */     \
                }                                                                               \
            }                                                                                   \
            for (; g < end; g++) {                                                              \
                VT xv = tt[0] * 0 + d[g];                                                       \
                for (int v = 0; v < NV; v++) acc[v] -= (VI)(xv < tt[v]);                        \
            }                                                                                   \
            if (s < L) {                                                                        \
                int k = order[s];                                                               \
                tt[k / 16][k % 16] = t[k]; /* from idx[k] on, ties come after positive k */     \
            }                                                                                   \
        }                                                                                       \
        for (int k = 0; k < L; k++) out[k] = (int)acc[k / 16][k % 16];                          \
    }

RC_DEFINE(rc_count16_f32, float, rc_f32x16, rc_i32x16, nextafterf, 1)
RC_DEFINE(rc_count32_f32, float, rc_f32x16, rc_i32x16, nextafterf, 2)
RC_DEFINE(rc_count16_f64, double, rc_f64x16, rc_i64x16, nextafter, 1)
RC_DEFINE(rc_count32_f64, double, rc_f64x16, rc_i64x16, nextafter, 2)

#endif
