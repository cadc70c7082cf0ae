"""The ``optimizer``, ``schedule``, ``engine``, ``logging`` and ``distributed`` sections."""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import Field, model_validator

from hpc_reid.config.base import Section


class LRScalingConfig(Section):
    """How the learning rate follows the global batch: lr * f(global_batch / base_batch_size)."""

    rule: Literal["none", "linear", "sqrt"] = "none"
    base_batch_size: int = Field(64, ge=1)


class OptimizerConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(3.5e-4, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    weight_decay_bias: float = Field(5e-4, ge=0.0)
    bias_lr_factor: float = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = Field(False, description="Adam/AdamW's AMSGrad variant (SAN's recipe)")
    decoder_lr: float | None = Field(
        None,
        gt=0.0,
        description="a learning rate of its own for a decoder's parameters (SAN's SA-Dec; "
        "parameters under the head's 'decoder'), constant, in one backward pass with the rest; "
        "null: the model's",
    )
    decoder_betas: tuple[float, float] | None = Field(
        None, description="the decoder group's Adam betas (SAN: 0.5, 0.999); null: betas"
    )
    decoder_weight_decay: float | None = Field(
        None, ge=0.0, description="the decoder groups' weight decay (SAN: 0); null: the model's"
    )
    fused: bool | None = Field(None, description="null: fused where torch supports it")
    apex: bool = Field(False, description="use apex's fused optimizer if installed")
    lr_scaling: LRScalingConfig = Field(default_factory=LRScalingConfig)


class ScheduleConfig(Section):
    epochs: int = Field(120, ge=1)
    kind: Literal["multistep", "cosine", "exponential"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [40, 70])
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(10, ge=0)
    warmup_factor: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: float = Field(1e-7, ge=0.0, description="cosine floor")
    decay_start: int = Field(
        1,
        ge=1,
        description="exponential: the first (1-based) epoch whose lr decays; from there each "
        "epoch e runs at decay_to ** ((e + 1 - decay_start) / (epochs + 1 - decay_start)) times "
        "the base lr (AlignedReID's recipe: 151 of 300, to 0.001)",
    )
    decay_to: float = Field(0.001, gt=0.0, le=1.0, description="exponential: the final factor")

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs={self.warmup_epochs} must be smaller than "
                f"schedule.epochs={self.epochs}"
            )
        if self.kind == "exponential" and self.decay_start > self.epochs:
            raise ValueError(
                f"schedule.decay_start={self.decay_start} must lie in 1..schedule.epochs="
                f"{self.epochs}"
            )
        if self.kind == "multistep":
            ms = self.milestones
            if any(b <= a for a, b in itertools.pairwise(ms)):
                raise ValueError(f"schedule.milestones={ms} must be strictly increasing")
            if ms and not (ms[0] > 0 and ms[-1] <= self.epochs):
                raise ValueError(
                    f"schedule.milestones={ms} must lie in 1..schedule.epochs={self.epochs}"
                )
        return self


class EngineConfig(Section):
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = Field(None, gt=0.0)
    seed: int = 0
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON/YAML to merge")


class LoggingConfig(Section):
    output_dir: str = "runs"
    run_name: str | None = Field(None, description="default: the experiment name")
    log_every: int = Field(20, ge=1, description="steps between logged lines")
    tensorboard: bool = True
    progress_bar: bool = True
    checkpoint_every: int = Field(10, ge=0, description="epochs; 0: only the last")
    keep_last: int = Field(3, ge=1)
    keep_best: bool = True


class DistributedConfig(Section):
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = Field(1800, ge=10)
    find_unused_parameters: bool = False
    sync_bn: Literal["auto"] | bool = Field(
        "auto",
        description="BatchNorm statistics over the global batch (torch's SyncBatchNorm) rather "
        "than each rank's own: auto, on with CUDA and 2+ processes, else off; true, the same "
        "but an error on the CPU (torch's SyncBatchNorm runs only on CUDA); false, never",
    )
    stop_check_every: int = Field(
        10,
        ge=1,
        description="steps between the ranks' agreements on a pre-emption signal (one "
        "all-reduce, a host-device sync); every rank checks at the same steps (multiples of "
        "this, at an accumulation boundary, and an epoch's last step), so all stop together",
    )
