"""The timed phases of :func:`~hpc_reid.bench.runner.run_bench` on one rank: a training step split
into forward, backward and optimizer (:class:`StepTimer`), the compute-only and end-to-end training
phases, the loader-only phase, the all-reduce fit and per-step gradient all-reduce, and sharded
evaluation. Each starts after ``warmup`` untimed steps and a barrier; CUDA is synchronised at every
timed boundary.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpc_reid.bench.machine import current_memory, peak_memory
from hpc_reid.config import Config
from hpc_reid.data.fields import batch_fields
from hpc_reid.data.loaders import frames_channels_last
from hpc_reid.engine.strategy import DDPStrategy
from hpc_reid.evaluation.sharded import evaluate_sharded, shard_range
from hpc_reid.launch.distributed import barrier

#: all-reduce sizes timed to fit latency and bandwidth (the bucket size is added)
FIT_SIZES = (4 * 1024, 256 * 1024, 4 * 2**20, 32 * 2**20)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """One training step of the trainer (forward, loss, ``strategy.step``), split into forward,
    backward (with zero_grad, clipping, the LR step and DDP's overlapped all-reduce) and
    optimizer (both optimizers' ``step``, timed by their hooks)."""

    def __init__(self, strategy: DDPStrategy, criterion, forward, device: torch.device):
        self.strategy, self.criterion, self.forward, self.device = (
            strategy,
            criterion,
            forward,
            device,
        )
        self.optimizer_s = 0.0
        self._tic = 0.0
        self._handles = []
        for opt in (strategy.optimizer, strategy.extra_optimizer):
            if opt is not None:
                self._handles.append(opt.register_step_pre_hook(self._pre))
                self._handles.append(opt.register_step_post_hook(self._post))

    def _pre(self, *_: Any) -> None:
        sync(self.device)
        self._tic = time.perf_counter()

    def _post(self, *_: Any) -> None:
        sync(self.device)
        self.optimizer_s += time.perf_counter() - self._tic

    def step(
        self, images: torch.Tensor, pids: torch.Tensor, fields: dict | None = None
    ) -> tuple[float, float, float]:
        """(forward_s, backward_s, optimizer_s) of one step; ``fields``: the batch fields the
        loss terms read (computed outside the timed step, as the loader's work)."""
        sync(self.device)
        t0 = time.perf_counter()
        with self.strategy.autocast():
            outputs = self.forward(images)
        total, _ = self.criterion({k: v.float() for k, v in outputs.items()}, pids, fields)
        sync(self.device)
        t1 = time.perf_counter()
        self.optimizer_s = 0.0
        self.strategy.step(total)
        sync(self.device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1 - self.optimizer_s, self.optimizer_s

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def loader_batches(
    loader, sampler, device, channels_last, fields_of=((), (), None)
) -> Iterator[tuple[Any, ...]]:
    """The loader's batches on ``device``, epochs chained: (images, pids, fields), the fields
    ``fields_of`` = (names, training records, config) says (none when no name)."""
    names, records, config = fields_of
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for b in loader:
            images = b["images"].to(device, non_blocking=True)
            if channels_last:
                images = frames_channels_last(images)
            fields = batch_fields(names, records, b["indices"], device, config) if names else {}
            yield images, b["pids"].to(device, non_blocking=True), fields
        epoch += 1


def train_phase(
    batches, steps, warmup, timer: StepTimer, device, batch, contexts=(contextlib.nullcontext,)
) -> list[dict[str, float]]:
    """Timed steps, one per context in ``contexts`` in turn (interleaved, so a change of the
    machine's load affects each alike); the stats of each context's steps."""
    for _ in range(warmup):
        for context in contexts:
            with context():
                timer.step(*next(batches))
    barrier()
    records: list[list[tuple[float, ...]]] = [[] for _ in contexts]
    for _ in range(steps):
        for context, rec in zip(contexts, records, strict=True):
            with context():
                sync(device)
                t0 = time.perf_counter()
                images, pids, fields = next(batches)
                sync(device)
                wait = time.perf_counter() - t0
                f, b, o = timer.step(images, pids, fields)
                rec.append((time.perf_counter() - t0, wait, f, b, o))
    out = []
    for rec in records:
        total, wait, fwd, bwd, opt = (statistics.fmean(col) for col in zip(*rec, strict=True))
        out.append(
            {
                "img_per_s": batch / total,
                "seconds": total * steps,
                "steps": steps,
                "step_s": total,
                "data_wait_s": wait,
                "forward_s": fwd,
                "backward_s": bwd,
                "forward_backward_s": fwd + bwd,
                "optimizer_s": opt,
            }
        )
    return out


def loader_phase(batches, steps, warmup, device, batch) -> dict[str, float]:
    for _ in range(warmup):
        next(batches)
    barrier()
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        next(batches)
    sync(device)
    seconds = time.perf_counter() - tic
    return {"img_per_s": steps * batch / seconds, "seconds": seconds, "steps": steps}


def timed_allreduce(tensors: Sequence[torch.Tensor], device: torch.device) -> float:
    """Seconds of all-reducing ``tensors`` one after another, all ranks starting together."""
    dist.barrier()
    sync(device)
    tic = time.perf_counter()
    for t in tensors:
        dist.all_reduce(t)
    sync(device)
    return time.perf_counter() - tic


def comm_phase(params: int, bucket_bytes: int, device, steps: int, warmup: int) -> dict:
    """Latency/bandwidth timings, and the bucketed gradient all-reduce per step (medians).

    The cases are timed in interleaved rounds, so that a change of the machine's load during the
    phase affects the fit and the per-step measurement alike."""
    flat = torch.zeros(params, dtype=torch.float32, device=device)
    buckets = list(flat.split(max(1, bucket_bytes // 4)))
    sizes = sorted({*FIT_SIZES, min(bucket_bytes, params * 4)})
    probe = torch.zeros(max(sizes) // 4, dtype=torch.float32, device=device)
    cases = [[probe[: max(1, n // 4)]] for n in sizes] + [buckets]
    for _ in range(max(1, warmup)):
        for case in cases:
            timed_allreduce(case, device)
    rounds = [[timed_allreduce(case, device) for case in cases] for _ in range(max(5, steps))]
    medians = [statistics.median(column) for column in zip(*rounds, strict=True)]
    return {
        "allreduce_s": medians[-1],
        "buckets": len(buckets),
        "gradient_bytes": params * 4,
        "fit_sizes_bytes": [max(1, n // 4) * 4 for n in sizes],
        "fit_seconds": medians[:-1],
    }


def eval_phase(nq, ng, dim, device, config: Config, rank, world) -> dict[str, Any]:
    """Sharded exact evaluation of random features: Market-like labels (about 20 gallery images
    per identity, 6 cameras), each rank generating only its own shard."""
    qr, gr = shard_range(nq, rank, world), shard_range(ng, rank, world)
    rng = np.random.default_rng([config.engine.seed, rank])
    ids = max(2, ng // 20)
    gen = torch.Generator().manual_seed(config.engine.seed * 1000 + rank)
    qf = torch.randn(len(qr), dim, generator=gen).to(device)
    gf = torch.randn(len(gr), dim, generator=gen).to(device)
    q_pids, g_pids = rng.integers(0, ids, len(qr)), rng.integers(0, ids, len(gr))
    q_cams, g_cams = rng.integers(0, 6, len(qr)), rng.integers(0, 6, len(gr))
    before, kind = current_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    barrier()
    sync(device)
    tic = time.perf_counter()
    result = evaluate_sharded(
        qf,
        gf,
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        metric=config.evaluation.metric,
        max_rank=config.evaluation.max_rank,
    )
    sync(device)
    seconds = time.perf_counter() - tic
    peak, _ = peak_memory(device)
    return {
        "seconds": seconds,
        "queries_local": len(qr),
        "gallery_local": len(gr),
        "memory_before_gib": before,
        "peak_memory_gib": peak,
        "memory_kind": kind,
        "mAP": float(result.mAP),
    }
