"""Exact ranking metrics (CMC, mAP, mINP) of a query-gallery distance matrix, without sorting rows.

Protocol (Market-1501; Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015):
for query q, gallery items with the same pid *and* the same camera are removed ("junk"); queries
with no remaining positive are *invalid* and left out of every mean. Ties are broken by gallery
index, as a stable sort would, so that the ranks are exact and reproducible:

    rank(j) = 1 + #{kept g : d[g] < d[j] or (d[g] == d[j] and g < j)}

- CMC@k: fraction of valid queries whose best-ranked positive has rank <= k. Defined for every
  k <= ``max_rank`` even when a query keeps fewer than k gallery items (once found, stays found).
- AP: mean over the positives, in rank order (i = 1..n), of the precision i / rank_i.
- INP: n / rank of the last positive (Ye et al., "Deep Learning for Person Re-identification: A
  Survey and Outlook", TPAMI 2021, eq. 16); mINP is its mean.

Only the positives' ranks matter, so a query never sorts its gallery: it sorts its few positives by
(distance, index) and counts, with one binary search per kept negative, how many negatives fall
before each positive -- O(G log p) per query, O(G) memory, never a Q x G index matrix (see
"Exact ranking metrics without sorting" in ARCHITECTURE.md).

The computation is split in two so that kernels and sharding can plug in behind the same calls:
:func:`query_ranks` gives per-query results (:class:`QueryRanks`) for any block of query rows, and
:func:`combine` turns the concatenated per-query results into the final :class:`RankResult`.
:func:`rank_metrics` is the two in one call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

try:  # compiled from kernels/rank_cy.pyx by `pip install -e .`; absent from an unbuilt checkout
    from hpc_reid.evaluation import _rank_cy
except ImportError:
    _rank_cy = None

__all__ = [
    "BACKENDS",
    "QueryRanks",
    "RankResult",
    "combine",
    "query_ranks",
    "rank_metrics",
]

SUMMARY_RANKS = (1, 5, 10, 20)


@dataclass(frozen=True)
class QueryRanks:
    """Per-query results, the unit that tiles, shards and kernels produce and :func:`combine` uses.

    ``first_rank`` has shape (Q, R): the rank of the best-ranked positive of each query in each of
    R evaluated galleries (R = 1 normally, R = ``repeats`` under the CUHK03 old protocol); 0 for an
    invalid query. ``ap`` and ``inp`` are NaN for invalid queries; ``valid`` says which are valid.
    """

    first_rank: np.ndarray
    ap: np.ndarray
    inp: np.ndarray
    valid: np.ndarray

    @staticmethod
    def concatenate(parts: Sequence[QueryRanks]) -> QueryRanks:
        """Join the results of consecutive query blocks, in order."""
        if not parts:
            raise ValueError("QueryRanks.concatenate needs at least one part, got none")
        return QueryRanks(
            first_rank=np.concatenate([p.first_rank for p in parts]),
            ap=np.concatenate([p.ap for p in parts]),
            inp=np.concatenate([p.inp for p in parts]),
            valid=np.concatenate([p.valid for p in parts]),
        )


@dataclass(frozen=True)
class RankResult:
    """CMC, mAP and mINP over the valid queries, with the per-query values they come from.

    ``cmc[k - 1]`` is CMC@k (a fraction, float64, length ``max_rank``). ``ap`` and ``inp`` (length
    Q) are NaN for invalid queries (no positive left after the junk removal), which ``valid`` marks
    False; ``mAP`` and ``mINP`` are means over the valid queries only.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    ap: np.ndarray
    inp: np.ndarray
    valid: np.ndarray

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def summary(self) -> dict[str, float]:
        """``rank-1/5/10/20`` (those within ``max_rank``), ``mAP`` and ``mINP``, as fractions."""
        out = {f"rank-{k}": float(self.cmc[k - 1]) for k in SUMMARY_RANKS if k <= len(self.cmc)}
        out["mAP"] = self.mAP
        out["mINP"] = self.mINP
        return out


