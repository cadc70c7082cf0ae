"""The DDP strategy: how one optimisation step runs on one or many processes.

A strategy owns the wrapped model, mixed precision and the optimizer step, so the trainer's loop
reads the same whatever runs underneath (DeepSpeed plugs in behind the same methods). torch's native
AMP is used (bf16 needs no loss scaling; fp16 uses a GradScaler); apex is never required.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def step(self, loss: torch.Tensor) -> float | None:
        """Backward, optional clipping, optimizer steps and the per-iteration LR update.

        Returns the gradient norm before clipping when clipping is on.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.extra_optimizer is not None:
            self.extra_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            grad_norm = float(norm)
        self.scaler.step(self.optimizer)
        if self.extra_optimizer is not None:
            self._step_extra()
        self.scaler.update()
        self.scheduler.step()
        return grad_norm

    def _step_extra(self) -> None:
        grads = [p.grad for p in self.extra_params if p.grad is not None]
        if not grads:
            return
        factor = self.extra_grad_scale
        if self.scaler.is_enabled():
            factor /= self.scaler.get_scale()
        if self.distributed:
            for g in grads:
                dist.all_reduce(g)
            factor /= dist.get_world_size()
        if not all(torch.isfinite(g).all() for g in grads):
            return  # fp16 overflow step: the scaler skips the main step too
        for g in grads:
            g.mul_(factor)
        self.extra_optimizer.step()

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
