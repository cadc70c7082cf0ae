"""Training throughput: the train step on synthetic tensors vs. fed by the torch loader.

Same model, loss, optimizer and batch in one process; prints img/s of each and their ratio (how much
of the compute-only speed the loader lets through) and appends the table to bench/RESULTS.md.

    python bench/train_throughput.py --config configs/synthetic/bot.yaml --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

from hpc_reid.bench.machine import cpu_model
from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_from_config
from hpc_reid.data.loaders.torch_loader import build_train_loader
from hpc_reid.data.samplers import IdentitySampler
from hpc_reid.engine.optim import build_optimizer, build_scheduler, scaled_lr
from hpc_reid.engine.strategy import DDPStrategy
from hpc_reid.engine.trainer import select_device
from hpc_reid.losses import ReidLoss
from hpc_reid.models import build_model

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def timed_steps(strategy, criterion, batches, device, channels_last, steps, warmup) -> float:
    """img/s over ``steps`` steps after ``warmup`` untimed ones; batches is an iterator."""
    seen, tic = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic, seen = time.perf_counter(), 0
        images, pids = next(batches)
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with strategy.autocast():
            outputs = strategy.model(images)
        total, _ = criterion({k: v.float() for k, v in outputs.items()}, pids.to(device))
        strategy.step(total)
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - tic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic/bot.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    device = select_device(config.engine.device, 0)
    dataset = dataset_from_config(config.data)
    s = config.sampler
    batch = s.num_identities * s.num_instances

    torch.manual_seed(config.engine.seed)
    model = build_model(config.model, dataset.num_train_pids).to(device)
    if config.engine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = ReidLoss(config.loss, dataset.num_train_pids, model.feature_dim).to(device)
    optimizer = build_optimizer(model, config.optimizer, scaled_lr(config.optimizer, batch)[0])
    scheduler = build_scheduler(optimizer, config.schedule, 100)
    strategy = DDPStrategy(
        model, optimizer, scheduler, device=device, precision=config.engine.precision
    )
    cl = config.engine.channels_last

    # compute only: one fixed batch of tensors already in memory, identity-balanced labels
    images = torch.randn(batch, 3, config.data.height, config.data.width)
    pids = torch.arange(s.num_identities).repeat_interleave(s.num_instances)
    forever = iter(lambda: (images, pids), None)
    compute = timed_steps(strategy, criterion, forever, device, cl, args.steps, args.warmup)

    sampler = IdentitySampler(
        [r.pid for r in dataset.train],
        [r.camid for r in dataset.train],
        s.num_identities,
        s.num_instances,
        seed=config.engine.seed,
        allow_replacement=s.allow_replacement,
    )
    loader = build_train_loader(
        dataset.train, sampler, config.loader, config.data.height, config.data.width, 0
    )

    def loader_batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for b in loader:
                yield b["images"], b["pids"]
            epoch += 1

    fed = timed_steps(strategy, criterion, loader_batches(), device, cl, args.steps, args.warmup)

    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    )
    table = "\n".join(
        [
            "| model | input | batch | precision | loader workers | compute-only img/s "
            "| torch loader img/s | loader / compute |",
            "|---|---|---|---|---|---|---|---|",
            f"| {config.model.backbone} | {config.data.height}x{config.data.width} | {batch} "
            f"| {config.engine.precision} | {config.loader.num_workers} | {compute:.0f} "
            f"| {fed:.0f} | {fed / compute:.2f} |",
        ]
    )
    print(table)
    if not args.no_record:
        command = "python bench/train_throughput.py " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        stamp = datetime.date.today().isoformat()
        entry = (
            f"\n## train_throughput, {stamp}, {machine}, torch {torch.__version__}\n\n"
            f"`{command}`\n\n{table}\n"
        )
        with open(RESULTS, "a") as f:
            f.write(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
