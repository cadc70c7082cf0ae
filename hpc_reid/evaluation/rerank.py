"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017): a dense reference for small sets and a sparse, tiled version from features.

Definition implemented by both (X = query then gallery, N = Q + G, d = the metric's distance,
neighbour lists sorted by (distance, index), i.e. ties broken by the smaller index, as a stable
sort would -- the reference code's unstable ``np.argsort`` leaves them unspecified):

1. Original distance, as the reference code: squared, each row scaled by its maximum,
   ``D[i, j] = d(i, j)^2 / max_l d(i, l)^2`` over all N. (The code divides every column by its
   maximum and transposes, which is the same for a symmetric d; :func:`rerank_dense` does exactly
   that, :func:`rerank` scales rows.) ``N(i, k)`` = the first k + 1 of row i's list (usually i
   itself and its k nearest).
2. k-reciprocal neighbours (eq. 5): ``R(i, k) = {j in N(i, k) : i in N(j, k)}``.
3. Expansion (eq. 6), with ``h = round(k1 / 2)`` (half to even, as ``np.around``):
   ``R*(i) = R(i, k1)`` plus every ``R(c, h)`` of a ``c in R(i, k1)`` for which
   ``|R(c, h) & R(i, k1)| > 2/3 |R(c, h)|`` (compared with the unexpanded ``R(i, k1)``).
4. Gaussian-kernel encoding (eq. 9): ``V[i, j] = exp(-D[i, j]) / sum_{l in R*(i)} exp(-D[i, l])``
   for j in ``R*(i)``, 0 elsewhere.
5. Local query expansion (eq. 11), only when k2 > 1 (as the code): ``V[i] <- mean of V[j]`` over
   the first k2 entries j of row i's list.
6. Jaccard distance (eq. 10, with rows of V summing to 1 so that sum max = 2 - sum min):
   ``J[i, j] = 1 - m / (2 - m)``, ``m = sum_l min(V[i, l], V[j, l])``.
7. Final distance (eq. 12): ``(1 - lambda) J[q, Q + g] + lambda D[q, Q + g]`` for query q and
   gallery g.

Both compute in the input's floating dtype (the reference code uses float32 throughout). From
features, d is that of ``pairwise_distance``: euclidean ``||a - b||`` (not squared; step 1 squares
it), cosine ``1 - cos(a, b)``; from retrieval rows, d is a
:class:`~hpc_reid.evaluation.distances.RowDistance` (``evaluation.distance``, e.g. AlignedReID's
global+local sum), computed in float32 tiles: the re-ranking of the combined distance. A distance
of one "metric" part ranks that part's columns as features.

Exactness: given the same d, :func:`rerank` makes every set decision of :func:`rerank_dense` (it
sorts on the same D values, with the same tie rule), and its values differ only in the last bits:
the weights of step 4 use per-pair dot products rather than the matrix product's. On a GPU the
matrix product's rounding depends on the tile shape, so near-ties may resolve differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from hpc_reid.evaluation.distances import Metric, RowDistance, _check_features, as_row_distance

if TYPE_CHECKING:
    from hpc_reid.config import RerankConfig

__all__ = ["rerank", "rerank_blocks", "rerank_dense", "rerank_from_config"]

# Most (query entry, gallery entry) pairs the Jaccard step expands at once (~100 bytes each).
_PAIR_BUDGET = 1 << 20


def _check_parameters(k1: int, k2: int, lambda_value: float, num_items: int | None = None):
    """Raise ValueError naming the parameter unless 1 <= k2 <= k1 < num_items, 0 <= lambda <= 1."""
    if isinstance(k1, bool) or not isinstance(k1, (int, np.integer)) or k1 < 1:
        raise ValueError(f"k1 must be an integer >= 1, got k1={k1!r}")
    if isinstance(k2, bool) or not isinstance(k2, (int, np.integer)) or not 1 <= k2 <= k1:
        raise ValueError(f"k2 must be an integer with 1 <= k2 <= k1 (k1={k1}), got k2={k2!r}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got lambda_value={lambda_value!r}")
    if num_items is not None and k1 + 1 > num_items:
        raise ValueError(
            f"k1={k1} needs at least k1 + 1 = {k1 + 1} query + gallery items, got {num_items}"
        )


# ----------------------------------------------------------------------------------------------
# Dense reference: the algorithm as written, O(N^2) memory, Python loops. Test oracle only.