# A backend ranks a block of query rows under the standard protocol. Arguments: distmat (B, G)
# float array, then q_pids, g_pids, q_camids, g_camids; returns QueryRanks with first_rank (B, 1).
RankingBackend = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], QueryRanks]


def _query_numpy(d: np.ndarray, pos: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """1-based ranks of the kept positives of one query, in rank order, by counting.

    ``d`` is the query's distance row, ``pos`` its same-pid mask, ``keep`` its non-junk mask.
    """
    pos_idx = np.flatnonzero(pos & keep)  # ascending, so a stable sort breaks ties by index
    order = np.argsort(d[pos_idx], kind="stable")
    pos_idx = pos_idx[order]
    pos_d = d[pos_idx]
    if pos_idx.size == 0:
        return pos_idx
    neg_idx = np.flatnonzero(keep & ~pos)
    neg_d = d[neg_idx]
    # before[n]: how many positives precede negative n in the (distance, index) order; first by
    # distance alone. pos_d[before] >= neg_d, so a tie is where they are equal.
    before = np.searchsorted(pos_d, neg_d, side="left")
    tied = np.flatnonzero(pos_d[np.minimum(before, pos_d.size - 1)] == neg_d)
    if tied.size:
        # A negative at the same distance as a group of equal positives goes after those with a
        # smaller index. Keys group * G + index are ascending along the sorted positives (indices
        # ascend within a group), so one search counts the positives of earlier groups plus the
        # smaller-index positives of the negative's own group.
        group = np.concatenate(([0], np.cumsum(pos_d[1:] != pos_d[:-1])))
        key = group * d.size + pos_idx
        neg_key = group[before[tied]] * d.size + neg_idx[tied]
        before[tied] = np.searchsorted(key, neg_key, side="left")
    # Negatives before the positive at sorted position k: those with before <= k.
    negs_before = np.cumsum(np.bincount(before, minlength=pos_idx.size + 1))[: pos_idx.size]
    return np.arange(1, pos_idx.size + 1) + negs_before


def _ranks_numpy(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
) -> QueryRanks:
    """Reference backend: one query at a time, vectorised across the gallery."""
    num_q = distmat.shape[0]
    first = np.zeros((num_q, 1), dtype=np.int64)
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    for q in range(num_q):
        pos = g_pids == q_pids[q]
        keep = ~(pos & (g_camids == q_camids[q]))
        ranks = _query_numpy(distmat[q], pos, keep)
        if ranks.size == 0:
            continue
        first[q, 0] = ranks[0]
        ap[q] = np.mean(np.arange(1, ranks.size + 1) / ranks)
        inp[q] = ranks.size / ranks[-1]
    return QueryRanks(first_rank=first, ap=ap, inp=inp, valid=first[:, 0] > 0)


def _ranks_cython(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
) -> QueryRanks:
    """The Cython kernel (kernels/rank_cy.pyx): the same counting, queries in OpenMP threads."""
    first, ap, inp = _rank_cy.rank_block(distmat, q_pids, g_pids, q_camids, g_camids)
    return QueryRanks(first_rank=first[:, None], ap=ap, inp=inp, valid=first > 0)


def _ranks_torch(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    device: str = "cpu",
) -> QueryRanks:
    """The torch ranker (ranking_torch.py) on ``device``, fed 4096 query rows at a time."""
    from hpc_reid.evaluation.ranking_torch import query_ranks_torch  # it imports this module

    if not distmat.flags.writeable:  # torch.from_numpy warns on read-only arrays
        distmat = distmat.copy()
    rows = range(0, max(distmat.shape[0], 1), 4096)  # one (empty) part for an empty block
    return QueryRanks.concatenate(
        [
            query_ranks_torch(
                torch.from_numpy(distmat[s : s + 4096]).to(device),
                q_pids[s : s + 4096],
                g_pids,
                q_camids[s : s + 4096],
                g_camids,
            )
            for s in rows
        ]
    )


# Name -> backend: "numpy" (reference), "torch" (CPU tensors), "cython" when the kernel is built,
# "cuda" (the torch ranker on the GPU) when a GPU is visible. All agree bit for bit.
BACKENDS: dict[str, RankingBackend] = {"numpy": _ranks_numpy, "torch": _ranks_torch}
if _rank_cy is not None:
    BACKENDS["cython"] = _ranks_cython
if torch.cuda.is_available():
    BACKENDS["cuda"] = partial(_ranks_torch, device="cuda")
_AUTO_ORDER = ("cuda", "cython", "numpy")


_warned_no_kernel = False


def _resolve_backend(backend: str) -> RankingBackend:
    global _warned_no_kernel
    if backend == "auto":
        backend = next(name for name in _AUTO_ORDER if name in BACKENDS)
        if backend == "numpy" and not _warned_no_kernel:
            _warned_no_kernel = True
            warnings.warn(
                "the Cython ranking kernel (hpc_reid.evaluation._rank_cy) is not built, so "
                "evaluation uses the slower numpy backend; reinstall with `pip install -e .` "
                "(needs a C compiler) to build it",
                RuntimeWarning,
                stacklevel=3,
            )
    if backend not in BACKENDS:
        available = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"unknown ranking backend {backend!r}; available: {available}")
    return BACKENDS[backend]


