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
The phases are in :mod:`~hpc_reid.bench.phases`, a rank's memory and environment in
:mod:`~hpc_reid.bench.machine`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpc_reid.bench.machine import job_environment, local_environment, peak_memory
from hpc_reid.bench.phases import (
    StepTimer,
    comm_phase,
    eval_phase,
    loader_batches,
    loader_phase,
    train_phase,
)
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
from hpc_reid.launch.distributed import choose_backend, detect_env, init_distributed
from hpc_reid.losses import ReidLoss
from hpc_reid.models import build_model

SCALING = ("weak", "strong")


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


def _bench(config, rank, world, device, steps, warmup, backends, eval_query, eval_gallery, dim):
    local = {"rank": rank, **local_environment(device)}

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
    timer = StepTimer(strategy, criterion, forward, device)

    if eval_query > 0:
        d = dim or model.feature_dim
        local["eval"] = eval_phase(eval_query, eval_gallery, d, device, config, rank, world)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if world > 1:
        local["comm"] = comm_phase(params, bucket_bytes, device, steps, warmup)

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
        phases = train_phase(fixed, steps, warmup, timer, device, batch, contexts)
        local["compute"], local["compute_no_sync"] = phases
        local["comm"]["exposed_s"] = phases[0]["step_s"] - phases[1]["step_s"]
    else:
        (local["compute"],) = train_phase(fixed, steps, warmup, timer, device, batch)

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
        stream = loader_batches(
            loader, sampler, device, config.engine.channels_last, (names, dataset.train, config)
        )
        local["loaders"][backend] = {
            "loader_only": loader_phase(stream, steps, warmup, device, batch),
            "end_to_end": train_phase(stream, steps, warmup, timer, device, batch)[0],
        }
    timer.close()
    local["peak_memory_gib"], local["memory_kind"] = peak_memory(device)
    local["frames_per_sample"] = frames  # img_per_s counts samples: tracklets of a video set

    ranks = [local]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, local)
    report: dict[str, Any] = {"schema": 1, "ranks": ranks}
    if rank == 0:
        report["environment"] = job_environment(ranks, device, world)
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
