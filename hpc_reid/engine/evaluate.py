"""Evaluation of a model during and after training: features, exact metrics, results and plots.

Each rank extracts features for its shard of the query and gallery images. The shards are then
all-gathered and ranked by the reference path in :mod:`hpc_reid.evaluation`; the sharded ranking
(no rank ever holding Q x G) plugs in here behind the same call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpc_reid.config import Config, write_atomic
from hpc_reid.data.datasets import ImageRecord, ReidDataset
from hpc_reid.data.loaders.torch_loader import build_test_loader
from hpc_reid.evaluation import evaluate_features, extract_features, pairwise_distance
from hpc_reid.evaluation.plots import plot_cmc, plot_ranked_lists


def _gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Undo the ``records[rank::world]`` sharding: all-gather and interleave rows."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    world = dist.get_world_size()
    rows = -(-total // world)
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = local.new_empty((total, *local.shape[1:]))
    for r, part in enumerate(parts):
        n = len(range(r, total, world))
        out[r::world] = part[:n]
    return out


def _features(model, records: list[ImageRecord], config: Config, device) -> torch.Tensor:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    loader = build_test_loader(
        records[rank::world], config.loader, config.data.height, config.data.width
    )
    feats, _, _ = extract_features(model, loader, device, flip=config.evaluation.flip_average)
    return _gather_rows(feats.to(device).float(), len(records)).cpu()


def evaluate_model(
    model: torch.nn.Module,
    dataset: ReidDataset,
    config: Config,
    device: torch.device,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Rank the query against the gallery; every rank returns the same summary.

    With ``out_dir`` the main process writes ``results.json``, ``cmc.png`` and ``ranked.png``.
    """
    qf = _features(model, dataset.query, config, device)
    gf = _features(model, dataset.gallery, config, device)
    q_pids = np.array([r.pid for r in dataset.query])
    g_pids = np.array([r.pid for r in dataset.gallery])
    q_cams = np.array([r.camid for r in dataset.query])
    g_cams = np.array([r.camid for r in dataset.gallery])
    ev = config.evaluation
    result = evaluate_features(
        qf,
        gf,
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        metric=ev.metric,
        max_rank=ev.max_rank,
        backend=ev.backend,
    )
    summary = result.summary()
    main = not dist.is_initialized() or dist.get_rank() == 0
    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(
            out_dir / "results.json",
            json.dumps({**summary, "cmc": [float(c) for c in result.cmc]}, indent=2) + "\n",
        )
        if ev.plots:
            plot_cmc(result.cmc, out_dir / "cmc.png", label=config.name)
            n = min(8, len(dataset.query))
            distmat = pairwise_distance(qf[:n], gf, metric=ev.metric).numpy()
            plot_ranked_lists(
                distmat,
                [r.path for r in dataset.query[:n]],
                [r.path for r in dataset.gallery],
                q_pids[:n],
                g_pids,
                q_cams[:n],
                g_cams,
                out_dir / "ranked.png",
                num_queries=n,
                topk=10,
            )
    return summary
