# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Exact first-positive rank, AP and INP of a block of queries, by counting instead of sorting.

The CPU kernel behind the "cython" ranking backend (hpc_reid/evaluation/ranking.py, which documents
the protocol and the formulas; ARCHITECTURE.md, "Exact ranking metrics without sorting"). Per query,
in parallel OpenMP threads without the GIL:

1. collect the kept positives (same pid, other camera) from the query pid's gallery members and sort
   them by (distance, gallery index), the order a stable full sort would give them;
2. count, for each positive, the gallery items that precede it in that order: up to VECTOR
   positives, 16 or 32 of them per pass over the gallery in SIMD lanes (kernels/rank_count.h: one
   compare and one subtract per item and 16 lanes, exact on ties); with more, one pass that finds each item's
   place among the positives by a branchless binary search and adds it to a histogram. Items
   farther than the last positive cannot precede one and cost one comparison (most items, with a
   useful model). The query pid's own items (positives, junk) are counted like negatives and then
   taken back, which keeps the hot loops free of pid tests;
3. positive k's rank among the kept items is k + 1 + #negatives before it.

O(G p / 16) per query up to VECTOR positives, O(G log p) above, and O(p) scratch per thread.
The (B, G) matrix is read in place (float32 or float64, unit stride along rows); AP and INP are
computed in float64 exactly as the numpy backend does, so the backends agree bit for bit.
"""

cimport openmp
from cython.parallel cimport prange, threadid
from libc.math cimport INFINITY
from libc.stdlib cimport free, malloc, qsort

import numpy as np

cdef extern from "rank_count.h" nogil:
    # out[k] = #items before (t[k], idx[k]) in (distance, index) order, for 16 or 32 lanes
    void rc_count16_f32(const float *d, Py_ssize_t n, const float *t, const Py_ssize_t *idx, int *out)
    void rc_count32_f32(const float *d, Py_ssize_t n, const float *t, const Py_ssize_t *idx, int *out)
    void rc_count16_f64(
        const double *d, Py_ssize_t n, const double *t, const Py_ssize_t *idx, int *out
    )
    void rc_count32_f64(
        const double *d, Py_ssize_t n, const double *t, const Py_ssize_t *idx, int *out
    )

# Up to VECTOR positives, per-positive counts in SIMD lanes (rank_count.h: 16 positives in one
# pass over the gallery, or 32 a pass; one compare and one subtract per item and 16 lanes); more
# positives use the histogram of binary searches. Scratch is padded to a multiple of PAD entries.
cdef enum:
    VECTOR = 64
    PAD = 32

ctypedef fused floating:
    float
    double


cdef struct Positive:
    double d  # exact: every float32 is a float64, so comparisons keep the same order and ties
    Py_ssize_t idx


cdef inline bint _before(double d1, Py_ssize_t i1, double d2, Py_ssize_t i2) noexcept nogil:
    """(d1, i1) < (d2, i2): the (distance, index) order of a stable sort."""
    return (d1 < d2) | ((d1 == d2) & (i1 < i2))  # bitwise: no branch


cdef int _compare(const void *a, const void *b) noexcept nogil:
    cdef const Positive *x = <const Positive *>a
    cdef const Positive *y = <const Positive *>b
    if _before(x.d, x.idx, y.d, y.idx):
        return -1
    if _before(y.d, y.idx, x.d, x.idx):
        return 1
    return 0


cdef void _sort_positives(Positive *pos, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef Positive item
    if n > 32:
        qsort(pos, n, sizeof(Positive), _compare)  # keys are distinct, so stability is moot
        return
    for i in range(1, n):  # a query has few positives: insertion sort
        item = pos[i]
        j = i
        while j > 0 and _before(item.d, item.idx, pos[j - 1].d, pos[j - 1].idx):
            pos[j] = pos[j - 1]
            j -= 1
        pos[j] = item


cdef inline Py_ssize_t _lower_bound(const floating *a, Py_ssize_t n, floating x) noexcept nogil:
    """#{k < n : a[k] < x} of ascending ``a``: a branchless binary search (Khuong & Morin, "Array
    Layouts for Comparison-Based Searching", 2017), so consecutive searches overlap in the CPU
    instead of mispredicting."""
    cdef Py_ssize_t base = 0, half
    if n == 0:
        return 0
    while n > 1:
        half = n >> 1
        base = base + half if a[base + half] < x else base
        n -= half
    return base + (a[base] < x)


cdef inline Py_ssize_t _positives_before(
    const floating *pd, const Py_ssize_t *pidx, Py_ssize_t n, floating x, Py_ssize_t g
) noexcept nogil:
    """How many of the n sorted positives precede gallery item g at distance x."""
    cdef Py_ssize_t lo, base, half
    lo = _lower_bound(pd, n, x)
    if lo == n or pd[lo] != x:
        return lo
    # Tied with positives from lo on: those with a smaller index precede; search by (d, index).
    base, n = lo, n - lo
    while n > 1:
        half = n >> 1
        base = base + half if _before(pd[base + half], pidx[base + half], x, g) else base
        n -= half
    return base + _before(pd[base], pidx[base], x, g)


cdef double _pairwise_sum(const double *a, Py_ssize_t n) noexcept nogil:
    """numpy's pairwise summation of float64 (``np.add.reduce``), step for step, so that AP is
    bit-identical to the numpy backend's ``np.mean``, and sharded or tiled results can be compared
    exactly whichever backend produced them."""
    cdef double r[8]
    cdef double res
    cdef Py_ssize_t i, j, half
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[i]
        return res
    if n <= 128:
        for j in range(8):
            r[j] = a[j]
        i = 8
        while i < n - n % 8:
            for j in range(8):
                r[j] += a[i + j]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        while i < n:
            res += a[i]
            i += 1
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_sum(a, half) + _pairwise_sum(a + half, n - half)


cdef void _count_preceding(
    const floating *d,
    Py_ssize_t num_g,
    const floating *pd,
    const Py_ssize_t *pidx,
    Py_ssize_t n,
    int *counted,
    Py_ssize_t *count,
) noexcept nogil:
    """count[k] = how many gallery items precede positive k in (distance, index) order, for
    n <= VECTOR sorted positives (``pd`` padded with -inf, ``pidx`` with 0, to a multiple of
    PAD): exact on ties."""
    cdef Py_ssize_t c = 0, k
    if n <= 16:
        if floating is float:
            rc_count16_f32(d, num_g, pd, pidx, counted)
        else:
            rc_count16_f64(d, num_g, pd, pidx, counted)
    while 16 < n and c < n:  # one pass over the gallery per 32 positives
        if floating is float:
            rc_count32_f32(d, num_g, pd + c, pidx + c, counted + c)
        else:
            rc_count32_f64(d, num_g, pd + c, pidx + c, counted + c)
        c += 32
    for k in range(n):
        count[k] = counted[k]


cdef Py_ssize_t _rank_one(
    const floating[:] d,
    Py_ssize_t q_cam,
    const Py_ssize_t[:] g_cams,
    const Py_ssize_t[:] members,
    Positive *pos,
    floating *pd,
    Py_ssize_t *pidx,
    Py_ssize_t *count,
    int *counted,
    double *precision,
    double *ap,
    double *inp,
) noexcept nogil:
    """First-positive rank of one query (0 if it has no kept positive); sets ap and inp.

    ``members``: the gallery items of the query's pid, ascending. Scratch: ``pos`` and
    ``precision`` hold len(members) entries, ``pd``, ``pidx``, ``count`` and ``counted``
    len(members) + PAD.
    """
    cdef Py_ssize_t n = 0, j, k, g, rank = 0, first = 0, num_g = d.shape[0]
    cdef floating last
    for k in range(members.shape[0]):
        g = members[k]
        if g_cams[g] != q_cam:
            pos[n].d = d[g]
            pos[n].idx = g
            n += 1
    if n == 0:
        return 0
    _sort_positives(pos, n)
    for k in range(n):
        pd[k] = <floating>pos[k].d  # exact: it was read from d
        pidx[k] = pos[k].idx
        count[k] = 0
    for k in range(n, (n + PAD - 1) // PAD * PAD):
        pd[k] = -INFINITY  # padding lanes: no item is below, and they never set the skip bound
        pidx[k] = 0
    # Every item is counted as if it were a negative (no pid test in the hot loops), then the
    # query pid's own items (positives and junk) are taken back. Items farther than the last
    # positive cannot precede one and cost one comparison (most items, with a useful model).
    last = pd[n - 1]
    if n <= VECTOR:
        _count_preceding(&d[0], num_g, pd, pidx, n, counted, count)
        for k in range(members.shape[0]):
            g = members[k]
            if d[g] <= last:
                for j in range(n):
                    count[j] -= _before(d[g], g, pd[j], pidx[j])
    else:  # a histogram of binary searches: O(G log n) instead of O(G n)
        count[n] = 0  # items tied with the last positive but after it: counted, never used
        for g in range(num_g):
            if d[g] <= last:
                count[_positives_before(pd, pidx, n, d[g], g)] += 1
        for k in range(members.shape[0]):
            g = members[k]
            if d[g] <= last:
                count[_positives_before(pd, pidx, n, d[g], g)] -= 1
        for k in range(1, n):
            count[k] += count[k - 1]
    # count[k]: negatives before positive k, so its rank among the kept items is k + 1 + count[k]
    for k in range(n):
        rank = k + 1 + count[k]
        if k == 0:
            first = rank
        precision[k] = <double>(k + 1) / <double>rank
    ap[0] = _pairwise_sum(precision, n) / n
    inp[0] = <double>n / <double>rank
    return first


def _rank_block(
    const floating[:, :] distmat,
    const int[:] q_label,
    const Py_ssize_t[:] q_cams,
    const Py_ssize_t[:] g_cams,
    const Py_ssize_t[:] by_label,
    const Py_ssize_t[:] starts,
    Py_ssize_t max_members,
    Py_ssize_t[:] first,
    double[:] ap,
    double[:] inp,
):
    cdef Py_ssize_t q, t, num_q = distmat.shape[0], scratch = max_members + PAD
    cdef int label, threads = openmp.omp_get_max_threads()
    # One scratch slice per thread, allocated with the GIL so that a failure raises here.
    cdef Positive *pos = <Positive *>malloc(threads * scratch * sizeof(Positive))
    cdef floating *pd = <floating *>malloc(threads * scratch * sizeof(floating))
    cdef Py_ssize_t *pidx = <Py_ssize_t *>malloc(threads * scratch * sizeof(Py_ssize_t))
    cdef Py_ssize_t *count = <Py_ssize_t *>malloc(threads * scratch * sizeof(Py_ssize_t))
    cdef double *precision = <double *>malloc(threads * scratch * sizeof(double))
    cdef int *counted = <int *>malloc(threads * scratch * sizeof(int))
    try:
        if not (pos and pd and pidx and count and precision and counted):
            raise MemoryError(f"rank_cy: no scratch for {threads} threads x {scratch} positives")
        for q in prange(num_q, nogil=True, schedule="guided", num_threads=threads):
            label = q_label[q]
            if label < 0:
                first[q] = 0  # the query pid is absent from the gallery
                continue
            t = threadid() * scratch
            first[q] = _rank_one(
                distmat[q],
                q_cams[q],
                g_cams,
                by_label[starts[label] : starts[label + 1]],
                pos + t,
                pd + t,
                pidx + t,
                count + t,
                counted + t,
                precision + t,
                &ap[q],
                &inp[q],
            )
    finally:
        free(pos)
        free(pd)
        free(pidx)
        free(count)
        free(precision)
        free(counted)


def rank_block(distmat, q_pids, g_pids, q_camids, g_camids):
    """(first_rank, ap, inp) of each query row of ``distmat`` (B, G), float32 or float64.

    ``first_rank`` is int64, 0 for a query without a kept positive, whose ``ap`` and ``inp`` are NaN.
    The matrix is not copied when it is float32/float64 with unit stride along rows.
    """
    distmat = np.asarray(distmat)
    if distmat.dtype not in (np.float32, np.float64):
        distmat = distmat.astype(np.float64)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (B, G), got shape {distmat.shape}")
    if distmat.shape[1] and distmat.strides[1] != distmat.itemsize:
        distmat = np.ascontiguousarray(distmat)
    num_q, num_g = distmat.shape
    # Gallery pids as labels 0..L-1, and each label's gallery items in ascending index.
    uniq, g_label = np.unique(np.asarray(g_pids), return_inverse=True)
    g_label = g_label.astype(np.intc).reshape(-1)
    by_label = np.argsort(g_label, kind="stable").astype(np.intp)
    starts = np.zeros(uniq.size + 1, dtype=np.intp)
    np.cumsum(np.bincount(g_label, minlength=uniq.size), out=starts[1:])
    q_pids = np.asarray(q_pids)
    q_label = np.searchsorted(uniq, q_pids).astype(np.intc)
    found = q_label < uniq.size
    found[found] = uniq[q_label[found]] == q_pids[found]
    q_label[~found] = -1
    max_members = int(np.diff(starts).max()) if uniq.size else 0
    first = np.zeros(num_q, dtype=np.intp)
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    if num_q and num_g:
        _rank_block(
            distmat,
            q_label,
            np.asarray(q_camids).astype(np.intp),
            np.asarray(g_camids).astype(np.intp),
            by_label,
            starts,
            max_members,
            first,
            ap,
            inp,
        )
    return first.astype(np.int64, copy=False), ap, inp
