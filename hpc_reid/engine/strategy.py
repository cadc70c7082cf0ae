"""The DDP strategy: how one optimisation step runs on one or many processes.

A strategy owns the wrapped model, mixed precision and the optimizer step, so the trainer's loop
reads the same whatever runs underneath (DeepSpeed plugs in behind the same methods). torch's native
AMP is used (bf16 needs no loss scaling; fp16 uses a GradScaler); apex is never required.
:func:`prepare_model` applies what must happen to the bare model before any strategy wraps it and
before the optimizer collects its parameters (SyncBatchNorm, channels_last).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpc_reid.engine.errors import TrainingError

if TYPE_CHECKING:
    from hpc_reid.config import Config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync_bn_applies(setting: Literal["auto"] | bool, device: torch.device, world: int) -> bool:
    """Whether ``distributed.sync_bn=setting`` converts the model's BatchNorm layers to
    SyncBatchNorm for ``world`` processes on ``device``.

    SyncBatchNorm (Ioffe and Szegedy's statistics over the global batch rather than each rank's
    P x K images) matters when the per-GPU batch is small; with one process there is nothing to
    synchronise, and torch runs it only on CUDA, so ``true`` on the CPU is refused here, before
    any work, instead of failing at the first forward.
    """
    if setting is True and device.type != "cuda":
        raise TrainingError(
            f"distributed.sync_bn=true needs CUDA devices, but this run trains on {device}: "
            "torch's SyncBatchNorm runs only on CUDA. Set distributed.sync_bn=auto (on only "
            "for CUDA with 2+ processes) or false"
        )
    return setting is not False and device.type == "cuda" and world > 1


def prepare_model(
    model: nn.Module, config: Config, device: torch.device, world: int
) -> tuple[nn.Module, str]:
    """``model`` as it trains under ``config`` on ``world`` processes on ``device``, and one line
    for the run log saying whether BatchNorm is synchronised.

    Call it after moving the model to ``device`` and before building the optimizer: the
    conversion keeps the parameter objects, but the optimizer's norm-layer group
    (:data:`hpc_reid.engine.optim.NORM_LAYERS`) is chosen by the layers' types. The model is not
    moved here.
    """
    setting = config.distributed.sync_bn
    if sync_bn_applies(setting, device, world):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        layers = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        note = (
            f"distributed.sync_bn={setting}: {layers} BatchNorm layers synchronised across "
            f"{world} ranks (SyncBatchNorm)"
        )
    elif world == 1:
        note = f"distributed.sync_bn={setting}: one process, nothing to synchronise"
    elif setting is False:
        note = "distributed.sync_bn=false: each rank's BatchNorm uses its own batch statistics"
    else:
        note = (
            f"distributed.sync_bn={setting}: off on {device.type} (torch's SyncBatchNorm runs "
            "only on CUDA); each rank's BatchNorm uses its own batch statistics"
        )
    # DeepSpeed broadcasts each parameter as a byte view at initialisation, which a channels_last
    # 4-d weight (stride(-1) != 1) refuses; its weights stay contiguous, and the trainer's
    # channels_last input still makes every convolution run in NHWC (PyTorch follows the input's
    # or the weight's channels_last format).
    if config.engine.channels_last and config.engine.strategy != "deepspeed":
        model = model.to(memory_format=torch.channels_last)
    return model, note


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers of ``module`` (BatchNorm statistics): one broadcast per
    dtype, in the same order on every rank. A collective: every rank calls it."""
    buffers = [b for b in module.buffers() if b.numel()]
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not buffers:
        return
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, 0)
        for b, v in zip(group, flat.split([b.numel() for b in group]), strict=True):
            b.copy_(v.view_as(b))


class DDPStrategy:
    """DistributedDataParallel (or the bare model in a single process) with torch AMP.

    ``extra_params`` are trainable parameters outside the model (the center loss's centers): they
    are not in DDP's buckets, so their gradients are averaged across ranks here, then the
    ``extra_optimizer`` steps on them after ``extra_grad_scale`` is applied (BoT's 1/weight).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        device: torch.device,
        precision: str = "fp32",
        grad_clip: float | None = None,
        find_unused_parameters: bool = False,
        extra_params: list[nn.Parameter] | None = None,
        extra_optimizer: torch.optim.Optimizer | None = None,
        extra_grad_scale: float = 1.0,
    ):
        self.module = model
        self.device = device
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=find_unused_parameters
            )
        else:
            self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.extra_params = list(extra_params or [])
        self.extra_optimizer = extra_optimizer
        self.extra_grad_scale = extra_grad_scale
        self.distributed = distributed

    def evaluation_model(self) -> nn.Module:
        """The model to evaluate, with rank 0's buffers on every rank. DDP broadcasts rank 0's
        buffers before each training forward, so after the last one every rank's BatchNorm
        statistics moved with its own batch: a sharded evaluation (or the anchor loss's class
        means) would mix the ranks' statistics, and differ from the checkpoint, which holds rank
        0's. Training is unchanged: its next forward broadcasts rank 0's buffers anyway."""
        if self.distributed:
            broadcast_buffers(self.module)
        return self.module

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def step(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward, optional clipping, optimizer steps and the per-iteration LR update.

        Returns the gradient norm before clipping (a tensor on the device, so that reading it is
        the caller's choice of a host sync) when clipping is on.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.extra_optimizer is not None:
            self.extra_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        if self.extra_optimizer is not None:
            self._step_extra()
        self.scaler.update()
        self.scheduler.step()
        return grad_norm

    def _step_extra(self) -> None:
        """The centers' step: their gradient summed over ranks (they are outside DDP), unscaled
        by the GradScaler, times ``extra_grad_scale / world`` (the rank mean and BoT's 1/weight),
        then an SGD step that the scaler skips on an fp16 overflow.

        The scaler decides per optimizer, as torch's AMP recipe for several optimizers does
        (https://pytorch.org/docs/stable/notes/amp_examples.html): an overflow in the centers'
        gradients skips their step, one in the model's skips the model's. The summed gradient is
        the same on every rank, so every rank makes the same decision. No host sync here outside
        fp16, where the scaler's own check is one.
        """
        grads = [p.grad for p in self.extra_params if p.grad is not None]
        if not grads:
            return
        world = 1
        if self.distributed:
            for g in grads:
                dist.all_reduce(g)
            world = dist.get_world_size()
        self.scaler.unscale_(self.extra_optimizer)
        for g in grads:
            g.mul_(self.extra_grad_scale / world)
        self.scaler.step(self.extra_optimizer)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.extra_optimizer is not None:
            state["extra_optimizer"] = self.extra_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.extra_optimizer is not None and "extra_optimizer" in state:
            self.extra_optimizer.load_state_dict(state["extra_optimizer"])