def rerank_dense(
    q_g: np.ndarray | torch.Tensor,
    q_q: np.ndarray | torch.Tensor,
    g_g: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """(Q, G) re-ranked distances from the query-gallery, query-query and gallery-gallery
    distances, by the definition in the module docstring, on dense N x N arrays. Small N only."""
    q_g, q_q, g_g = (
        a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a) for a in (q_g, q_q, g_g)
    )
    num_q, num_g = q_g.shape
    if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
        raise ValueError(
            f"expected q_q ({num_q}, {num_q}) and g_g ({num_g}, {num_g}) for q_g {q_g.shape}, "
            f"got {q_q.shape} and {g_g.shape}"
        )
    _check_parameters(k1, k2, lambda_value, num_q + num_g)
    dtype = np.result_type(q_g.dtype, np.float32)
    dist = np.square(np.block([[q_q, q_g], [q_g.T, g_g]]).astype(dtype))
    original = (dist / dist.max(axis=0)).T
    num = original.shape[0]
    initial_rank = np.argsort(original, axis=1, kind="stable")

    def k_reciprocal(i: int, k: int) -> np.ndarray:
        forward = initial_rank[i, : k + 1]
        backward = initial_rank[forward, : k + 1]
        return forward[(backward == i).any(axis=1)]

    half = int(np.around(k1 / 2))
    v = np.zeros_like(original)
    for i in range(num):
        reciprocal = k_reciprocal(i, k1)
        expansion = reciprocal
        for c in reciprocal:
            candidate = k_reciprocal(c, half)
            if len(np.intersect1d(candidate, reciprocal)) > 2 / 3 * len(candidate):
                expansion = np.append(expansion, candidate)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[initial_rank[i, :k2]].mean(axis=0) for i in range(num)])
    inverted = [np.flatnonzero(v[:, col]) for col in range(num)]
    jaccard = np.empty((num_q, num), dtype=dtype)
    for i in range(num_q):
        overlap = np.zeros(num, dtype=dtype)
        for col in np.flatnonzero(v[i]):
            rows = inverted[col]
            overlap[rows] += np.minimum(v[i, col], v[rows, col])
        jaccard[i] = 1 - overlap / (2 - overlap)
    final = (1 - lambda_value) * jaccard + lambda_value * original[:num_q]
    return final[:, num_q:]


# ----------------------------------------------------------------------------------------------
# Sparse version: the same definition from features. N x N is never held: the top-(k1 + 1) lists
# come from (tile, N) distance tiles, V is stored as rows of (column, weight) (CSR, O(N k) memory),
# and the Jaccard term is accumulated per query block through an inverted index of V.


def _prepare(x: torch.Tensor, metric: Metric) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features ready for :func:`_distances`: L2-normalised (cosine) or with squared norms."""
    if metric == "cosine":
        return F.normalize(x, dim=1), None
    return x, x.pow(2).sum(dim=1)


def _distances(
    a: torch.Tensor,
    a_sq: torch.Tensor | None,
    x: torch.Tensor,
    x_sq: torch.Tensor | None,
    metric: Metric,
) -> torch.Tensor:
    """(A, X) distances by the formulas of ``pairwise_distance``, in the features' dtype."""
    out = a @ x.t()
    if metric == "cosine":
        return out.neg_().add_(1.0)
    return out.mul_(-2.0).add_(a_sq[:, None] + x_sq).clamp_(min=0).sqrt_()


