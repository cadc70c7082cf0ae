"""Sharded evaluation with the fused CUDA kernel: the two passes of
:mod:`~hpc_reid.evaluation.ranking_cuda` over a query set and a gallery sharded across ranks.

Each rank prepares its own shards once, as the kernel reads them (L2-normalised for cosine or with
squared norms for euclidean, zero-padded; :func:`~hpc_reid.evaluation.ranking_cuda.kernel_features`)
and keeps them on its GPU. Per global tile of ``query_tile`` queries, broadcast prepared by the
ranks that own its rows:

1. every rank finds the tile's kept positives in its gallery shard (grouped by pid, on the device)
   and their distances from the kernel's ``pair_distances``; the (query row, global gallery index,
   distance) triples are all-gathered -- over NCCL, on the device -- and sorted by (row, distance,
   global index), so every rank holds each query's positives in rank order;
2. every rank's ``count_negatives`` histograms its shard's kept negatives over those positives, and
   one all-reduce sums the histograms. The kernel breaks distance ties by comparing a positive's
   gallery index with the negative's index in the shard; it is given the positives' global indices
   minus the shard's start, which keeps their order (a positive of an earlier shard compares below
   every local index, one of a later shard above), as int32: galleries below 2**31 items;
3. every rank turns the summed histogram into ranks, then first rank, AP and INP, with the
   arithmetic of the single-process kernel path
   (:func:`~hpc_reid.evaluation.ranking_cuda.ranks_from_histogram`).

A pair's distance depends only on its two prepared rows, so the result is that of
``evaluate_features`` on one GPU bit for bit given the prepared rows. On one rank they are the
single process's; over several, a row is normalised (or its squared norm summed) within a
differently sized shard, and torch's row reductions may then round differently in the last bit,
which can swap two items whose distances differ by an ulp (the CPU path's BLAS caveat, in
:mod:`~hpc_reid.evaluation.sharded`). Memory per rank: the prepared shards, and per tile the
tile's features and positives; no distance tile is stored.

The kernel is an argument -- the compiled extension, or any object with its two functions -- so
the same code runs on CPU tensors over gloo with a stand-in (tests/evaluation/dense_kernel.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from hpc_reid.evaluation.distances import Metric, RowDistance, as_row_distance
from hpc_reid.evaluation.ranking import QueryRanks, RankResult, combine
from hpc_reid.evaluation.ranking_cuda import (
    BLOCK_K,
    MAX_QUERY_TILE,
    all_finite,
    kept_positives,
    kernel_features,
    ranks_from_histogram,
    sort_positives,
)
from hpc_reid.evaluation.sharded import _feature_device, _setup, _Shards, broadcast_rows

__all__ = ["evaluate_sharded_fused", "fused_tile_ranks"]

INT32_MAX = 2**31 - 1


def _prepared(shards: _Shards, features: torch.Tensor, metric: Metric, device: torch.device):
    """A rank's shard as the kernel reads it, an empty one as (0, dim) on ``device``."""
    features = features.reshape(len(features), shards.layout.dim)
    return kernel_features(features.to(device), metric)


