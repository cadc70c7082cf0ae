"""The DeepSpeed strategy: ZeRO 0-3, bf16 / fp16 and gradient accumulation behind the trainer's
strategy interface (the same methods as :class:`hpc_reid.engine.strategy.DDPStrategy`).

DeepSpeed (Rasley et al., KDD 2020; ZeRO: Rajbhandari et al., SC 2020) gets our own torch optimizer
(BoT's parameter groups and per-group learning rates) and never its own, so no FusedAdam is built;
our per-iteration schedule is stepped here, so warm-up and decay follow the same iteration count as
under DDP. The DeepSpeed config (``engine.deepspeed_config``, JSON or YAML under
``configs/deepspeed/``) holds only what is DeepSpeed's: the ZeRO stage, loss scaling, bucket sizes,
accumulation. Batch sizes, precision and clipping come from the experiment; a DeepSpeed config that
states another value is an error naming both.

Checkpoints: DeepSpeed's own sharded checkpoint is written by every rank into
``checkpoints/deepspeed/step_NNNNNNNN`` (into a temporary folder first, renamed when complete); the
trainer's ``.pt`` holds the project's contract plus the full model (gathered under ZeRO-3), so
``hpc-reid eval`` reads it as it reads a DDP checkpoint. :func:`export_weights` consolidates the
fp32 master weights (deepspeed.utils.zero_to_fp32) into a model-only checkpoint.

deepspeed is imported only in this module, so the rest of hpc-reid works without it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from hpc_reid.config import Config
from hpc_reid.data.samplers import rank_batch_size
from hpc_reid.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_atomic
from hpc_reid.engine.errors import CheckpointError, TrainingError
from hpc_reid.engine.strategy import broadcast_buffers

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
REPO = Path(__file__).resolve().parents[2]
_TAG = re.compile(r"step_(\d+)")


def read_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed config (JSON or YAML), found as given, else relative to the repository."""
    p = Path(path)
    if not p.is_absolute() and not p.is_file():
        p = REPO / p
    if not p.is_file():
        raise TrainingError(f"engine.deepspeed_config={path!r}: no such file (nor {p})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainingError(f"engine.deepspeed_config {p}: not JSON/YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TrainingError(f"engine.deepspeed_config {p}: expected a mapping")
    data.pop("comment", None)
    return data


def accumulation_steps(config: Config) -> int:
    """``gradient_accumulation_steps`` of ``engine.deepspeed_config`` (1 when unset): the
    micro-batches (sampler batches, trainer iterations) per optimizer step."""
    path = config.engine.deepspeed_config
    accum = (read_deepspeed_config(path) if path else {}).get("gradient_accumulation_steps", 1)
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise TrainingError(
            f"engine.deepspeed_config {path}: gradient_accumulation_steps={accum!r}, "
            "expected an int >= 1"
        )
    return accum


def check_precision_supported(precision: str, where: str, accelerator=None) -> None:
    """A clear error at start when DeepSpeed's accelerator lacks ``precision`` (DeepSpeed's own
    check says only "Type fp16 is not supported on your device"). DeepSpeed's CPU accelerator
    has fp16 only where oneDNN does (AVX512-FP16 / AMX-FP16 CPUs)."""
    if precision not in DTYPES:
        return
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    supported = getattr(accelerator, f"is_{precision}_supported")()
    if not supported:
        other = "fp32"
        if precision == "fp16":
            other = "bf16 (configs/deepspeed/zero2_bf16.json) or fp32"
        raise TrainingError(
            f"engine.precision={precision} with {where}: DeepSpeed's "
            f"{accelerator.device_name()} accelerator does not support {precision} on this "
            f"machine (is_{precision}_supported() is False); use engine.precision={other}, "
            "or run on a GPU"
        )


def merged_deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of ``engine.deepspeed_config`` with the experiment's batch sizes,
    precision and clipping filled in and checked.

    micro batch = one rank's sampler batch (P x K identity-balanced, or ``sampler.batch_size``
    random images); train_batch_size = micro batch x gradient_accumulation_steps x world size.
    """
    path = config.engine.deepspeed_config
    ds = read_deepspeed_config(path) if path else {}
    where = f"engine.deepspeed_config {path}" if path else "the default DeepSpeed config"
    s = config.sampler
    micro = rank_batch_size(s)
    accum = accumulation_steps(config)
    micro_source = (
        f"sampler.batch_size = {micro}"
        if s.kind == "random" and s.batch_size is not None
        else f"sampler.num_identities x sampler.num_instances = {s.num_identities} x "
        f"{s.num_instances} = {micro}"
    )
    derived = {
        "train_micro_batch_size_per_gpu": (micro, micro_source),
        "train_batch_size": (
            micro * accum * world_size,
            f"micro batch {micro} x gradient_accumulation_steps {accum} x world size "
            f"{world_size} = {micro * accum * world_size}",
        ),
    }
    if config.engine.grad_clip is not None:
        derived["gradient_clipping"] = (config.engine.grad_clip, "engine.grad_clip")
    else:  # the DeepSpeed config may set clipping when the experiment does not
        ds.setdefault("gradient_clipping", 0.0)
    for key in derived:
        value, source = derived[key]
        if key in ds and ds[key] != value:
            raise TrainingError(
                f"{where} states {key}={ds[key]!r} but the experiment gives {value!r} ({source}); "
                f"remove {key} from the DeepSpeed config or change the experiment"
            )
        ds[key] = value
    precision = config.engine.precision
    for name in ("bf16", "fp16"):
        section = dict(ds.get(name) or {})
        if section.get("enabled", False) and precision != name:
            raise TrainingError(
                f"{where} enables {name} but engine.precision={precision!r}; set "
                f"engine.precision={name} or use a DeepSpeed config without {name}"
            )
        section["enabled"] = precision == name
        ds[name] = section
    for key, ours in (("optimizer", "optimizer.*"), ("scheduler", "schedule.*")):
        if key in ds:
            raise TrainingError(
                f"{where} defines {key!r}; hpc-reid passes its own ({ours} in the experiment "
                "config), so remove it"
            )
    ds["gradient_accumulation_steps"] = accum
    ds.setdefault("zero_optimization", {"stage": 0})
    # Our optimizer is a torch one; DeepSpeed calls anything outside its list "untested".
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 2**31 - 1)
    return ds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DeepSpeedStrategy:
    """A DeepSpeed engine with the methods the trainer calls on a strategy.

    ``extra_params`` (the center loss's centers) stay outside the engine, as under DDP: their
    gradients are all-reduced and averaged here, unscaled (fp16) and multiplied by
    ``extra_grad_scale`` before ``extra_optimizer`` steps, at each accumulation boundary.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        config: Config,
        device: torch.device,
        checkpoint_dir: str | Path,
        keep_last: int = 3,
        extra_params: list[nn.Parameter] | None = None,
        extra_optimizer: torch.optim.Optimizer | None = None,
        extra_grad_scale: float = 1.0,
        model_factory: Any = None,
        **_ddp_only: Any,
    ):
        import deepspeed

        if not dist.is_initialized():
            # DeepSpeed needs a process group even for one process (else it looks for MPI).
            dist.init_process_group(
                "gloo" if device.type == "cpu" else "nccl",
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timedelta(seconds=config.distributed.timeout_s),
            )
        self.world_size = dist.get_world_size()
        self.ds_config = merged_deepspeed_config(config, self.world_size)
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self.accumulation = int(self.ds_config["gradient_accumulation_steps"])
        path = config.engine.deepspeed_config
        where = f"engine.deepspeed_config {path}" if path else "the default DeepSpeed config"
        check_precision_supported(config.engine.precision, where)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(self.ds_config)
        )
        self.model = self.engine
        self.module = model
        self.device = device
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = config.engine.precision
        self.checkpoint_dir = Path(checkpoint_dir) / "deepspeed"
        self.keep_last = keep_last
        self.extra_params = list(extra_params or [])
        self.extra_optimizer = extra_optimizer
        self.extra_grad_scale = extra_grad_scale
        self.steps = 0  # micro-steps, the trainer's step count
        self.model_factory = model_factory  # a fresh plain model, for ZeRO-3 evaluation

    def evaluation_model(self) -> nn.Module:
        """The model to evaluate: the module itself, or under ZeRO-3 (parameters partitioned) a
        plain copy built by ``model_factory`` with every parameter gathered on every rank
        (deepspeed.zero.GatheredParameters, a collective), so the evaluation does not depend on
        ZeRO-3's per-forward gathering (which needs the same number of forwards on every rank)."""
        if self.zero_stage != 3:
            return self.module
        if self.model_factory is None:
            raise TrainingError("ZeRO-3 evaluation needs the strategy's model_factory")
        import deepspeed

        params = dict(self.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            state = {k: p.detach().clone().float() for k, p in params.items()}
        state.update((k, b.detach().clone()) for k, b in self.module.named_buffers())
        with torch.random.fork_rng(devices=[]):  # its random init leaves the run's RNG as is
            plain = self.model_factory()
        plain.load_state_dict(state)
        return plain

    def autocast(self) -> contextlib.AbstractContextManager:
        # DeepSpeed keeps bf16 / fp16 weights; autocast casts the fp32 images (and keeps the
        # numerically delicate ops in fp32), as under DDP.
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def step(self, loss: torch.Tensor) -> float | None:
        """One micro-step: backward (DeepSpeed divides by the accumulation steps), the optimizer
        steps at an accumulation boundary, and the per-iteration LR update."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        scale = float(getattr(self.engine.optimizer, "cur_scale", 1.0) or 1.0)
        self.engine.backward(loss)
        self.engine.step()
        grad_norm = None
        if boundary:
            if self.extra_optimizer is not None:
                self._step_extra(scale)
            if self.ds_config["gradient_clipping"]:
                norm = self.engine.get_global_grad_norm()
                grad_norm = None if norm is None else float(norm)
        # Every micro-step, like the trainer's step count (one sampler batch): the schedule reads
        # the same in epochs whatever the accumulation; the optimizer step at micro-step n (a
        # multiple of the accumulation) uses the LR after n - 1 scheduler steps.
        self.scheduler.step()
        self.steps += 1
        self._broadcast_buffers()
        return grad_norm

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP's broadcast_buffers
        does before each forward; DeepSpeed only broadcasts them once, at start. Without it the
        ranks' statistics drift apart and a sharded evaluation mixes them."""
        if self.world_size > 1:
            broadcast_buffers(self.module)

    def _step_extra(self, loss_scale: float) -> None:
        grads = [p.grad for p in self.extra_params if p.grad is not None]
        if grads:
            factor = self.extra_grad_scale / loss_scale
            if self.world_size > 1:
                for g in grads:
                    dist.all_reduce(g)
                factor /= self.world_size
            overflow = bool(getattr(self.engine.optimizer, "overflow", False))
            if not overflow and all(torch.isfinite(g).all() for g in grads):
                for g in grads:
                    g.mul_(factor)
                self.extra_optimizer.step()
        self.extra_optimizer.zero_grad(set_to_none=True)

    # -- checkpoints ---------------------------------------------------------------------------
    def _full_model_state(self) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # a collective
            return {k: v.clone() for k, v in (state or {}).items()}
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Called by every rank: writes DeepSpeed's sharded checkpoint atomically (a temporary
        folder renamed when every rank has written its shard) and returns the rest."""
        main = dist.get_rank() == 0
        tag = f"step_{self.steps:08d}"
        tmp = f".tmp_{tag}"
        if main:
            shutil.rmtree(self.checkpoint_dir / tmp, ignore_errors=True)
        dist.barrier()
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tmp, save_latest=False)
        dist.barrier()
        if main:
            shutil.rmtree(self.checkpoint_dir / tag, ignore_errors=True)
            os.replace(self.checkpoint_dir / tmp, self.checkpoint_dir / tag)
            self._prune()
        dist.barrier()
        state = {
            "model": self._full_model_state(),
            "scheduler": self.scheduler.state_dict(),
            "deepspeed": {
                "tag": tag,
                "path": str((self.checkpoint_dir / tag).resolve()),
                "world_size": self.world_size,
                "zero_stage": self.zero_stage,
                "steps": self.steps,
                "optimizer_steps": int(self.engine.global_steps),
                "accumulation": self.accumulation,
                "config": self.ds_config,
            },
        }
        if self.extra_optimizer is not None:
            state["extra_optimizer"] = self.extra_optimizer.state_dict()
        return state

    def _prune(self) -> None:
        # The trainer keeps the newest keep_last .pt files; keep one more sharded folder so the
        # folder of a .pt being written is never the one removed.
        found = sorted(
            (int(m.group(1)), p)
            for p in self.checkpoint_dir.iterdir()
            if (m := _TAG.fullmatch(p.name)) and p.is_dir()
        )
        for _, old in found[: -(self.keep_last + 1)]:
            shutil.rmtree(old, ignore_errors=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called by every rank: reads DeepSpeed's sharded checkpoint named in ``state``."""
        info = state.get("deepspeed")
        if info is None:
            raise CheckpointError(
                "the checkpoint was written by the DDP strategy; its weights can start a "
                "DeepSpeed run only through a fresh run, not --resume (optimizer states differ)"
            )
        if info["world_size"] != self.world_size or info["zero_stage"] != self.zero_stage:
            raise CheckpointError(
                f"the DeepSpeed checkpoint was written by {info['world_size']} rank(s) with ZeRO "
                f"stage {info['zero_stage']}; this run has {self.world_size} rank(s) and stage "
                f"{self.zero_stage}. Export its weights (hpc-reid export-weights) to start anew"
            )
        if info["steps"] % self.accumulation:
            raise CheckpointError(
                f"the DeepSpeed checkpoint was written at micro-step {info['steps']}, inside an "
                f"accumulation of {self.accumulation} micro-batches: its partly accumulated "
                "gradients are not saved, so resuming would not be exact. Resume from a "
                "checkpoint at a multiple of gradient_accumulation_steps"
            )
        folder = self.checkpoint_dir / info["tag"]
        if not folder.is_dir():
            folder = Path(info["path"])
        if not folder.is_dir():
            raise CheckpointError(f"DeepSpeed checkpoint folder {info['tag']} not found")
        loaded, _ = self.engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load its checkpoint from {folder}")
        self.scheduler.load_state_dict(state["scheduler"])
        if self.extra_optimizer is not None and "extra_optimizer" in state:
            self.extra_optimizer.load_state_dict(state["extra_optimizer"])
        self.steps = info["steps"]