def _pair_distances(
    x: torch.Tensor,
    x_sq: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    metric: Metric,
) -> torch.Tensor:
    """d(x[rows[p]], x[cols[p]]) for every pair p, a bounded number of gathered rows at a time.

    Only values come from here, never a neighbour decision: rounding that differs from the matrix
    product's in the last bits changes no set."""
    out = x.new_empty(rows.numel())
    chunk = max(1, (1 << 22) // max(1, x.shape[1]))
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        dot = torch.linalg.vecdot(x[r], x[c])
        if metric == "cosine":
            out[s : s + chunk] = dot.neg_().add_(1.0)
        else:
            sq = dot.mul_(-2.0).add_(x_sq[r] + x_sq[c])
            out[s : s + chunk] = sq.clamp_(min=0).sqrt_()
    return out


def _stable_smallest(m: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k smallest entries of each row, by (value, index): a stable argsort's
    first k, without sorting whole rows."""
    if k >= m.shape[1]:
        return torch.sort(m, dim=1, stable=True).indices[:, :k]
    vals, idx = m.topk(k + 1, dim=1, largest=False, sorted=True)
    # Where the (k+1)-th value is larger than the k-th, the first k are the right set (topk's
    # order among equal values is unspecified): order them by (value, index).
    idx = idx[:, :k].sort(dim=1).values
    idx = idx.gather(1, m.gather(1, idx).sort(dim=1, stable=True).indices)
    tied = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
    if tied.numel():
        # The k-th value continues past k: take all entries <= it and break ties by index.
        sub = m[tied]
        cand = sub <= vals[tied, k - 1 : k]
        rows, cols = cand.nonzero(as_tuple=True)  # row-major: columns ascending within a row
        order = torch.sort(sub[rows, cols], stable=True).indices
        order = order[torch.sort(rows[order], stable=True).indices]  # row, value, column
        rows, cols = rows[order], cols[order]
        counts = cand.sum(dim=1)
        rank = (
            torch.arange(rows.numel(), device=m.device) - (torch.cumsum(counts, 0) - counts)[rows]
        )
        idx[tied] = cols[rank < k].view(-1, k)
    return idx


class _MetricItems:
    """d between the items X (queries then gallery) as ``pairwise_distance`` computes it from
    features, in their dtype: every block by one matrix product, pairs by dot products."""

    def __init__(self, x: torch.Tensor, metric: Metric):
        self.x, self.x_sq = _prepare(x, metric)
        self.metric = metric
        self.dtype, self.device, self.n = x.dtype, x.device, x.shape[0]

    def block(self, start: int, stop: int, first: int = 0) -> torch.Tensor:
        """(stop - start, N - first): d(X[start:stop], X[first:])."""
        x_sq = self.x_sq
        a_sq = None if x_sq is None else x_sq[start:stop]
        b_sq = None if x_sq is None else x_sq[first:]
        return _distances(self.x[start:stop], a_sq, self.x[first:], b_sq, self.metric)

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return _pair_distances(self.x, self.x_sq, rows, cols, self.metric)


class _RowItems:
    """d between the items X (queries then gallery) by a :class:`RowDistance` of their rows, in
    float32 tiles of ``tile`` rows. Pairs come from the same tiles (``rows`` ascending), so every
    value is the one the neighbour lists were sorted on."""

    def __init__(self, x: torch.Tensor, distance: RowDistance, tile: int):
        self.x, self.distance, self.tile = x, distance, tile
        self.dtype, self.device, self.n = torch.float32, x.device, x.shape[0]

    def block(self, start: int, stop: int, first: int = 0) -> torch.Tensor:
        return self.distance(self.x[start:stop], self.x[first:], tile=self.tile)

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.numel(), dtype=torch.float32, device=self.device)
        starts = list(range(0, self.n, self.tile))
        edges = torch.searchsorted(rows, torch.tensor([*starts, self.n]).to(rows)).tolist()
        for i, s in enumerate(starts):
            lo, hi = edges[i], edges[i + 1]
            if lo < hi:
                d = self.block(s, min(s + self.tile, self.n))
                out[lo:hi] = d[rows[lo:hi] - s, cols[lo:hi]]
        return out


def _neighbours(items, k: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) neighbour lists on the original distance D (step 1) and the row maxima of d^2."""
    n = items.n
    nbr = torch.empty(n, k, dtype=torch.long, device=items.device)
    row_max = torch.empty(n, dtype=items.dtype, device=items.device)
    for s in range(0, n, tile):
        d2 = items.block(s, min(s + tile, n))
        d2.mul_(d2)
        row_max[s : s + tile] = d2.amax(dim=1)
        # Sorted on D itself, not d: squaring and scaling can merge neighbouring values into ties.
        nbr[s : s + tile] = _stable_smallest(d2.div_(row_max[s : s + tile, None]), k)
    return nbr, row_max


def _reciprocal(nbr: torch.Tensor, tile: int) -> torch.Tensor:
    """mask[i, p]: whether i is in the list of its neighbour nbr[i, p] (eq. 5)."""
    mask = torch.empty(nbr.shape, dtype=torch.bool, device=nbr.device)
    for s in range(0, nbr.shape[0], tile):
        own = torch.arange(s, min(s + tile, nbr.shape[0]), device=nbr.device)
        mask[s : s + tile] = (nbr[nbr[s : s + tile]] == own[:, None, None]).any(dim=-1)
    return mask


def _expansion_sets(
    nbr: torch.Tensor, recip: torch.Tensor, recip_half: torch.Tensor, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """R*(i) of every i (step 3) as CSR (row pointers, ascending columns)."""
    n, k = nbr.shape
    h = recip_half.shape[1]
    rows_at_once = max(1, min(tile, (1 << 24) // (k * k * h)))
    cols, counts = [], []
    for s in range(0, n, rows_at_once):
        forward, rec = nbr[s : s + rows_at_once], recip[s : s + rows_at_once]
        own = torch.where(rec, forward, -1)  # R(i, k1); -1 matches nothing
        cand = nbr[forward, :h]  # N(c, h) of every c in N(i, k1)
        cand_valid = recip_half[forward]  # ... of which R(c, h)
        inside = (cand[..., None] == own[:, None, None, :]).any(dim=-1) & cand_valid
        # |R(c,h) & R(i,k1)| > 2/3 |R(c,h)| in integers: for these small sizes the reference's
        # float 2/3 * n rounds to exactly 2n/3 whenever that is an integer, so they agree.
        accept = rec & (3 * inside.sum(dim=-1) > 2 * cand_valid.sum(dim=-1))
        slots = (
            torch.cat(
                [
                    torch.where(rec, forward, n),
                    torch.where(accept[..., None] & cand_valid, cand, n).flatten(1),
                ],
                dim=1,
            )
            .sort(dim=1)
            .values
        )
        keep = slots < n
        keep[:, 1:] &= slots[:, 1:] != slots[:, :-1]
        cols.append(slots[keep])
        counts.append(keep.sum(dim=1))
    return _row_pointers(torch.cat(counts)), torch.cat(cols)


def _row_pointers(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _expand(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For runs [starts[r], starts[r] + lengths[r]): (run of each position, the positions)."""
    run = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    offset = (
        torch.arange(run.numel(), device=lengths.device) - (torch.cumsum(lengths, 0) - lengths)[run]
    )
    return run, starts[run] + offset


def _local_query_expansion(
    crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, nbr: torch.Tensor, k2: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V[i] <- mean of V[j] over the first k2 of row i's list (step 5), CSR in and out."""
    n = nbr.shape[0]
    lengths = crow[1:] - crow[:-1]
    cols, vals, counts = [], [], []
    for s in range(0, n, tile):
        src = nbr[s : s + tile, :k2].reshape(-1)
        run, pos = _expand(crow[src], lengths[src])
        owner = torch.div(run, k2, rounding_mode="floor")
        keys, inverse = torch.unique(owner * n + col[pos], sorted=True, return_inverse=True)
        # index_add_ adds the k2 rows in list order, as numpy's mean does.
        summed = val.new_zeros(keys.numel()).index_add_(0, inverse, val[pos])
        cols.append(keys % n)
        vals.append(summed / k2)
        counts.append(torch.bincount(keys // n, minlength=src.numel() // k2))
    return _row_pointers(torch.cat(counts)), torch.cat(cols), torch.cat(vals)


def _overlap(
    crow: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    start: int,
    stop: int,
    index: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    num_g: int,
) -> torch.Tensor:
    """(B, G) sums of min(V[q, l], V[g, l]) for queries start..stop, through the inverted index
    (column pointers, counts, gallery rows, values) of V's gallery rows: only shared columns."""
    col_ptr, col_count, g_rows, g_vals = index
    out = val.new_zeros((stop - start) * num_g)
    lo, hi = int(crow[start]), int(crow[stop])
    owner = torch.repeat_interleave(
        torch.arange(stop - start, device=col.device), crow[start + 1 : stop + 1] - crow[start:stop]
    )
    cols, vals = col[lo:hi], val[lo:hi]
    lengths = col_count[cols]
    ends = torch.cumsum(lengths, 0).cpu()
    a = 0
    while a < cols.numel():  # entries in chunks of about _PAIR_BUDGET expanded pairs
        base = int(ends[a - 1]) if a else 0
        b = max(a + 1, int(torch.searchsorted(ends, base + _PAIR_BUDGET, right=True)))
        run, pos = _expand(col_ptr[cols[a:b]], lengths[a:b])
        mins = torch.minimum(vals[a:b][run], g_vals[pos])
        out.index_add_(0, owner[a:b][run] * num_g + g_rows[pos], mins)
        a = b
    return out.view(stop - start, num_g)


def _feature_dtype(qf: torch.Tensor, gf: torch.Tensor) -> torch.dtype:
    dtype = torch.promote_types(qf.dtype, gf.dtype)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def rerank_blocks(
    qf: torch.Tensor,
    gf: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric | RowDistance = "euclidean",
    tile: int = 1024,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Re-ranked distances of query (Q, D) and gallery (G, D) features, ``tile`` queries at a time:
    yields ``(start, block)`` with ``block`` the (B, G) rows start..start + B of :func:`rerank`.

    Definition: the module docstring (equal to :func:`rerank_dense` on ``d`` computed as
    ``pairwise_distance`` does, in the features' dtype, float64 kept; or as the
    :class:`~hpc_reid.evaluation.distances.RowDistance` ``metric`` does, in float32, for the rows of
    several retrieval parts). Runs on the features' device in O(N k) memory besides one (tile, N)
    distance tile; the work before the first block (all neighbour lists and V) is done at the first
    ``next``. Argument errors are raised at the call.
    """
    _check_features(qf, gf)
    qf, gf, distance = as_row_distance(metric).restrict(qf, gf)
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got tile={tile}")
    _check_parameters(k1, k2, lambda_value, qf.shape[0] + gf.shape[0])
    return _rerank_blocks(qf, gf, int(k1), int(k2), float(lambda_value), distance, tile)


def _rerank_blocks(
    qf: torch.Tensor,
    gf: torch.Tensor,
    k1: int,
    k2: int,
    lambda_value: float,
    distance: RowDistance,
    tile: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    num_q, num_g = qf.shape[0], gf.shape[0]
    metric = distance.whole_row_metric
    if metric is not None:
        dtype = _feature_dtype(qf, gf)
        items = _MetricItems(torch.cat([qf.to(dtype), gf.to(qf.device, dtype)]), metric)
    else:
        items = _RowItems(torch.cat([qf, gf.to(qf.device)]), distance, tile)
    n = items.n
    nbr, row_max = _neighbours(items, k1 + 1, tile)
    half = round(k1 / 2)  # Python rounds half to even, as np.around in the reference
    recip = _reciprocal(nbr, tile)
    recip_half = _reciprocal(nbr[:, : half + 1].contiguous(), tile)
    crow, col = _expansion_sets(nbr, recip, recip_half, tile)
    del recip, recip_half
    # Step 4: Gaussian-kernel weights exp(-D), normalised over each R*(i).
    rows = torch.repeat_interleave(torch.arange(n, device=items.device), crow[1:] - crow[:-1])
    d2 = items.pairs(rows, col)
    weight = torch.exp(-(d2.mul_(d2).div_(row_max[rows])))
    val = weight / weight.new_zeros(n).index_add_(0, rows, weight)[rows]
    if k2 != 1:
        crow, col, val = _local_query_expansion(crow, col, val, nbr, k2, tile)
        rows = torch.repeat_interleave(torch.arange(n, device=items.device), crow[1:] - crow[:-1])
    del nbr, d2, weight
    # Inverted index of the gallery rows of V: for column l, the gallery items g with V[g, l] > 0.
    gallery = rows >= num_q
    g_cols = col[gallery]
    order = torch.sort(g_cols, stable=True).indices
    col_count = torch.bincount(g_cols, minlength=n)
    index = (
        torch.cumsum(col_count, 0) - col_count,
        col_count,
        (rows[gallery] - num_q)[order],
        val[gallery][order],
    )
    del rows, gallery, g_cols, order
    for s in range(0, num_q, tile):
        e = min(s + tile, num_q)
        overlap = _overlap(crow, col, val, s, e, index, num_g)
        jaccard = 2 - overlap  # then 1 - overlap / (2 - overlap) in place (same rounding)
        jaccard = torch.div(overlap, jaccard, out=jaccard).neg_().add_(1)
        del overlap
        original = items.block(s, e, num_q)
        original.mul_(original).div_(row_max[s:e, None])
        yield s, jaccard.mul_(1 - lambda_value).add_(original.mul_(lambda_value))


def rerank(
    qf: torch.Tensor,
    gf: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric | RowDistance = "euclidean",
    tile: int = 1024,
) -> torch.Tensor:
    """(Q, G) k-reciprocal re-ranked distances of query and gallery features (the module
    docstring's definition), on the features' device, in the blocks' dtype; see
    :func:`rerank_blocks` to rank them block by block without holding Q x G."""
    out = None
    for start, block in rerank_blocks(qf, gf, k1, k2, lambda_value, metric, tile):
        if out is None:
            out = block.new_empty((qf.shape[0], gf.shape[0]))
        out[start : start + block.shape[0]] = block
    return out


def rerank_from_config(
    qf: torch.Tensor,
    gf: torch.Tensor,
    config: RerankConfig,
    metric: Metric | RowDistance,
    tile: int = 1024,
) -> torch.Tensor:
    """:func:`rerank` with ``k1``, ``k2`` and ``lambda_value`` of an ``evaluation.rerank`` config
    section; ``metric`` is ``evaluation.metric`` or the ``evaluation.distance`` of retrieval rows
    (:meth:`~hpc_reid.evaluation.distances.RowDistance.from_config`). Whether to re-rank
    (``enabled``) is the caller's choice."""
    return rerank(qf, gf, config.k1, config.k2, config.lambda_value, metric, tile)