def _check_finite(shards: _Shards, prepared: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raise on every rank if any rank's features hold NaN or inf (no rank left in a collective)."""
    bad = torch.tensor([[not all(all_finite(x, sq) for x, sq in prepared)]], dtype=torch.int64)
    bad = np.flatnonzero(torch.cat(shards.comm.all_gather_rows(bad)).numpy()[:, 0])
    if bad.size:
        raise ValueError(
            f"features contain NaN or inf (or overflow) on rank(s) {bad.tolist()}; ranks are "
            "undefined"
        )


def fused_tile_ranks(
    kernel,
    shards: _Shards,
    qf: torch.Tensor,
    gf: torch.Tensor,
    metric: Metric,
    query_tile: int,
) -> list[QueryRanks]:
    """Per-query results of every global query tile, by the module docstring's two passes.

    Collective. ``kernel`` is called only on a rank with a gallery shard (elsewhere it may be
    None); the tensors it gets are on this rank's feature device.
    """
    comm, layout = shards.comm, shards.layout
    if not 1 <= query_tile <= MAX_QUERY_TILE:
        raise ValueError(f"query_tile must be in [1, {MAX_QUERY_TILE}], got {query_tile}")
    num_q, num_g = int(layout.q_offsets[-1]), int(layout.g_offsets[-1])
    if num_g >= INT32_MAX:  # the kernel compares gallery indices as int32
        raise ValueError(f"the fused kernel ranks galleries of fewer than 2**31 items, got {num_g}")
    euclidean = metric == "euclidean"
    device = _feature_device(qf, gf)
    qx, q_sq = _prepared(shards, qf, metric, device)
    gx, g_sq = _prepared(shards, gf, metric, device)
    _check_finite(shards, [(qx, q_sq), (gx, g_sq)])
    width = layout.dim + (-layout.dim % BLOCK_K)
    g_start, n_g = int(layout.g_offsets[comm.rank]), len(gf)
    g_pids = torch.as_tensor(shards.g_pids, dtype=torch.int64).to(device)
    g_cams = torch.as_tensor(shards.g_camids, dtype=torch.int64).to(device)
    pid_sorted, by_pid = torch.sort(g_pids, stable=True)  # the shard grouped by pid
    parts: list[QueryRanks] = []
    for start in range(0, num_q, query_tile):
        stop = min(start + query_tile, num_q)
        q = broadcast_rows(comm, layout.q_offsets, qx, start, stop, (width,), device)
        if euclidean:
            t_sq = broadcast_rows(comm, layout.q_offsets, q_sq, start, stop, (), device)
        else:
            t_sq = q_sq  # empty: cosine reads no norms
        t_pids = torch.from_numpy(np.ascontiguousarray(layout.q_pids[start:stop])).to(device)
        t_cams = torch.from_numpy(np.ascontiguousarray(layout.q_camids[start:stop])).to(device)
        # 1. This shard's kept positives of the tile, with the kernel's distances; all of them,
        # from every shard, in (row, distance, global index) order.
        row, g = kept_positives(t_pids, t_cams, g_cams, pid_sorted, by_pid)
        if row.numel():
            d = kernel.pair_distances(q, gx, t_sq, g_sq, row, g, euclidean)
        else:
            d = torch.empty(0, dtype=torch.float32, device=device)
        packed = torch.stack([row, g + g_start, d.view(torch.int32).long()], dim=1)
        gathered = torch.cat(comm.all_gather_rows(packed, device=device))
        pos_d = gathered[:, 2].int().view(torch.float32)
        row, index, pos_d, pos_off = sort_positives(
            gathered[:, 0], gathered[:, 1], pos_d, stop - start
        )
        # 2. This shard's kept negatives before each positive; summed over the shards.
        if n_g and pos_d.numel():
            hist = kernel.count_negatives(
                q,
                gx,
                t_sq,
                g_sq,
                t_pids,
                g_pids,
                pos_off,
                pos_d.contiguous(),
                (index - g_start).int(),  # order-preserving, within (-2**31, 2**31)
                euclidean,
            )
        else:
            hist = torch.zeros(pos_d.numel(), dtype=torch.int32, device=device)
        if pos_d.numel():  # the same on every rank: no collective on an empty tensor
            hist = comm.all_reduce_sum(hist.long(), device=device)
        # 3. Ranks, first rank, AP and INP.
        parts.append(ranks_from_histogram(row, pos_off, hist))
    return parts


def evaluate_sharded_fused(
    kernel,
    qf_local: torch.Tensor,
    gf_local: torch.Tensor,
    q_pids_local: np.ndarray,
    g_pids_local: np.ndarray,
    q_camids_local: np.ndarray,
    g_camids_local: np.ndarray,
    metric: Metric | RowDistance = "cosine",
    max_rank: int = 50,
    query_tile: int = 1024,
    group: dist.ProcessGroup | None = None,
) -> RankResult:
    """:func:`~hpc_reid.evaluation.sharded.evaluate_sharded` ranked by ``kernel`` (the extension
    of :func:`~hpc_reid.evaluation.ranking_cuda.require_kernel`, or a stand-in with its two
    functions) on the features' device, whatever it is. Collective, like ``evaluate_sharded``,
    which calls :func:`fused_tile_ranks` itself once every rank agrees on the kernel.

    The kernel ranks one "metric" part: a :class:`~hpc_reid.evaluation.distances.RowDistance` of
    several parts is refused (``evaluate_sharded`` ranks it on distance tiles)."""
    qf_local, gf_local, distance = as_row_distance(metric).restrict(qf_local, gf_local)
    if distance.whole_row_metric is None:
        raise ValueError(
            f"the fused kernel ranks one 'metric' part, not {distance.spec} (evaluation.distance); "
            "evaluate_sharded ranks it on distance tiles"
        )
    args = (qf_local, gf_local, q_pids_local, g_pids_local, q_camids_local, g_camids_local)
    shards = _setup(*args, distance, query_tile, group)
    return combine(
        fused_tile_ranks(kernel, shards, qf_local, gf_local, distance.whole_row_metric, query_tile),
        max_rank,
    )