def _cuhk03_first_ranks(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    valid: np.ndarray,
    repeats: int,
    seed: int,
    query_start: int,
) -> np.ndarray:
    """Rank of the sampled positive in ``repeats`` single-shot galleries per query, (B, repeats).

    The random choice, fixed so that any implementation can reproduce it: gallery identities are
    taken in ascending pid order, each with its kept members (after the junk removal) in ascending
    gallery index; query q (global index ``query_start + row``) uses
    ``rng = np.random.default_rng([seed, q])`` and draws
    ``picks = rng.integers(0, counts, size=(repeats, num_identities))``, so in repeat r identity i
    is represented by its kept member number ``picks[r, i]``. Per-query generators make the draw
    independent of how queries are tiled or sharded. Invalid queries draw nothing and get rank 0.
    """
    uniq, inverse, counts = np.unique(g_pids, return_inverse=True, return_counts=True)
    by_pid = np.argsort(inverse, kind="stable")  # gallery indices grouped by pid, ascending within
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    first = np.zeros((distmat.shape[0], repeats), dtype=np.int64)
    for row in np.flatnonzero(valid):
        d = distmat[row]
        i_q = np.searchsorted(uniq, q_pids[row])
        kept_q = by_pid[starts[i_q] : starts[i_q] + counts[i_q]]
        kept_q = kept_q[g_camids[kept_q] != q_camids[row]]
        kept_counts = counts.copy()
        kept_counts[i_q] = kept_q.size
        rng = np.random.default_rng([seed, query_start + int(row)])
        picks = rng.integers(0, kept_counts, size=(repeats, uniq.size))
        chosen = by_pid[starts + picks]  # (repeats, identities) gallery indices
        p = kept_q[picks[:, i_q]]
        neg = np.delete(chosen, i_q, axis=1)
        d_p, d_n = d[p][:, None], d[neg]
        before = (d_n < d_p) | ((d_n == d_p) & (neg < p[:, None]))
        first[row] = 1 + before.sum(axis=1)
    return first