def export_weights(checkpoint: str | Path, out: str | Path) -> Path:
    """A model-only hpc-reid checkpoint from a training checkpoint: for DeepSpeed, the fp32 master
    weights consolidated from every rank's ZeRO shard (plus the module's buffers); for DDP, the
    saved model. ``hpc-reid eval --checkpoint OUT`` reads it, and ``torch.load(OUT)["strategy"]
    ["model"]`` is a plain state dict for ``model.load_state_dict`` (say, to start a DDP run).
    """
    state = load_checkpoint(checkpoint)
    info = state["strategy"].get("deepspeed")
    if info is None:
        weights = state["strategy"]["model"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        folder = Path(checkpoint).resolve().parent / "deepspeed" / info["tag"]
        if not folder.is_dir():
            folder = Path(info["path"])
        if not folder.is_dir():
            raise CheckpointError(f"{checkpoint}: DeepSpeed folder {info['tag']} not found")
        if info["zero_stage"] == 0:
            model_file = folder / "mp_rank_00_model_states.pt"
            raw = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
            weights = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}
        else:
            weights = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
            weights = {k: v.detach().clone() for k, v in weights.items()}
    keep = ("model_meta", "config", "epoch", "step", "world_size")
    exported = {k: state[k] for k in keep if k in state}
    exported.update(
        format_version=FORMAT_VERSION, strategy={"model": weights}, exported_from=str(checkpoint)
    )
    return save_atomic(exported, out)
