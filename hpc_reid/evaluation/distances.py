"""Query-gallery distances, and evaluation of features tile by tile (Q x G never held at once)."""

from __future__ import annotations

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


def pairwise_distance(
    qf: torch.Tensor, gf: torch.Tensor, metric: Metric = "cosine", tile: int = 4096
) -> torch.Tensor:
    """(Q, G) float32 distances on the features' device, computed ``tile`` query rows at a time.

    cosine: 1 - cos(q, g) of L2-normalised features, in [0, 2]. euclidean: ||q - g||, from the
    expansion ||q||^2 + ||g||^2 - 2 q.g clamped at 0 against rounding (one matrix product per
    tile instead of a (tile, G, D) difference tensor). Computed in float32 whatever the input.
    """
    _check_features(qf, gf)
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}; expected 'cosine' or 'euclidean'")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    qf, gf = qf.float(), gf.float()
    if metric == "cosine":
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    else:
        g_sq = gf.pow(2).sum(dim=1)
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=torch.float32, device=qf.device)
    for start in range(0, qf.shape[0], tile):
        q = qf[start : start + tile]
        if metric == "cosine":
            torch.mm(q, gf.t(), out=out[start : start + tile]).neg_().add_(1.0)
        else:
            sq = q.pow(2).sum(dim=1, keepdim=True) + g_sq - 2.0 * (q @ gf.t())
            out[start : start + tile] = sq.clamp_(min=0).sqrt_()
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

    Peak memory is one (query_tile, G) tile; the result is identical to
    ``rank_metrics(pairwise_distance(qf, gf, metric).numpy(), ...)`` on the full matrix.
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
    parts: list[QueryRanks] = []
    for start in range(0, qf.shape[0], query_tile):
        stop = start + query_tile
        dist = pairwise_distance(qf[start:stop], gf, metric=metric, tile=query_tile)
        parts.append(
            query_ranks(
                dist.cpu().numpy(),
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
