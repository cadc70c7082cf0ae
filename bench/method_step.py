"""What a method's training step costs against the baseline's: the same batches, the same
backbone, timed alternately in one process, and their ratio.

Each config builds its model, loss terms (with the batch fields they read: SAN's textures),
optimizer and loader as the trainer does; both take the same images (the first config's loader
and sampler, so the batch is the same), and their steps (forward, losses, backward, optimizer step)
alternate so that load on the machine hits both alike. Reported: the median step of each over
``--steps`` after ``--warmup``, and method / baseline.

    python bench/method_step.py --baseline configs/synthetic/bot.yaml \\
        --method configs/synthetic/san.yaml
    python bench/method_step.py --baseline configs/synthetic/bot.yaml \\
        --method configs/synthetic/alignedreid.yaml --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from hpc_reid.cli import add_overrides
from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_on_ranks
from hpc_reid.data.fields import with_fields
from hpc_reid.data.loaders import build_backend_train_loader
from hpc_reid.data.samplers import build_sampler
from hpc_reid.engine.optim import build_optimizer
from hpc_reid.losses import ReidLoss
from hpc_reid.models import build_model


class Stepper:
    """One config's model, criterion and optimizer, and its training step on a batch."""

    def __init__(self, config, dataset):
        self.config, self.dataset = config, dataset
        torch.manual_seed(config.engine.seed)
        num_classes = dataset.num_train_pids
        self.model = build_model(config.model, num_classes)
        if config.engine.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = ReidLoss(
            config.loss,
            num_classes,
            self.model.feature_dim,
            self.model.output_keys,
            config.model.head,
        )
        self.optimizer = build_optimizer(self.model, config.optimizer, config.optimizer.lr)
        self.model.train()

    def step(self, batch) -> float:
        tic = time.perf_counter()
        fields = with_fields(
            batch,
            self.criterion.batch_fields,
            self.dataset.train,
            torch.device("cpu"),
            config=self.config,
        )
        images = batch["images"]
        if self.config.engine.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        total, _ = self.criterion(self.model(images), batch["pids"], fields)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return time.perf_counter() - tic


def measure(baseline, method, steps: int, warmup: int) -> dict:
    dataset = dataset_on_ranks(baseline.data, True)
    if dataset_on_ranks(method.data, True).train != dataset.train:
        raise SystemExit("the two configs read different training sets: no common batch")
    sampler = build_sampler(dataset.train, baseline.sampler, baseline.engine.seed)
    sampler.set_epoch(0)
    loader = build_backend_train_loader(
        dataset.train,
        sampler,
        baseline.loader,
        baseline.data.height,
        baseline.data.width,
        baseline.engine.seed,
        torch.device("cpu"),
    )
    runs = {"baseline": Stepper(baseline, dataset), "method": Stepper(method, dataset)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    done = 0
    while done < warmup + steps:
        for batch in loader:
            if done == warmup + steps:
                break
            for name, run in runs.items():
                elapsed = run.step(batch)
                if done >= warmup:
                    times[name].append(elapsed)
            done += 1
        sampler.set_epoch(sampler.epoch + 1)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "baseline": baseline.name,
        "method": method.name,
        "backbone": f"{baseline.model.backbone} / {method.model.backbone}",
        "input": f"{baseline.data.height}x{baseline.data.width}",
        "batch": sampler.describe(),
        "baseline_step_s": round(median["baseline"], 4),
        "method_step_s": round(median["method"], 4),
        "ratio": round(median["method"] / median["baseline"], 2),
        "timed_steps": steps,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", required=True, type=Path)
    p.add_argument("--method", required=True, type=Path)
    add_overrides(p, "override for both configs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_config(args.baseline, args.overrides)
    method = load_config(args.method, args.overrides)
    row = measure(baseline, method, args.steps, args.warmup)
    print(
        f"{row['method']} vs {row['baseline']} ({row['backbone']}, {row['input']}, {row['batch']}, "
        f"{row['threads']} threads): {row['method_step_s']} s vs {row['baseline_step_s']} s a "
        f"step = {row['ratio']}x"
    )
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
