"""The per-process benchmark: what one training configuration costs on this machine, rank by rank.

:func:`run_bench` runs on every rank of a job (one process, torchrun, srun, or a Ray Train worker
whose process group Ray already initialised; it only initialises, and then destroys, a group it
finds absent). In order, with the model, loss, optimizer and strategy of the trainer:

1. **evaluation**: sharded exact CMC/mAP (``evaluate_sharded``) of random features of the given
   query/gallery size, each rank holding its contiguous shard; seconds and peak memory (CUDA
   allocated, or the process's high-water RSS on the CPU);
2. **communication** (more than one rank): timed all-reduces of a few sizes (after a barrier, so
   rank skew is not counted) fit the latency and bandwidth of :mod:`~hpc_reid.bench.comm_model`;
   then a flat buffer of the model's gradient size, all-reduced in DDP's buckets
   (``bucket_cap_mb``) one after another, gives the all-reduce time per step *if nothing overlaps*;
3. **compute-only**: training steps on synthetic tensors already on the device; each step is
   split into forward (+ loss), backward (DDP's all-reduce runs inside it, overlapped with the
   gradient computation) and optimizer (timed by the optimizers' step hooks); steps under DDP's
   ``no_sync()``, alternating with them, give the step without gradient communication, so the
   difference is the *exposed* communication time, the part the overlap does not hide;
4. per loader backend: **loader-only** (batches delivered on the device, no compute) and
   **end-to-end** (loader + step), with the time blocked on the loader as data wait.

Timed phases start after ``warmup`` untimed steps and a barrier; CUDA is synchronised at every
boundary that is timed; a phase's img/s is the batch over its mean step time (data wait
included). Per-rank results are all-gathered; rank 0 aggregates them
(:func:`~hpc_reid.bench.report.aggregate`) and writes ``bench.json`` atomically.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import hpc_reid
from hpc_reid.bench.machine import cpu_model
from hpc_reid.config import Config, ConfigError
from hpc_reid.data.build import dataset_on_ranks
from hpc_reid.data.fields import batch_fields
from hpc_reid.data.loaders import BACKENDS as LOADER_BACKENDS
from hpc_reid.data.loaders import (
    build_backend_train_loader,
    frames_channels_last,
    resolve_backend,
)
from hpc_reid.data.samplers import build_sampler, rank_batch_size
from hpc_reid.engine.optim import (
    build_optimizer,
    build_scheduler,
    scaled_lr,
    strategy_args,
)
from hpc_reid.engine.strategy import DDPStrategy, prepare_model
from hpc_reid.engine.trainer import select_device
from hpc_reid.evaluation.sharded import evaluate_sharded, shard_range
from hpc_reid.launch.distributed import barrier, choose_backend, detect_env, init_distributed
from hpc_reid.losses import ReidLoss
from hpc_reid.models import build_model

SCALING = ("weak", "strong")
#: all-reduce sizes timed to fit latency and bandwidth (the bucket size is added)
FIT_SIZES = (4 * 1024, 256 * 1024, 4 * 2**20, 32 * 2**20)
GIB = 2**30


def parse_loaders(spec: str | Sequence[str] | None, config: Config) -> list[str]:
    """``"dali,torch"`` -> the resolved backends, without repeats; ``None``: the config's
    ``loader.backend``; ``"none"``: no loader phases. Unknown or uninstalled: ConfigError."""
    if spec is None:
        names = [config.loader.backend]
    elif isinstance(spec, str):
        names = [n.strip() for n in spec.split(",") if n.strip()]
    else:
        names = list(spec)
    if names == ["none"]:
        return []
    out: list[str] = []
    for name in names:
        if name not in LOADER_BACKENDS:
            raise ConfigError(
                f"--loaders: unknown loader {name!r}; expected a comma-separated list of "
                f"{', '.join(LOADER_BACKENDS)} (or 'none')"
            )
        resolved = resolve_backend(name)
        if resolved not in out:
            out.append(resolved)
    return out


def check_settings(steps: int, warmup: int, scaling: str, eval_query: int, eval_gallery: int):
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    if scaling not in SCALING:
        raise ConfigError(f"--scaling must be one of {SCALING}, got {scaling!r}")
    if eval_query < 0 or eval_gallery < 0 or (eval_query > 0) != (eval_gallery > 0):
        raise ConfigError(
            f"--eval-size: need QUERIES,GALLERY both > 0 (or 0,0 to skip), got "
            f"{eval_query},{eval_gallery}"
        )


def strong_scaled(config: Config, world: int) -> Config:
    """The config with the rank batch divided by ``world`` (P for identity batches, the batch
    size for random ones): the global batch of one rank, kept fixed."""
    s = config.sampler
    key, value = ("num_identities", s.num_identities)
    if s.kind == "random":
        key, value = ("batch_size", rank_batch_size(s))
    if value % world:
        raise ConfigError(
            f"--scaling strong: sampler.{key}={value} is not divisible by the world size "
            f"{world}; choose it as a multiple of the largest world size"
        )
    sampler = s.model_copy(update={key: value // world})
    return config.model_copy(update={"sampler": sampler})


def run_bench(
    config: Config,
    steps: int = 20,
    warmup: int = 2,
    loaders: str | Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    scaling: str = "weak",
    eval_query: int = 3368,
    eval_gallery: int = 15913,
    eval_dim: int | None = None,
    command: str | None = None,
    local_rank: int | None = None,
    launcher: str | None = None,
) -> dict[str, Any]:
    """Benchmark ``config`` on this rank; every rank of the job calls it (collective).

    Returns the whole report (every rank's results and the aggregate) on every rank; rank 0
    writes it to ``out_dir/bench.json`` when ``out_dir`` is given. ``eval_dim`` defaults to the
    model's feature dimension; ``eval_query=eval_gallery=0`` skips the evaluation.
    ``local_rank`` (the CUDA device index) defaults to ``LOCAL_RANK`` or the launcher's;
    ``launcher`` names, in the report, who started the processes (default: torchrun, slurm or
    none as detected, or "external" for a process group initialised before the call, e.g. "ray"
    passed by the Ray launcher).
    """
    check_settings(steps, warmup, scaling, eval_query, eval_gallery)
    backends = parse_loaders(loaders, config)
    if config.engine.strategy != "ddp":
        raise ConfigError(
            f"engine.strategy={config.engine.strategy!r}: the benchmark measures the DDP strategy"
        )
    env = detect_env()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", env.local_rank))
    device = select_device(config.engine.device, local_rank)
    owned = not dist.is_initialized()
    if owned:
        init_distributed(
            env, choose_backend(config.distributed.backend, device), config.distributed.timeout_s
        )
    launcher = launcher or (env.launcher if owned else "external")
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        base_p = config.sampler.num_identities
        if scaling == "strong":
            config = strong_scaled(config, world)
        report = _bench(
            config, rank, world, device, steps, warmup, backends, eval_query, eval_gallery, eval_dim
        )
        if rank == 0:
            from hpc_reid.bench.report import aggregate, write_json_atomic

            s = config.sampler
            report["settings"].update(
                steps=steps,
                warmup=warmup,
                loaders=backends,
                scaling=scaling,
                base_num_identities=base_p,
                sampler=s.kind,
                num_identities=s.num_identities,
                num_instances=s.num_instances,
                per_rank_batch=rank_batch_size(s),
                global_batch=rank_batch_size(s) * world,
            )
            report["environment"].update(launcher=launcher)
            report["config"] = {"name": config.name, "resolved": config.to_dict()}
            report["command"] = command
            report["aggregate"] = aggregate(report["settings"], report["ranks"])
            if out_dir is not None:
                write_json_atomic(Path(out_dir) / "bench.json", report)
        if world > 1:  # every rank returns the same report
            box = [report if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            report = box[0]
        return report
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench(config, rank, world, device, steps, warmup, backends, eval_query, eval_gallery, dim):
    local = {"rank": rank, **_local_environment(device)}

    dataset = dataset_on_ranks(
        config.data, rank == 0, announce=functools.partial(print, flush=True)
    )

    torch.manual_seed(config.engine.seed)
    num_classes = dataset.num_train_pids
    model = build_model(config.model, num_classes).to(device)
    model, _ = prepare_model(model, config, device, world)  # as the trainer: SyncBN, channels_last
    criterion = ReidLoss(
        config.loss, num_classes, model.feature_dim, model.output_keys, config.model.head
    ).to(device)
    s = config.sampler
    batch = rank_batch_size(s)
    lr, _ = scaled_lr(config.optimizer, batch * world)
    optimizer = build_optimizer(model, config.optimizer, lr)
    scheduler = build_scheduler(optimizer, config.schedule, 1000)
    strategy = DDPStrategy(
        model,
        optimizer,
        scheduler,
        device=device,
        **strategy_args(config, criterion),
    )
    forward = torch.compile(strategy.model) if config.engine.compile else strategy.model
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bucket_bytes = int(getattr(strategy.model, "bucket_bytes_cap", 25 * 2**20))
    timer = _StepTimer(strategy, criterion, forward, device)

    if eval_query > 0:
        d = dim or model.feature_dim
        local["eval"] = _eval_phase(eval_query, eval_gallery, d, device, config, rank, world)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if world > 1:
        local["comm"] = _comm_phase(params, bucket_bytes, device, steps, warmup)

    h, w = config.data.height, config.data.width
    # a video set's sample is a tracklet of T frames: (B, T, C, H, W), each frame channels_last
    frames = config.data.video.seq_len if dataset.is_video else 1
    shape = (batch, frames, 3, h, w) if dataset.is_video else (batch, 3, h, w)
    images = torch.randn(*shape, device=device)
    if config.engine.channels_last:
        images = frames_channels_last(images)
    # the sampler's label layout: P ids x K images, or (random batches) mostly distinct ids
    ids, per_id = (s.num_identities, s.num_instances) if s.kind == "identity" else (batch, 1)
    pids = (torch.arange(ids) + rank * ids) % num_classes
    pids = pids.repeat_interleave(per_id).to(device)
    # the batch fields the loss terms read (SAN's textures), of the first training images
    names = criterion.batch_fields
    indices = torch.arange(batch) % len(dataset.train)
    fields = batch_fields(names, dataset.train, indices, device, config) if names else {}
    fixed = iter(lambda: (images, pids, fields), None)
    if strategy.distributed:  # steps with and without DDP's all-reduce, alternating
        contexts = (contextlib.nullcontext, strategy.model.no_sync)
        phases = _train_phase(fixed, steps, warmup, timer, device, batch, contexts)
        local["compute"], local["compute_no_sync"] = phases
        local["comm"]["exposed_s"] = phases[0]["step_s"] - phases[1]["step_s"]
    else:
        (local["compute"],) = _train_phase(fixed, steps, warmup, timer, device, batch)

    local["loaders"] = {}
    for backend in backends:
        sampler = build_sampler(dataset.train, s, config.engine.seed, rank, world)
        cfg_loader = config.loader.model_copy(update={"backend": backend})
        loader = build_backend_train_loader(
            dataset.train,
            sampler,
            cfg_loader,
            h,
            w,
            config.engine.seed,
            device,
            channels_last=config.engine.channels_last,
            video=config.data.video,
        )
        stream = _loader_batches(
            loader, sampler, device, config.engine.channels_last, (names, dataset.train, config)
        )
        local["loaders"][backend] = {
            "loader_only": _loader_phase(stream, steps, warmup, device, batch),
            "end_to_end": _train_phase(stream, steps, warmup, timer, device, batch)[0],
        }
    timer.close()
    local["peak_memory_gib"], local["memory_kind"] = _peak_memory(device)
    local["frames_per_sample"] = frames  # img_per_s counts samples: tracklets of a video set

    ranks = [local]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, local)
    report: dict[str, Any] = {"schema": 1, "ranks": ranks}
    if rank == 0:
        report["environment"] = _job_environment(ranks, device, world)
        report["settings"] = {
            "backbone": config.model.backbone,
            "height": h,
            "width": w,
            "precision": config.engine.precision,
            "channels_last": config.engine.channels_last,
            "compile": config.engine.compile,
            "params": params,
            "bucket_cap_mb": bucket_bytes / 2**20,
            "eval_query": eval_query,
            "eval_gallery": eval_gallery,
            "eval_dim": (dim or model.feature_dim) if eval_query > 0 else None,
        }
    return report


class _StepTimer:
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
        _sync(self.device)
        self._tic = time.perf_counter()

    def _post(self, *_: Any) -> None:
        _sync(self.device)
        self.optimizer_s += time.perf_counter() - self._tic

    def step(
        self, images: torch.Tensor, pids: torch.Tensor, fields: dict | None = None
    ) -> tuple[float, float, float]:
        """(forward_s, backward_s, optimizer_s) of one step; ``fields``: the batch fields the
        loss terms read (computed outside the timed step, as the loader's work)."""
        _sync(self.device)
        t0 = time.perf_counter()
        with self.strategy.autocast():
            outputs = self.forward(images)
        total, _ = self.criterion({k: v.float() for k, v in outputs.items()}, pids, fields)
        _sync(self.device)
        t1 = time.perf_counter()
        self.optimizer_s = 0.0
        self.strategy.step(total)
        _sync(self.device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1 - self.optimizer_s, self.optimizer_s

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _loader_batches(
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


def _train_phase(
    batches, steps, warmup, timer: _StepTimer, device, batch, contexts=(contextlib.nullcontext,)
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
                _sync(device)
                t0 = time.perf_counter()
                images, pids, fields = next(batches)
                _sync(device)
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


def _loader_phase(batches, steps, warmup, device, batch) -> dict[str, float]:
    for _ in range(warmup):
        next(batches)
    barrier()
    _sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        next(batches)
    _sync(device)
    seconds = time.perf_counter() - tic
    return {"img_per_s": steps * batch / seconds, "seconds": seconds, "steps": steps}


def _timed_allreduce(tensors: Sequence[torch.Tensor], device: torch.device) -> float:
    """Seconds of all-reducing ``tensors`` one after another, all ranks starting together."""
    dist.barrier()
    _sync(device)
    tic = time.perf_counter()
    for t in tensors:
        dist.all_reduce(t)
    _sync(device)
    return time.perf_counter() - tic


def _comm_phase(params: int, bucket_bytes: int, device, steps: int, warmup: int) -> dict:
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
            _timed_allreduce(case, device)
    rounds = [[_timed_allreduce(case, device) for case in cases] for _ in range(max(5, steps))]
    medians = [statistics.median(column) for column in zip(*rounds, strict=True)]
    return {
        "allreduce_s": medians[-1],
        "buckets": len(buckets),
        "gradient_bytes": params * 4,
        "fit_sizes_bytes": [max(1, n // 4) * 4 for n in sizes],
        "fit_seconds": medians[:-1],
    }


def _eval_phase(nq, ng, dim, device, config: Config, rank, world) -> dict[str, Any]:
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
    before, kind = _current_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    barrier()
    _sync(device)
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
    _sync(device)
    seconds = time.perf_counter() - tic
    peak, _ = _peak_memory(device)
    return {
        "seconds": seconds,
        "queries_local": len(qr),
        "gallery_local": len(gr),
        "memory_before_gib": before,
        "peak_memory_gib": peak,
        "memory_kind": kind,
        "mAP": float(result.mAP),
    }


def proc_status_gib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak), in GiB. Not ru_maxrss,
    which carries the parent's peak across fork + exec (a launcher's, here)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise KeyError(f"/proc/self/status has no {field} line")


def _current_memory(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GIB, "cuda_allocated"
    return proc_status_gib("VmRSS"), "rss"


def _peak_memory(device) -> tuple[float, str]:
    """Peak CUDA memory allocated since the last reset, or the process's high-water RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "cuda_allocated"
    return proc_status_gib("VmHWM"), "rss"


def _local_environment(device: torch.device) -> dict[str, Any]:
    host = socket.gethostname()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / GIB:.0f} GiB"
    else:
        name = f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    return {
        "hostname": host,
        "node": os.environ.get("SLURMD_NODENAME", host),  # several slurmd may share one host
        "pid": os.getpid(),
        "device": str(device),
        "device_name": name,
        "cpus": os.cpu_count(),
    }


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def _job_environment(ranks: list[dict], device: torch.device, world: int) -> dict[str, Any]:
    nodes = sorted({r["node"] for r in ranks})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "world_size": world,
        "nodes": len(nodes),
        "node_names": nodes,
        "ranks_per_node": {n: sum(r["node"] == n for r in ranks) for n in nodes},
        "device_type": device.type,
        "devices": sorted({r["device_name"] for r in ranks}),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "hpc_reid": hpc_reid.__version__,
        "dali": _version("nvidia.dali"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_job_num_nodes": os.environ.get("SLURM_JOB_NUM_NODES"),
    }
