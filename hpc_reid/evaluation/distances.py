"""Query-gallery distances, and evaluation of features tile by tile (Q x G never held at once)."""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from hpc_reid.evaluation.ranking import QueryRanks, RankResult, combine, query_ranks

Metric = Literal["cosine", "euclidean"]


def _check_features(qf: torch.Tensor, gf: torch.Tensor) -> None:
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"expected query (Q, D) and gallery (G, D) features, got {tuple(qf.shape)} and "
            f"{tuple(gf.shape)}"
        )


def _column_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) gallery ranges of about ``chunk`` rows; a short last range joins the one
    before it, so no matrix product is thin (BLAS may round thin products differently)."""
    bounds = [*range(0, n, chunk), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 64:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


def pairwise_distance(
    qf: torch.Tensor,
    gf: torch.Tensor,
    metric: Metric = "cosine",
    tile: int = 4096,
    gallery_chunk: int = 16384,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Q, G) float32 distances on the features' device, computed ``tile`` query rows and
    ``gallery_chunk`` gallery rows at a time.

    cosine: 1 - cos(q, g) of L2-normalised features, in [0, 2]. euclidean: ||q - g||, from the
    expansion ||q||^2 + ||g||^2 - 2 q.g clamped at 0 against rounding (one matrix product per
    block instead of a (tile, G, D) difference tensor). Computed in float32 whatever the input.
    The gallery is normalised chunk by chunk, so beside the output only one chunk's copy is held
    (no normalised copy of the whole gallery). ``out``: a (Q, G) float32 tensor to write into.
    """
    _check_features(qf, gf)
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}; expected 'cosine' or 'euclidean'")
    if tile < 1 or gallery_chunk < 1:
        raise ValueError(f"tile and gallery_chunk must be >= 1, got {tile} and {gallery_chunk}")
    shape = (qf.shape[0], gf.shape[0])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=qf.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32:
        raise ValueError(
            f"out must be a {shape} float32 tensor, got {tuple(out.shape)} {out.dtype}"
        )
    qf = qf.float()
    qf = F.normalize(qf, dim=1) if metric == "cosine" else qf
    q_sq = qf.pow(2).sum(dim=1, keepdim=True) if metric == "euclidean" else None
    for g0, g1 in _column_chunks(gf.shape[0], gallery_chunk):
        g = gf[g0:g1].float()
        if metric == "cosine":
            g = F.normalize(g, dim=1)
        else:
            g_sq = g.pow(2).sum(dim=1)
        for start in range(0, qf.shape[0], tile):
            q, block = qf[start : start + tile], out[start : start + tile, g0:g1]
            if metric == "cosine":
                block.copy_(torch.mm(q, g.t()).neg_().add_(1.0))
            else:
                sq = q_sq[start : start + tile] + g_sq - 2.0 * (q @ g.t())
                block.copy_(sq.clamp_(min=0).sqrt_())
    return out


def evaluate_features(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    metric: Metric = "cosine",
    max_rank: int = 50,
    query_tile: int = 1024,
    backend: str = "auto",
    cuhk03_old_protocol: bool = False,
    repeats: int = 10,
    seed: int = 0,
) -> RankResult:
    """Rank features directly: distances of ``query_tile`` queries at a time, ranked per tile.

    Peak memory beside the features is one (query_tile, G) tile, reused, and one gallery chunk
    (:func:`pairwise_distance`); the result is identical to
    ``rank_metrics(pairwise_distance(qf, gf, metric).numpy(), ...)`` on the full matrix.

    CUDA features with backend "auto" or "cuda" (not the CUHK03 old protocol) go to the fused
    kernel of :mod:`~hpc_reid.evaluation.ranking_cuda`, which stores no distance tile; its
    distances may differ from ``torch.mm``'s in the last bit. Where it cannot be compiled, "cuda"
    raises with the build error, and "auto" warns once and ranks this function's distance tiles
    on the GPU with the torch ranker. Other backends rank the tiles on the CPU.
    """
    _check_features(qf, gf)
    if query_tile < 1:
        raise ValueError(f"query_tile must be >= 1, got {query_tile}")
    q_pids, q_camids = np.asarray(q_pids), np.asarray(q_camids)
    if q_pids.shape != (qf.shape[0],) or q_camids.shape != (qf.shape[0],):
        raise ValueError(
            f"q_pids {q_pids.shape} and q_camids {q_camids.shape} must be ({qf.shape[0]},), one "
            "per query feature"
        )
    if qf.is_cuda and gf.is_cuda and backend in ("auto", "cuda") and not cuhk03_old_protocol:
        from hpc_reid.evaluation import ranking_cuda  # compiles its kernel on first use only

        if ranking_cuda.kernel_for(backend) is not None:  # "cuda" raises if it cannot be built
            return ranking_cuda.evaluate_features_cuda(
                qf, gf, q_pids, g_pids, q_camids, g_camids, metric, max_rank, query_tile
            )
    # A tile on the GPU is ranked there by the torch ranker (query_ranks), not copied to the host.
    parts: list[QueryRanks] = []
    buffer = torch.empty(min(query_tile, qf.shape[0]), gf.shape[0], device=qf.device)
    for start in range(0, qf.shape[0], query_tile):
        stop = start + query_tile
        q = qf[start:stop]
        dist = pairwise_distance(q, gf, metric=metric, tile=query_tile, out=buffer[: len(q)])
        parts.append(
            query_ranks(
                dist,
                q_pids[start:stop],
                g_pids,
                q_camids[start:stop],
                g_camids,
                backend=backend,
                cuhk03_old_protocol=cuhk03_old_protocol,
                repeats=repeats,
                seed=seed,
                query_start=start,
            )
        )
    return combine(parts, max_rank)
