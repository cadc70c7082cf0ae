"""Exact CMC, mAP and mINP with the query *and* gallery features sharded over ranks.

No rank ever holds the Q x G distance matrix nor the whole gallery: each holds its shard of the
query and gallery features, and the result, on every rank, is the single-process
:func:`~hpc_reid.evaluation.distances.evaluate_features` result on the concatenated data. The
gallery order that breaks distance ties (see :mod:`hpc_reid.evaluation.ranking`) is the rank-major
concatenation of the shards; :func:`shard_range` gives the contiguous shards that make it the
data set's order.

Queries go in global tiles of ``query_tile`` rows (the tiles of ``evaluate_features``), each
broadcast by the ranks that own its rows. Per tile ("Sharded evaluation" in ARCHITECTURE.md):

1. every rank computes the tile's distances to its gallery shard, (tile, G_local), and finds the
   tile's kept positives there (same pid, other camera); these few (query, gallery index,
   distance) triples are all-gathered, so every rank knows each query's positives in rank order;
2. every rank counts, for each positive, its kept negatives (other pid) that come before it in the
   (distance, global index) order; one all-reduce sums the counts into exact global ranks, from
   which every rank computes first rank, AP and INP (:func:`tile_query_ranks`).

Memory per rank is O(query_tile x G_local + positives of a tile); communication per tile is the
tile's features, its positives and their counts. The same three steps, run over gallery chunks one
after another instead of over ranks, evaluate features streamed from HDF5 files
(:mod:`hpc_reid.evaluation.feature_files`).

The ranks are exact given the distances. The distances are those of ``evaluate_features`` when the
BLAS computes a dot product independently of the matrix shape around it; MKL does so except for
very thin products (under about 16 gallery rows in a shard or 4 queries in a tile), where a
distance may differ in its last bit and so reorder two items whose distances differ by one ulp.

The distance is a metric name or a :class:`~hpc_reid.evaluation.distances.RowDistance` (rows of
retrieval parts, ``evaluation.distance``); every rank passes the same one (checked in the first
collective). A distance of one "metric" part is that part's columns ranked as single features; one
of several parts (or another part distance) is computed on the distance tiles of step 1.

Devices: every query tile is broadcast to and used on the features' device (with NCCL and CUDA
features it never leaves the GPU). With CUDA features, ``backend`` "auto" or "cuda" and a distance
of one "metric" part, steps 1 and 2 are the fused kernel's two passes
(:mod:`~hpc_reid.evaluation.sharded_fused`: no distance tile is stored; positives gathered and
histograms reduced over NCCL on the device); every rank agrees on that path through one all-gather
before the first tile. Otherwise the steps above run on distance tiles computed on the features'
device and counted on the host, as on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from hpc_reid.evaluation import ranking_cuda
from hpc_reid.evaluation.distances import Metric, RowDistance, as_row_distance
from hpc_reid.evaluation.ranking import QueryRanks, RankResult, combine

__all__ = [
    "TilePositives",
    "all_gather_rows",
    "count_negatives_before",
    "evaluate_sharded",
    "find_positives",
    "ranked_candidates",
    "shard_range",
    "tile_query_ranks",
]


# evaluation.backend's values; here they only choose between the fused kernel and distance tiles.
BACKEND_NAMES = ("auto", "numpy", "torch", "cython", "cuda")


def shard_range(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous part of ``n`` items; part sizes differ by at most one, and the
    rank-major concatenation of the parts is the original order."""
    return range(n * rank // world, n * (rank + 1) // world)


# --- the per-tile steps, shared by the sharded and the streamed (HDF5) evaluation ---------------


@dataclass(frozen=True)
class TilePositives:
    """The kept positives of a tile of queries, sorted by (query row, distance, gallery index).

    Row t's positives are ``[bounds[t], bounds[t + 1])``: their distances ``dist`` (float32) and
    global gallery indices ``index``, in rank order.
    """

    dist: np.ndarray
    index: np.ndarray
    bounds: np.ndarray

    @staticmethod
    def from_unsorted(
        rows: np.ndarray, index: np.ndarray, dist: np.ndarray, num_rows: int
    ) -> TilePositives:
        order = np.lexsort((index, dist, rows))
        bounds = np.searchsorted(rows[order], np.arange(num_rows + 1), side="left")
        return TilePositives(dist=dist[order], index=index[order], bounds=bounds)


def find_positives(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    q_camids: np.ndarray,
    g_pids: np.ndarray,
    g_camids: np.ndarray,
    g_start: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept positives of a (T, n) distance block to gallery items ``g_start .. g_start+n-1``:
    (query rows, global gallery indices, distances), unsorted. Found through the gallery grouped by
    pid, so the cost is O(n log n + positives), not O(T x n)."""
    order = np.argsort(g_pids, kind="stable")
    sorted_pids = g_pids[order]
    lo = np.searchsorted(sorted_pids, q_pids, side="left")
    counts = np.searchsorted(sorted_pids, q_pids, side="right") - lo
    rows = np.repeat(np.arange(q_pids.size), counts)
    within = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    cand = order[np.repeat(lo, counts) + within]
    kept = g_camids[cand] != q_camids[rows]  # same pid and same camera is junk
    rows, cand = rows[kept], cand[kept]
    return rows, g_start + cand, distmat[rows, cand]


# Up to this many positives, one vectorised comparison pass per distinct positive distance is much
# faster in numpy than a binary search per negative (measured ~6x at p = 16, G = 250k); beyond it
# the binary search keeps the cost O(G log p).
DIRECT_MAX_POSITIVES = 32


def _before_by_comparison(neg_d, neg_idx, pos_d, pos_idx) -> np.ndarray:
    """Negatives before each sorted positive: for each distinct positive distance v, those closer
    than v, plus those at v with a smaller global index."""
    out = np.empty(pos_d.size, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], pos_d[1:] != pos_d[:-1])))
    for s, e in zip(starts, [*starts[1:], pos_d.size], strict=True):
        v = pos_d[s]
        out[s:e] = np.count_nonzero(neg_d < v)
        tied = neg_d == v
        if tied.any():
            out[s:e] += np.searchsorted(np.sort(neg_idx()[tied]), pos_idx[s:e])
    return out


def _before_by_search(neg_d, neg_idx, pos_d, pos_idx, num_gallery) -> np.ndarray:
    """The same counts by one binary search per negative into the sorted positives."""
    p = pos_d.size
    before = np.searchsorted(pos_d, neg_d, side="left")
    tied = np.flatnonzero(pos_d[np.minimum(before, p - 1)] == neg_d)
    if tied.size:
        # Within a group of equal positive distances, a tied negative goes after the positives of
        # smaller global index: keys group * G + index ascend along the sorted positives.
        group = np.concatenate(([0], np.cumsum(pos_d[1:] != pos_d[:-1])))
        key = group * num_gallery + pos_idx
        before[tied] = np.searchsorted(key, group[before[tied]] * num_gallery + neg_idx()[tied])
    return np.cumsum(np.bincount(before, minlength=p + 1))[:p]


def count_negatives_before(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    g_start: int,
    positives: TilePositives,
    num_gallery: int,
) -> np.ndarray:
    """For every positive of ``positives``, how many negatives of this gallery block (rows
    ``g_start ..`` of a gallery of ``num_gallery``) come before it in the (distance, global index)
    order; int64, aligned with ``positives.index``."""
    out = np.zeros(positives.index.size, dtype=np.int64)
    bounds = positives.bounds
    for t in np.flatnonzero(bounds[1:] > bounds[:-1]):
        b0, b1 = bounds[t], bounds[t + 1]
        pos_d, pos_idx = positives.dist[b0:b1], positives.index[b0:b1]
        negative = g_pids != q_pids[t]  # every other-pid item is kept

        def neg_idx(negative=negative):  # global indices of the negatives, needed for ties only
            return g_start + np.flatnonzero(negative)

        neg_d = distmat[t, negative]
        if b1 - b0 <= DIRECT_MAX_POSITIVES:
            out[b0:b1] = _before_by_comparison(neg_d, neg_idx, pos_d, pos_idx)
        else:
            out[b0:b1] = _before_by_search(neg_d, neg_idx, pos_d, pos_idx, num_gallery)
    return out


def tile_query_ranks(positives: TilePositives, negatives_before: np.ndarray) -> QueryRanks:
    """First rank, AP and INP of each query of a tile from its positives' global negative counts
    (the same arithmetic as ``ranking._ranks_numpy``, so the values are bit-identical)."""
    num_q = positives.bounds.size - 1
    first = np.zeros((num_q, 1), dtype=np.int64)
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    bounds = positives.bounds
    for t in np.flatnonzero(bounds[1:] > bounds[:-1]):
        b0, b1 = bounds[t], bounds[t + 1]
        ranks = np.arange(1, b1 - b0 + 1) + negatives_before[b0:b1]
        first[t, 0] = ranks[0]
        ap[t] = np.mean(np.arange(1, ranks.size + 1) / ranks)
        inp[t] = ranks.size / ranks[-1]
    return QueryRanks(first_rank=first, ap=ap, inp=inp, valid=first[:, 0] > 0)


# --- collectives ---------------------------------------------------------------------------------


class _Group:
    """The process group, or a single process when torch.distributed is not initialised."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.world = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        # NCCL moves CUDA tensors only; the results come back to the CPU either way.
        nccl = self.active and dist.get_backend(group) == "nccl"
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    def all_gather_rows(self, local: torch.Tensor, device=None) -> list[torch.Tensor]:
        """Every rank's ``local`` (any number of rows, same trailing shape and dtype), in rank
        order, on ``device`` (default: the CPU); ``[local]`` (moved to ``device`` if one is given)
        when torch.distributed is not initialised."""
        if not self.active:
            return [local if device is None else local.to(device)]
        target = torch.device("cpu") if device is None else torch.device(device)
        local = local.to(self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(local)], device=self.device), group=self.group)
        rows = [int(s) for s in sizes]
        # At least one row: no collective on an empty tensor (which NCCL may not accept).
        padded = local.new_zeros((max(*rows, 1), *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return [part[:n].to(target) for part, n in zip(parts, rows, strict=True)]

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """In place; ``tensor`` must be contiguous and on ``self.device``."""
        if self.active:
            src_global = src if self.group is None else dist.get_global_rank(self.group, src)
            dist.broadcast(tensor, src=src_global, group=self.group)

    def all_reduce_sum(self, tensor: torch.Tensor, device=None) -> torch.Tensor:
        """The sum over ranks, on ``device`` (default: the CPU)."""
        if self.active:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor, group=self.group)
        return tensor.to("cpu" if device is None else device)


def all_gather_rows(
    local: torch.Tensor, group: dist.ProcessGroup | None = None, device=None
) -> list[torch.Tensor]:
    """Every rank's ``local`` rows (any number, same trailing shape and dtype) in rank order, on
    ``device`` of every rank: the CPU by default; ``local.device`` keeps an NCCL gather of CUDA
    tensors on the GPU. ``[local]`` when torch.distributed is not initialised (moved to
    ``device`` if one is given)."""
    return _Group(group).all_gather_rows(local, device)


@dataclass(frozen=True)
class _Layout:
    """Shard sizes and offsets of queries and gallery, the feature dimension, and the (small)
    query labels of every rank, known alike on every rank."""

    q_offsets: np.ndarray  # (world + 1,)
    g_offsets: np.ndarray
    dim: int
    q_pids: np.ndarray  # all queries
    q_camids: np.ndarray


def _check_local(qf, gf, q_pids, g_pids, q_camids, g_camids, width: int | None) -> str | None:
    for name, f in (("qf_local", qf), ("gf_local", gf)):
        if f.dim() != 2 and f.numel() > 0:
            return f"{name} must be (N, D), got shape {tuple(f.shape)}"
        if width is not None and len(f) and f.shape[1] != width:
            return f"{name} has rows of width {f.shape[1]}, the distance's layout {width}"
    for name, arr, f in (
        ("q_pids_local", q_pids, qf),
        ("q_camids_local", q_camids, qf),
        ("g_pids_local", g_pids, gf),
        ("g_camids_local", g_camids, gf),
    ):
        if arr.shape != (len(f),):
            return f"{name} has shape {arr.shape}, expected one value per feature row ({len(f)})"
    return None


def _layout(
    comm: _Group, qf, gf, q_pids, g_pids, q_camids, g_camids, distance: RowDistance
) -> _Layout:
    """All-gather shard sizes, feature dimensions, the distance's signature and query labels;
    every rank raises the same error if any rank's inputs are inconsistent, or the ranks' distances
    differ (so none is left waiting in a collective, nor takes another path)."""
    width = None if distance.layout is None else distance.layout.width
    problem = _check_local(qf, gf, q_pids, g_pids, q_camids, g_camids, width)
    nq, ng = (len(qf), len(gf)) if problem is None else (0, 0)
    dq = qf.shape[1] if nq else -1
    dg = gf.shape[1] if ng else -1
    meta = [[problem is not None, nq, ng, dq, dg, distance.signature()]]
    meta = torch.cat(comm.all_gather_rows(torch.tensor(meta, dtype=torch.int64))).numpy()
    bad = np.flatnonzero(meta[:, 0])
    if bad.size:
        raise ValueError(problem or f"evaluate_sharded: invalid inputs on rank(s) {bad.tolist()}")
    if len(set(meta[:, 5].tolist())) > 1:
        raise ValueError(
            f"the ranks were given different distances (signatures {meta[:, 5].tolist()}); this "
            f"rank's: {distance!r}"
        )
    dims = set(meta[:, 3:5].ravel().tolist()) - {-1}
    if len(dims) > 1:
        raise ValueError(
            f"feature dimensions differ across shards: query {meta[:, 3].tolist()}, gallery "
            f"{meta[:, 4].tolist()} (-1: empty shard)"
        )
    labels = torch.from_numpy(np.stack([q_pids, q_camids], axis=1).astype(np.int64).reshape(-1, 2))
    labels = torch.cat(comm.all_gather_rows(labels)).numpy()
    return _Layout(
        q_offsets=np.concatenate(([0], np.cumsum(meta[:, 1]))),
        g_offsets=np.concatenate(([0], np.cumsum(meta[:, 2]))),
        dim=dims.pop() if dims else 0,
        q_pids=labels[:, 0],
        q_camids=labels[:, 1],
    )


def broadcast_rows(
    comm: _Group,
    offsets: np.ndarray,
    local: torch.Tensor,
    start: int,
    stop: int,
    tail: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """Global rows ``[start, stop)`` (float32, trailing shape ``tail``) of a tensor sharded over
    the ranks as ``offsets`` says, broadcast by the ranks that own them; returned on ``device``
    (the features' own: with NCCL and CUDA features nothing leaves the GPU)."""
    tile = torch.empty((stop - start, *tail), dtype=torch.float32, device=comm.device)
    for r in range(comm.world):
        lo = max(start, int(offsets[r]))
        hi = min(stop, int(offsets[r + 1]))
        if lo >= hi:
            continue
        rows = tile[lo - start : hi - start]
        if r == comm.rank:
            own = int(offsets[r])
            rows.copy_(local[lo - own : hi - own])
        comm.broadcast_(rows, src=r)
    return tile.to(device)


def _query_tile(comm: _Group, layout: _Layout, qf: torch.Tensor, start: int, stop: int, device):
    """Global query rows ``[start, stop)``, broadcast by the ranks that own them."""
    return broadcast_rows(comm, layout.q_offsets, qf, start, stop, (layout.dim,), device)


def _distances(q: torch.Tensor, gf: torch.Tensor, distance: RowDistance, tile: int) -> np.ndarray:
    """(tile, G_local) distances on the gallery's device (``q`` is there already), to the host
    for the numpy counting."""
    if len(gf) == 0:
        return np.empty((len(q), 0), dtype=np.float32)
    return distance(q, gf, tile=tile).cpu().numpy()


def _as_labels(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _feature_device(qf: torch.Tensor, gf: torch.Tensor) -> torch.device:
    """Where this rank's work happens: the gallery shard's device, or the queries' without one."""
    return gf.device if gf.numel() or not qf.numel() else qf.device


@dataclass(frozen=True)
class _Shards:
    """What every sharded evaluation starts from: the process group, the layout, and this rank's
    gallery labels as numpy arrays."""

    comm: _Group
    layout: _Layout
    g_pids: np.ndarray
    g_camids: np.ndarray


def _setup(
    qf, gf, q_pids, g_pids, q_camids, g_camids, distance: RowDistance, query_tile, group
) -> _Shards:
    """Check the arguments and agree on the layout (collective); every rank raises alike."""
    if query_tile < 1:
        raise ValueError(f"query_tile must be >= 1, got {query_tile}")
    comm = _Group(group)
    q_pids, q_camids = _as_labels(q_pids), _as_labels(q_camids)
    g_pids, g_camids = _as_labels(g_pids), _as_labels(g_camids)
    layout = _layout(comm, qf, gf, q_pids, g_pids, q_camids, g_camids, distance)
    if layout.q_offsets[-1] == 0:
        raise ValueError("no query features on any rank")
    return _Shards(comm, layout, g_pids, g_camids)


def _agreed_kernel(comm: _Group, qf: torch.Tensor, gf: torch.Tensor, backend: str):
    """(whether every rank ranks with the fused CUDA kernel, the kernel where this rank has a
    gallery shard to run it on), agreed through one all-gather so that no rank takes another path.

    The kernel ranks when the features of every rank that holds some are on CUDA, ``backend`` is
    "auto" or "cuda", and every rank with a gallery shard could build it. Where one could not,
    "cuda" raises on every rank (the failing ones with their build error) and "auto" ranks
    distance tiles instead (the failing ones have warned once).
    """
    held = [f for f in (qf, gf) if f.numel()]
    vote = int(all(f.is_cuda for f in held)) if held else -1  # -1: no features, no vote
    wanted = backend in ("auto", "cuda")
    needs = wanted and vote == 1 and gf.numel() > 0
    kernel, error = None, None
    if needs:
        try:
            kernel = ranking_cuda.kernel_for(backend)
        except RuntimeError as exc:  # raised below on every rank at once
            error = exc
    status = torch.tensor([[vote, needs and kernel is None]], dtype=torch.int64)
    status = torch.cat(comm.all_gather_rows(status)).numpy()
    if not wanted or set(status[:, 0].tolist()) - {-1} != {1}:
        return False, None
    failed = np.flatnonzero(status[:, 1])
    if failed.size == 0:
        return True, kernel
    if backend == "cuda":
        if error is not None:
            raise error
        raise RuntimeError(
            f"evaluation backend 'cuda': the fused CUDA ranking kernel could not be built on "
            f"rank(s) {failed.tolist()}; see their error"
        )
    return False, None


def _tile_ranks(
    shards: _Shards, qf, gf, distance: RowDistance, query_tile: int
) -> list[QueryRanks]:
    """The three steps of the module docstring on distance tiles: (tile, G_local) distances on the
    features' device, positives and negatives counted on the host."""
    comm, layout = shards.comm, shards.layout
    num_q, num_g = int(layout.q_offsets[-1]), int(layout.g_offsets[-1])
    g_start = int(layout.g_offsets[comm.rank])
    device = _feature_device(qf, gf)
    parts: list[QueryRanks] = []
    for start in range(0, num_q, query_tile):
        stop = min(start + query_tile, num_q)
        q_pids, q_cams = layout.q_pids[start:stop], layout.q_camids[start:stop]
        q = _query_tile(comm, layout, qf, start, stop, device)
        d = _distances(q, gf, distance, query_tile)
        rows, index, pos_d = find_positives(
            d, q_pids, q_cams, shards.g_pids, shards.g_camids, g_start
        )
        packed = np.stack([rows, index, pos_d.view(np.int32).astype(np.int64)], axis=1)
        gathered = torch.cat(comm.all_gather_rows(torch.from_numpy(packed))).numpy()
        positives = TilePositives.from_unsorted(
            gathered[:, 0],
            gathered[:, 1],
            gathered[:, 2].astype(np.int32).view(np.float32),
            stop - start,
        )
        counts = count_negatives_before(d, q_pids, shards.g_pids, g_start, positives, num_g)
        # The last entry counts NaN distances, so that every rank raises together.
        local = torch.from_numpy(np.append(counts, np.isnan(d).sum()).astype(np.int64))
        total = comm.all_reduce_sum(local).numpy()
        if total[-1]:
            raise ValueError(f"{total[-1]} NaN distances for queries {start}..{stop - 1}")
        parts.append(tile_query_ranks(positives, total[:-1]))
    return parts


def evaluate_sharded(
    qf_local: torch.Tensor,
    gf_local: torch.Tensor,
    q_pids_local: np.ndarray,
    g_pids_local: np.ndarray,
    q_camids_local: np.ndarray,
    g_camids_local: np.ndarray,
    metric: Metric | RowDistance = "cosine",
    max_rank: int = 50,
    query_tile: int = 1024,
    cuhk03_old_protocol: bool = False,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> RankResult:
    """CMC, mAP and mINP of queries against a gallery, both sharded over the ranks of ``group``.

    Collective: every rank of ``group`` calls it, with its shard (any sizes, empty included), and
    every rank gets the same :class:`RankResult`, equal to ``evaluate_features`` on the rank-major
    concatenation of the shards. Without an initialised process group it evaluates one process.
    ``metric``: a metric name or a :class:`~hpc_reid.evaluation.distances.RowDistance`, the same on
    every rank.

    ``backend`` (``evaluation.backend``): with CUDA features and a distance of one "metric" part,
    "auto" and "cuda" rank with the fused kernel (:mod:`~hpc_reid.evaluation.sharded_fused`);
    where it cannot be built "cuda" raises and "auto" warns once and ranks distance tiles computed
    on the GPU. Any other backend or distance, and CPU features, rank distance tiles on the host.
    """
    if cuhk03_old_protocol:
        raise NotImplementedError(
            "evaluate_sharded does not support the CUHK03 old protocol: its random single-shot "
            "galleries pick members by pid across all shards; gather the features and use "
            "evaluate_features(..., cuhk03_old_protocol=True) instead"
        )
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
    qf_local, gf_local, distance = as_row_distance(metric).restrict(qf_local, gf_local)
    args = (qf_local, gf_local, q_pids_local, g_pids_local, q_camids_local, g_camids_local)
    shards = _setup(*args, distance, query_tile, group)
    whole_row = distance.whole_row_metric  # the same on every rank: _setup compared distances
    use_kernel, kernel = False, None
    if whole_row is not None:
        use_kernel, kernel = _agreed_kernel(shards.comm, qf_local, gf_local, backend)
    if use_kernel:
        from hpc_reid.evaluation.sharded_fused import fused_tile_ranks  # it imports this module

        parts = fused_tile_ranks(kernel, shards, qf_local, gf_local, whole_row, query_tile)
    else:
        parts = _tile_ranks(shards, qf_local, gf_local, distance, query_tile)
    return combine(parts, max_rank)


def ranked_candidates(
    qf_local: torch.Tensor,
    gf_local: torch.Tensor,
    q_pids_local: np.ndarray,
    g_pids_local: np.ndarray,
    q_camids_local: np.ndarray,
    g_camids_local: np.ndarray,
    num_queries: int,
    topk: int = 10,
    metric: Metric | RowDistance = "cosine",
    group: dist.ProcessGroup | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The gallery columns needed to draw the top-``topk`` ranked lists of the first
    ``num_queries`` queries, without gathering features: ``(columns, distmat)``.

    Collective, like :func:`evaluate_sharded`. Each rank finds its local top-``topk`` kept items of
    each query by (distance, index); ``columns`` is the union over ranks and queries (ascending
    global gallery indices) and ``distmat`` (num_queries, len(columns)) holds every query's
    distances to them. Ranking a row of ``distmat`` with the junk removal and ties by position
    gives the query's true global top-``topk``, as ``plot_ranked_lists`` does on a full row.
    """
    comm = _Group(group)
    qf_local, gf_local, distance = as_row_distance(metric).restrict(qf_local, gf_local)
    q_pids_local, q_camids_local = _as_labels(q_pids_local), _as_labels(q_camids_local)
    g_pids_local, g_camids_local = _as_labels(g_pids_local), _as_labels(g_camids_local)
    labels = (q_pids_local, g_pids_local, q_camids_local, g_camids_local)
    layout = _layout(comm, qf_local, gf_local, *labels, distance)
    n = min(num_queries, int(layout.q_offsets[-1]))
    q = _query_tile(comm, layout, qf_local, 0, n, _feature_device(qf_local, gf_local))
    d = _distances(q, gf_local, distance, max(n, 1))
    g_start = int(layout.g_offsets[comm.rank])
    local: list[np.ndarray] = []
    for t in range(n):
        junk = (g_pids_local == layout.q_pids[t]) & (g_camids_local == layout.q_camids[t])
        kept = np.flatnonzero(~junk)
        local.append(kept[np.argsort(d[t, kept], kind="stable")[:topk]])
    mine = np.concatenate([*local, np.empty(0, dtype=np.int64)]).astype(np.int64) + g_start
    gathered = comm.all_gather_rows(torch.from_numpy(mine))
    columns = np.unique(torch.cat(gathered).numpy())
    owned = (columns >= g_start) & (columns < g_start + len(gf_local))
    distmat = np.zeros((n, columns.size), dtype=np.float32)
    distmat[:, owned] = d[:, columns[owned] - g_start]
    # Each column is filled by its one owner and zero elsewhere, so the sum is exact.
    distmat = comm.all_reduce_sum(torch.from_numpy(distmat)).numpy()
    return columns, distmat
