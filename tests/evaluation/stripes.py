"""A stand-in part distance for the retrieval-row tests, and rows of a global and a stripe part.

``stripe_sum``: the sum over stripes of the stripes' Euclidean distances (the diagonal path of
AlignedReID's DMLI matrix, without its squashing). Each value is computed element by element in a
fixed order, so it does not depend on the block it is computed in: a sharded or streamed evaluation
sees the same bits as one process. Registered on import (spawned test workers import it too).
"""

from __future__ import annotations

import numpy as np
import torch

from hpc_reid.evaluation import RowLayout, register_part_distance
from hpc_reid.evaluation.parts import METRIC
from tests.evaluation.test_sharded import make_case

NAME = "test_stripe_sum"
GLOBAL_DIM, STRIPES, CHANNELS = 4, 3, 2


def stripe_sum(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(tq, S, C), (tg, S, C) -> (tq, tg) float32."""
    per_stripe = (q[:, None] - g[None]).pow(2).sum(-1).sqrt()  # (tq, tg, S)
    out = per_stripe[..., 0].clone()
    for s in range(1, per_stripe.shape[-1]):
        out += per_stripe[..., s]
    return out.float()


register_part_distance(NAME, stripe_sum)


def layout() -> RowLayout:
    """global (GLOBAL_DIM,) "metric" from "bn", then local (STRIPES, CHANNELS) ``stripe_sum``."""
    return RowLayout.build(
        {
            "global": ("bn", METRIC, (GLOBAL_DIM,)),
            "local": ("local", NAME, (STRIPES, CHANNELS)),
        }
    )


def stripe_sum_float64(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The independent reference: a loop over stripes in float64."""
    out = np.zeros((len(q), len(g)))
    for s in range(q.shape[1]):
        diff = q[:, None, s, :].astype(np.float64) - g[None, :, s, :]
        out += np.sqrt((diff**2).sum(-1))
    return out


def metric_float64(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    q, g = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return 1.0 - q @ g.T
    return np.sqrt(((q[:, None] - g[None]) ** 2).sum(-1))


def combined_float64(qrows, grows, metric: str, w_global: float, w_local: float) -> np.ndarray:
    """w_global * metric(global) + w_local * stripe_sum(local), rows laid out as :func:`layout`."""
    qrows, grows = np.asarray(qrows, np.float64), np.asarray(grows, np.float64)
    qg, gg = qrows[:, :GLOBAL_DIM], grows[:, :GLOBAL_DIM]
    ql = qrows[:, GLOBAL_DIM:].reshape(-1, STRIPES, CHANNELS)
    gl = grows[:, GLOBAL_DIM:].reshape(-1, STRIPES, CHANNELS)
    return w_global * metric_float64(qg, gg, metric) + w_local * stripe_sum_float64(ql, gl)


def integer_stripes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, STRIPES * CHANNELS) entries in {-1, 0, 1}: stripe distances are square roots of small
    integers, computed exactly alike anywhere, and many are tied."""
    return rng.integers(-1, 2, size=(n, STRIPES * CHANNELS)).astype(np.float64)


def tied_case(seed: int, metric: str):
    """Rows whose every distance is computed exactly alike in any block (make_case's global
    features, integer stripes): many exact ties, the same bits however the work is split."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed, metric)
    rng = np.random.default_rng(seed + 50)
    q = np.concatenate([qf, integer_stripes(rng, len(qf))], axis=1)
    g = np.concatenate([gf, integer_stripes(rng, len(gf))], axis=1)
    return (
        torch.from_numpy(q).float(),
        torch.from_numpy(g).float(),
        (q_pids, g_pids, q_cams, g_cams),
    )
