"""Loader throughput: the DALI loader vs. the torch (PIL) loader on the same data, batches and
augmentation, in one process; prints img/s of each, the ratio to the torch loader with 0 workers
and to the best torch loader, and appends the table to bench/RESULTS.md. A reference row is the
loader fast-reid and torchreid users have: PIL and a torchvision ``Compose`` of the same BoT
transforms in a DataLoader. The loaders are timed in alternating rounds (median round).

    python bench/loader_bench.py                               # CPU: DALI decodes on the CPU
    python bench/loader_bench.py --batches 300 --device cuda   # GPU: nvJPEG decode, GPU ops

Images are delivered on ``--device`` (the torch loader's are copied there, as the trainer does).
``--dali-stages`` adds DALI's CPU graph cut after each operator (decode, resize of the crop
window, pad-mirror-normalise), to show what each costs, and the 4-operator graph it replaced.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from hpc_reid.bench.machine import cpu_model
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


def batches_forever(loader, sampler) -> Iterator[dict]:
    """The loader's batches, epochs chained as the trainer chains them."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


#: Each round starts with at least this long untimed, so that work left over from the previous
#: loader's round (its workers' prefetching) is over.
WARMUP_SECONDS = 0.5


def throughputs(
    streams: dict[str, Iterator[dict]], device: torch.device, batches: int, warmup: int, rounds: int
) -> dict[str, float]:
    """img/s of each stream: ``rounds`` rounds in turn, each at least ``warmup`` untimed batches
    and WARMUP_SECONDS (more than any loader's prefetch queue, which filled while the others
    ran) then ``batches / rounds`` timed ones; the median round. Rounds in turn, because on a
    shared machine the speed drifts over a run and one pass per loader would compare different
    moments."""
    rates: dict[str, list[float]] = {name: [] for name in streams}
    per_round = max(1, batches // rounds)
    for _ in range(rounds):
        for name, stream in streams.items():
            start, n = time.perf_counter(), 0
            while n < warmup or time.perf_counter() - start < WARMUP_SECONDS:
                next(stream)
                n += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tic, seen = time.perf_counter(), 0
            for _ in range(per_round):
                seen += len(next(stream)["images"].to(device, non_blocking=True))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[name].append(seen / (time.perf_counter() - tic))
    return {name: statistics.median(r) for name, r in rates.items()}


class TorchvisionReference(torch.utils.data.Dataset):
    """What fast-reid and torchreid train with: PIL decode and a torchvision ``Compose`` of BoT's
    transforms (resize, flip, pad 10, random crop, to tensor, normalise, random erasing), for the
    reference row; its randomness is torchvision's own."""

    def __init__(self, records, height: int, width: int, augment) -> None:
        from torchvision import transforms as T

        self.records = records
        self.transform = T.Compose(
            [
                T.Resize((height, width)),
                T.RandomHorizontalFlip(augment.flip_prob),
                T.Pad(augment.pad),
                T.RandomCrop((height, width)),
                T.ToTensor(),
                T.Normalize(augment.mean, augment.std),
                T.RandomErasing(augment.random_erasing_prob, value=0),
            ]
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        with Image.open(self.records[i].path) as img:
            return {"images": self.transform(img.convert("RGB"))}


STAGES = (
    "decode",
    "+ resize of the crop window",
    "+ pad, mirror, normalise (the loader's graph)",
    "before: resize, slice, mirror-normalise, erase",
)


def dali_stage_rates(records, height: int, width: int, batch: int, batches: int) -> list[tuple]:
    """img/s of the DALI loader's CPU graph cut after each operator, and of the graph it replaced
    (4 operators, DALI's erase), with random per-sample flips, windows and erase boxes; encoded
    bytes read once up front, so the callback's file reads and the copy out are not included."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    raw = [np.fromfile(str(r.path), dtype=np.uint8) for r in records]
    rng = np.random.default_rng(0)
    mean, std = [124.0] * 3, [58.0] * 3

    def source(info):
        window = rng.integers(-10, 11, (batch, 2)).astype(np.int32)
        at = np.tile(np.array([[height / 4, width / 4]], np.float32), (batch, 1))
        shape = np.tile(np.array([[height / 3, width / 3]], np.float32), (batch, 1))
        return (
            [raw[j] for j in rng.integers(0, len(raw), batch)],
            rng.integers(0, 2, batch).astype(np.int32),
            window,
            *dali_loader.window_roi(window, height, width),
            at,
            shape,
        )

    def graph(stage: str):
        jpegs, flip, window, visible, roi_start, roi_end, crop_pos, at, shape = fn.external_source(
            source=source, num_outputs=9, batch=True, batch_info=True
        )
        x = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        if stage == STAGES[0]:
            return x
        if stage == STAGES[3]:
            x = fn.resize(
                x, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR, antialias=True
            )
            x = fn.slice(
                x, start=window, shape=[height, width], axis_names="HW", out_of_bounds_policy="pad"
            )
            x = fn.crop_mirror_normalize(
                x, mirror=flip, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std
            )
            return fn.erase(x, anchor=at, shape=shape, axis_names="HW", fill_value=0.0)
        x = dali_loader.resize_window(x, visible, roi_start, roi_end)  # the loader's operators
        if stage == STAGES[1]:
            return x
        return dali_loader.pad_mirror_normalise(x, crop_pos, flip, height, width, mean, std)

    threads = len(os.sched_getaffinity(0))  # as the loader
    pipes = {}
    for stage in STAGES:
        pipe = pipeline_def(graph, batch_size=batch, num_threads=threads, device_id=None)(stage)
        pipe.build()
        for _ in range(5):
            pipe.run()
        pipes[stage] = pipe
    # Rounds in turn, the median of each: on a shared machine the speed drifts between runs.
    rates = {stage: [] for stage in STAGES}
    for _ in range(4):
        for stage, pipe in pipes.items():
            n = max(1, batches // 4)
            tic = time.perf_counter()
            for _ in range(n):
                pipe.run()
            rates[stage].append(batch * n / (time.perf_counter() - tic))
    return [(stage, float(np.median(rates[stage]))) for stage in STAGES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic/bot.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=120, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches per round")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds, loaders in turn")
    parser.add_argument(
        "--reference-workers",
        type=int,
        default=2,
        help="workers of the torchvision-Compose reference loader (fast-reid style); -1: none",
    )
    parser.add_argument("--torch-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--dali-workers", type=int, default=0, help="DALI Python workers")
    parser.add_argument("--dali-stages", action="store_true", help="also time each DALI operator")
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

    # Two phases, each in alternating rounds: the loaders without worker processes (DALI among
    # them), then those with. A DataLoader with workers forks new ones at every epoch, and while
    # they live every page the parent shares with them costs the parent a copy-on-write fault on
    # its next write: interleaved with such loaders, DALI ran at 2,700 instead of 4,000 img/s.
    in_process, forking = {}, {}
    for workers in args.torch_workers:
        cfg = config.loader.model_copy(update={"num_workers": workers})
        smp = sampler()
        loader = torch_loader.build_train_loader(dataset.train, smp, cfg, h, w, seed)
        (forking if workers else in_process)[f"torch (PIL), {workers} workers"] = batches_forever(
            loader, smp
        )
    cfg = config.loader.model_copy(update={"num_workers": args.dali_workers})
    smp = sampler()
    loader = dali_loader.build_train_loader(dataset.train, smp, cfg, h, w, seed, device)
    decode = "nvJPEG + GPU ops" if device.type == "cuda" else "CPU"
    pipes, threads, _ = dali_loader.pipeline_layout(cfg, device.type == "cuda")
    dali_name = (
        f"DALI ({decode}), {pipes} pipeline(s) x {threads} thread(s), "
        f"{args.dali_workers} Python workers"
    )
    (forking if args.dali_workers else in_process)[dali_name] = batches_forever(loader, smp)
    if args.reference_workers >= 0:
        smp = sampler()
        reference = TorchvisionReference(dataset.train, h, w, config.loader.augment)
        loader = torch.utils.data.DataLoader(
            reference, batch_sampler=smp, num_workers=args.reference_workers
        )
        name = f"reference: torchvision Compose (fast-reid style), {args.reference_workers} workers"
        (forking if args.reference_workers else in_process)[name] = batches_forever(loader, smp)
    rates = {}
    for phase in (in_process, forking):
        if phase:
            rates.update(throughputs(phase, device, args.batches, args.warmup, args.rounds))
        phase.clear()  # ends the loaders (and their workers) before the next phase
    # Rows: the torch loaders in the order asked, the reference, DALI.
    torch_names = [f"torch (PIL), {w} workers" for w in args.torch_workers]
    reference = [n for n in rates if n not in torch_names and n != dali_name]
    rows = [(name, rates[name]) for name in [*torch_names, *reference, dali_name]]
    dali = rates[dali_name]

    base = rows[0][1]
    best = max(rates[name] for name in torch_names)
    lines = [
        f"| loader | img/s | / torch {args.torch_workers[0]} workers |",
        "|---|---|---|",
        *(f"| {name} | {rate:.0f} | {rate / base:.2f} |" for name, rate in rows),
    ]
    if args.dali_stages and device.type == "cpu":
        lines += [
            "",
            "| DALI CPU graph cut after | img/s |",
            "|---|---|",
            *(
                f"| {stage} | {rate:.0f} |"
                for stage, rate in dali_stage_rates(dataset.train, h, w, batch, args.batches)
            ),
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
            else f"{torch.get_num_threads()}-core CPU ({cpu_model()}), no GPU"
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
