"""Loader throughput: the DALI loader vs. the torch (PIL) loader on the same data, batches and
augmentation, in one process; prints img/s of each, the ratio to the torch loader with 0 workers
and to the best torch loader, and appends the table to bench/RESULTS.md.

    python bench/loader_bench.py --batches 60                  # CPU: DALI decodes on the CPU
    python bench/loader_bench.py --batches 300 --device cuda   # GPU: nvJPEG decode, GPU ops

Images are delivered on ``--device`` (the torch loader's are copied there, as the trainer does).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_from_config
from hpc_reid.data.loaders import dali_loader, torch_loader
from hpc_reid.data.samplers import IdentitySampler

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: The Market recipe's input size and batch (P=16 identities x K=4 images).
DEFAULTS = [
    "data.height=256",
    "data.width=128",
    "sampler.num_identities=16",
    "sampler.num_instances=4",
]


def throughput(loader, sampler, device: torch.device, batches: int, warmup: int) -> float:
    """img/s over ``batches`` batches after ``warmup`` untimed ones, epochs chained."""

    def forever():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream, seen, tic = forever(), 0, None
    for i in range(warmup + batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tic, seen = time.perf_counter(), 0
        images = next(stream)["images"].to(device, non_blocking=True)
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - tic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic/bot.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--torch-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--dali-workers", type=int, default=0, help="DALI Python workers")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    config = load_config(args.config, [*DEFAULTS, *args.overrides])
    device = torch.device(args.device)
    dataset = dataset_from_config(config.data)
    s, h, w, seed = config.sampler, config.data.height, config.data.width, config.engine.seed
    batch = s.num_identities * s.num_instances

    def sampler():
        pids, camids = [r.pid for r in dataset.train], [r.camid for r in dataset.train]
        return IdentitySampler(pids, camids, s.num_identities, s.num_instances, seed=seed)

    rows = []
    for workers in args.torch_workers:
        cfg = config.loader.model_copy(update={"num_workers": workers})
        smp = sampler()
        loader = torch_loader.build_train_loader(dataset.train, smp, cfg, h, w, seed)
        rate = throughput(loader, smp, device, args.batches, args.warmup)
        rows.append((f"torch (PIL), {workers} workers", rate))
    cfg = config.loader.model_copy(update={"num_workers": args.dali_workers})
    smp = sampler()
    loader = dali_loader.build_train_loader(dataset.train, smp, cfg, h, w, seed, device)
    dali = throughput(loader, smp, device, args.batches, args.warmup)
    decode = "nvJPEG + GPU ops" if device.type == "cuda" else "CPU"
    rows.append((f"DALI ({decode}), {args.dali_workers} Python workers", dali))

    base, best = rows[0][1], max(rate for _, rate in rows[:-1])
    lines = [
        f"| loader | img/s | / torch {args.torch_workers[0]} workers |",
        "|---|---|---|",
        *(f"| {name} | {rate:.0f} | {rate / base:.2f} |" for name, rate in rows),
    ]
    table = "\n".join(lines)
    summary = (
        f"{len(dataset.train)} train JPEGs, {h}x{w} output, batch {batch}, BoT augmentation; "
        f"DALI / best torch loader: {dali / best:.2f}"
    )
    print(table)
    print(summary)
    if not args.no_record:
        machine = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{torch.get_num_threads()}-core CPU ({platform.machine()}), no GPU"
        )
        command = "python bench/loader_bench.py " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        stamp = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
        stamp = stamp or datetime.datetime.now().isoformat(timespec="seconds")
        entry = (
            f"\n## loader_bench, {stamp}, {machine}, torch {torch.__version__}\n\n"
            f"`{command}`\n\n{table}\n\n{summary}\n"
        )
        with open(RESULTS, "a") as f:
            f.write(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
