"""What an anchor refresh costs (issue 17): the anchor loss recomputes every class's anchor over
the whole un-augmented training set at the start of every stage-2 epoch; this measures that pass
and the training epoch it precedes, in one process, and prints their ratio.

The refresh is the trainer's own (``ReidLoss.refresh`` -> ``class_means``: eval mode, the test
transform, flip-averaged as configured), timed whole over ``--images`` training images (the data
set's training records repeated to that many, with their labels: a Market-size set is 12,936,
and only the count matters for timing; fewer: evenly spaced ones). The epoch is the configured
sampler's batches per epoch over those images times the mean wall time of ``--steps`` training
steps (forward, the config's losses with the anchors just computed, backward, optimizer step),
after ``--warmup`` steps. Both grow linearly with the images, so their ratio does not depend on
``--images``: a slow model can be timed on a subset.
Weights are the model's initial ones (random without model.pretrained): timing only.

    python bench/anchor_refresh.py --config configs/synthetic/anchor_stage2.yaml
    python bench/anchor_refresh.py --config configs/synthetic/anchor_stage2.yaml --images 12936
    python bench/anchor_refresh.py ... --set model.backbone=resnet50 --set data.height=256 \\
        --set data.width=128 --images 640 --steps 3   # the Market recipe's model, on a subset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from hpc_reid.bench.machine import cpu_model
from hpc_reid.cli import add_overrides
from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_on_ranks
from hpc_reid.data.loaders import build_backend_train_loader
from hpc_reid.data.samplers import build_sampler
from hpc_reid.engine.class_means import class_means
from hpc_reid.engine.optim import build_optimizer
from hpc_reid.losses import ReidLoss
from hpc_reid.models import build_model


def repeated(records: list, n: int | None) -> list:
    """``records`` repeated (in order, cut) to ``n`` items; all of them when ``n`` is None; ``n``
    evenly spaced ones when fewer (so that every class keeps images: a subset for timing a slow
    model, the ratio being independent of the count)."""
    if n is None:
        return list(records)
    if n <= len(records):
        return [records[i * len(records) // n] for i in range(n)]
    reps = -(-n // len(records))
    return [dataclasses.replace(r) for r in (records * reps)[:n]]


def measure(config, images: int | None, steps: int, warmup: int) -> dict:
    device = torch.device("cpu")
    dataset = dataset_on_ranks(config.data, True)
    train = repeated(dataset.train, images)
    num_classes = dataset.num_train_pids
    torch.manual_seed(config.engine.seed)
    model = build_model(config.model, num_classes)
    if config.engine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = ReidLoss(
        config.loss, num_classes, model.feature_dim, model.output_keys, config.model.head
    )

    def means(requests):
        return class_means(model, train, config, device, requests, num_classes)

    tic = time.perf_counter()
    refreshed = criterion.refresh(0, 0, True, means)
    refresh_s = time.perf_counter() - tic
    if not refreshed:
        raise SystemExit(f"{config.name}: no loss term refreshes (set loss.anchor.weight > 0)")

    sampler = build_sampler(train, config.sampler, config.engine.seed)
    sampler.set_epoch(0)
    loader = build_backend_train_loader(
        train,
        sampler,
        config.loader,
        config.data.height,
        config.data.width,
        config.engine.seed,
        device,
        channels_last=config.engine.channels_last,
    )
    optimizer = build_optimizer(model, config.optimizer, config.optimizer.lr)
    model.train()
    times = []
    for i, batch in enumerate(loader):
        if i == warmup + steps:
            break
        tic = time.perf_counter()
        images_t = batch["images"]
        if config.engine.channels_last:
            images_t = images_t.contiguous(memory_format=torch.channels_last)
        total, _ = criterion(model(images_t), batch["pids"])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    if not times:
        raise SystemExit(f"an epoch of {sampler.batches_per_epoch} batches: no step to time")
    step_s = sum(times) / len(times)
    epoch_s = step_s * sampler.batches_per_epoch
    return {
        "config": config.name,
        "backbone": config.model.backbone,
        "input": f"{config.data.height}x{config.data.width}",
        "training_images": len(train),
        "classes": num_classes,
        "flip_average": config.loss.anchor.flip_average,
        "refresh_s": round(refresh_s, 4),
        "refresh_images_per_s": round(len(train) / refresh_s, 1),
        "batch": sampler.describe(),
        "batches_per_epoch": sampler.batches_per_epoch,
        "step_s": round(step_s, 4),
        "timed_steps": len(times),
        "epoch_s": round(epoch_s, 4),
        "refresh_per_epoch": round(refresh_s / epoch_s, 3),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    add_overrides(p, "config override")
    p.add_argument("--images", type=int, help="training images (repeated); default: the set's")
    p.add_argument("--steps", type=int, default=10, help="training steps timed")
    p.add_argument("--warmup", type=int, default=2, help="training steps before timing")
    p.add_argument("--json", type=Path, help="also write the row here")
    args = p.parse_args(argv)
    config = load_config(args.config, args.overrides)
    row = measure(config, args.images, args.steps, args.warmup)
    print(
        f"{row['config']} ({row['backbone']} {row['input']}, {row['threads']} threads): refresh "
        f"over {row['training_images']} images ({row['classes']} classes, flip "
        f"{row['flip_average']}) {row['refresh_s']} s = {row['refresh_images_per_s']} img/s; "
        f"epoch {row['batches_per_epoch']} x {row['step_s']} s = {row['epoch_s']} s "
        f"({row['batch']}); refresh / epoch = {row['refresh_per_epoch']}"
    )
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