def query_ranks(
    distmat: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    backend: str = "auto",
    cuhk03_old_protocol: bool = False,
    repeats: int = 10,
    seed: int = 0,
    query_start: int = 0,
) -> QueryRanks:
    """Per-query results for a block of query rows (``distmat`` is (B, G)); see :func:`combine`.

    ``distmat`` may be a tensor: a CUDA one with backend "auto" or "cuda" is ranked where it is by
    the torch ranker (the same numbers as every backend, without copying B x G to the host), except
    under the CUHK03 old protocol, whose draws need the host's block; any other is copied to the
    host and ranked by ``backend``.

    ``query_start`` is the global index of the block's first query; it only seeds the CUHK03 old
    protocol's random galleries, so that a tiled or sharded evaluation draws the same ones.
    """
    on_device = (
        isinstance(distmat, torch.Tensor)
        and distmat.is_cuda
        and backend in ("auto", "cuda")
        and not cuhk03_old_protocol
    )
    if not on_device:
        distmat = distmat.cpu().numpy() if isinstance(distmat, torch.Tensor) else distmat
        distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    for name, arr, n in (
        ("q_pids", q_pids, num_q),
        ("q_camids", q_camids, num_q),
        ("g_pids", g_pids, num_g),
        ("g_camids", g_camids, num_g),
    ):
        if arr.shape != (n,):
            raise ValueError(
                f"{name} has shape {arr.shape}, expected ({n},) for a {num_q} x {num_g} distmat"
            )
    if on_device:
        if torch.isnan(distmat).any():
            raise ValueError("distmat contains NaN; ranks are undefined")
        from hpc_reid.evaluation.ranking_torch import query_ranks_torch  # it imports this module

        return query_ranks_torch(distmat, q_pids, g_pids, q_camids, g_camids)
    if distmat.size and np.isnan(distmat.min()):  # min propagates NaN; no (B, G) mask
        raise ValueError("distmat contains NaN; ranks are undefined")
    result = _resolve_backend(backend)(distmat, q_pids, g_pids, q_camids, g_camids)
    if not cuhk03_old_protocol:
        return result
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 for the CUHK03 old protocol, got {repeats}")
    first = _cuhk03_first_ranks(
        distmat, q_pids, g_pids, q_camids, g_camids, result.valid, repeats, seed, query_start
    )
    return QueryRanks(first_rank=first, ap=result.ap, inp=result.inp, valid=result.valid)


def combine(ranks: QueryRanks | Sequence[QueryRanks], max_rank: int = 50) -> RankResult:
    """Means over the valid queries: CMC from the first-positive ranks (averaged over the
    galleries of each query when there are several), mAP and mINP from the per-query values."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if not isinstance(ranks, QueryRanks):
        ranks = QueryRanks.concatenate(ranks)
    valid = ranks.valid
    if not valid.any():
        raise ValueError(
            f"no valid query among {valid.size}: every query lost all its positives to the "
            "same-pid-same-camera removal"
        )
    first = ranks.first_rank[valid]
    # hits[k - 1]: how many (query, gallery) pairs have their first positive at rank k <= max_rank.
    hits = np.bincount(first[first <= max_rank], minlength=max_rank + 1)[1:]
    cmc = np.cumsum(hits) / first.size
    return RankResult(
        cmc=cmc.astype(np.float64),
        mAP=float(np.mean(ranks.ap[valid])),
        mINP=float(np.mean(ranks.inp[valid])),
        ap=ranks.ap,
        inp=ranks.inp,
        valid=valid,
    )


def rank_metrics(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    backend: str = "auto",
    cuhk03_old_protocol: bool = False,
    repeats: int = 10,
    seed: int = 0,
) -> RankResult:
    """CMC, mAP and mINP of a (Q, G) distance matrix under the Market-1501 protocol.

    ``backend``: "auto" (the fastest available: cuda > cython > numpy) or a name in
    :data:`BACKENDS` ("numpy", "torch", and "cython" / "cuda" where built / visible).

    ``cuhk03_old_protocol``: the CUHK03 single-shot protocol (Li et al., "DeepReID", CVPR 2014), as
    torchreid's ``eval_cuhk03``: for each query, after the same junk removal, ``repeats`` galleries
    of one random image per identity (see :func:`_cuhk03_first_ranks` for the exact draw from
    ``seed``); CMC is averaged over them. As in torchreid, AP (and here INP) are computed on the
    full kept gallery, not on the sampled ones.
    """
    ranks = query_ranks(
        distmat,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        backend=backend,
        cuhk03_old_protocol=cuhk03_old_protocol,
        repeats=repeats,
        seed=seed,
    )
    return combine(ranks, max_rank)
