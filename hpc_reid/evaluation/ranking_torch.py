"""The counting ranker of :mod:`hpc_reid.evaluation.ranking` in torch, on any device.

The same protocol and numbers as the numpy and Cython backends (ranks exact under ties, broken by
gallery index), vectorised over a block of query rows instead of looping over queries, so that it
runs on CPU tensors and on CUDA tensors alike:

1. the kept positives of every row (same pid, other camera) are gathered into a (B, P) matrix
   padded with +inf, and sorted stably by distance -- their gallery indices ascend within a row,
   so this is the (distance, index) order of a stable full sort;
2. ``torch.searchsorted`` counts, for every gallery item, the positives strictly closer; an item at
   exactly the distance of some positives is placed among them by index, with one more search on
   (row, tie group, index) keys;
3. a per-row histogram of those counts over the kept negatives, cumulated, gives each positive's
   rank: rank_k = k + 1 + #negatives before it. The (B, P) ranks go to the CPU, where AP and INP
   are computed with the numpy backend's arithmetic (bit-identical results across backends).

O(G log P) per query; rows are taken ``chunk_elements // G`` at a time to bound the (rows, G)
temporaries (about 30 bytes per element). :func:`query_ranks_torch` is the entry point for a
distance tile that is already a tensor (e.g. on the GPU that computed it).
"""

from __future__ import annotations

import numpy as np
import torch

from hpc_reid.evaluation.ranking import QueryRanks

__all__ = ["query_ranks_torch"]


def _as_index_tensor(values, name: str, size: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values)
    if t.shape != (size,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({size},)")
    return t.to(device=device, dtype=torch.int64)


def _rank_rows(
    d: torch.Tensor, q_pids: torch.Tensor, q_cams: torch.Tensor, g_pids, g_cams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the kept positives of the rows of ``d`` (b, G), in rank order, as a (b, P) int64
    tensor whose row r is valid up to the (b,) ``npos[r]``; both on d's device."""
    b, num_g = d.shape
    device = d.device
    same = q_pids[:, None] == g_pids[None, :]
    pos = same & (q_cams[:, None] != g_cams[None, :])
    npos = pos.sum(dim=1)
    p = int(npos.max()) if b else 0
    if p == 0:
        return torch.zeros((b, 0), dtype=torch.int64, device=device), npos

    # 1. Positives of each row, in (distance, index) order; padding (inf, G) sorts last.
    rows, cols = pos.nonzero(as_tuple=True)  # row-major: indices ascend within a row
    slot = torch.arange(rows.numel(), device=device) - (npos.cumsum(0) - npos)[rows]
    pd = torch.full((b, p), float("inf"), dtype=d.dtype, device=device)
    pidx = torch.full((b, p), num_g, dtype=torch.int64, device=device)
    pd[rows, slot] = d[rows, cols]
    pidx[rows, slot] = cols
    pd, order = torch.sort(pd, dim=1, stable=True)
    pidx = pidx.gather(1, order)

    # 2. Positives before each item: those strictly closer, plus, for an item tied with a group of
    # positives, the group's members with a smaller index. Keys (row, group start, index) ascend
    # along the flattened positives, so one 1-D search places every tied item at once.
    before = torch.searchsorted(pd, d, side="left")
    at = pd.gather(1, before.clamp(max=p - 1))
    tied = (before < p) & (at == d) & ~same
    if tied.any():
        t_rows, t_cols = tied.nonzero(as_tuple=True)
        group = torch.searchsorted(pd, pd, side="left")
        row_base = torch.arange(b, device=device)[:, None] * (p + 1)
        keys = ((row_base + group) * (num_g + 1) + pidx).flatten()
        t_lo = before[t_rows, t_cols]
        t_keys = ((t_rows * (p + 1) + t_lo) * (num_g + 1)) + t_cols
        before[t_rows, t_cols] = torch.searchsorted(keys, t_keys, side="left") - t_rows * p

    # 3. Histogram of the kept negatives over the gaps between positives (slot p: after all).
    before.masked_fill_(same, p)  # the query's own pid: positives and junk are not negatives
    row_off = torch.arange(b, device=device)[:, None] * (p + 1)
    counts = torch.bincount((before + row_off).flatten(), minlength=b * (p + 1)).view(b, p + 1)
    ranks = torch.arange(1, p + 1, device=device) + counts[:, :p].cumsum(dim=1)
    return ranks, npos


def query_ranks_torch(
    distmat: torch.Tensor,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    chunk_elements: int = 1 << 24,
) -> QueryRanks:
    """Per-query results of a (B, G) distance tensor on any device, as the numpy backend's.

    Pids and camera ids may be numpy arrays or tensors; they are moved to ``distmat``'s device.
    Float16/bfloat16/integer distances are ranked in float64 (float32/float64 as they are).
    """
    if distmat.dim() != 2:
        raise ValueError(f"distmat must be 2-D (B, G), got shape {tuple(distmat.shape)}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    if distmat.dtype not in (torch.float32, torch.float64):
        distmat = distmat.double()
    num_q, num_g = distmat.shape
    device = distmat.device
    q_pids_t = _as_index_tensor(q_pids, "q_pids", num_q, device)
    q_cams_t = _as_index_tensor(q_camids, "q_camids", num_q, device)
    g_pids_t = _as_index_tensor(g_pids, "g_pids", num_g, device)
    g_cams_t = _as_index_tensor(g_camids, "g_camids", num_g, device)
    step = max(1, chunk_elements // max(num_g, 1))
    first = np.zeros(num_q, dtype=np.int64)
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    for s in range(0, num_q, step):
        ranks, npos = _rank_rows(
            distmat[s : s + step].contiguous(),
            q_pids_t[s : s + step],
            q_cams_t[s : s + step],
            g_pids_t,
            g_cams_t,
        )
        ranks, npos = ranks.cpu().numpy(), npos.cpu().numpy()
        # AP and INP with the numpy backend's arithmetic (np.mean's pairwise sum), so that every
        # backend gives the same bits; (b, P) ranks are small next to the (b, G) tile.
        for row in np.flatnonzero(npos):
            r = ranks[row, : npos[row]]
            first[s + row] = r[0]
            ap[s + row] = np.mean(np.arange(1, r.size + 1) / r)
            inp[s + row] = r.size / r[-1]
    return QueryRanks(first_rank=first[:, None], ap=ap, inp=inp, valid=first > 0)
