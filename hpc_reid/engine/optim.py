"""Optimizers and the per-iteration learning-rate schedule, as configured by ``optimizer.*`` and
``schedule.*``.

Parameter groups follow BoT (Luo et al., CVPRW 2019, ``solver/build.py``) and fast-reid: biases
get ``lr * bias_lr_factor`` and ``weight_decay_bias``; normalisation layers' weights get
``weight_decay_bias`` (fast-reid's separate norm decay); every other weight gets ``lr`` and
``weight_decay``. The schedule is BoT's warm-up (linear from ``warmup_factor`` to 1) followed by
step decay or cosine annealing (Loshchilov and Hutter, "SGDR", ICLR 2017, Eq. 5), evaluated every
iteration rather than every epoch.

A decoder trained beside the encoder (SAN's SA-Dec: parameters under a module named ``decoder``)
gets, with ``optimizer.decoder_lr``, groups of its own (the same three kinds) at that learning
rate, constant (the schedule leaves a group marked ``constant_lr`` alone), with
``optimizer.decoder_betas``: the released code's separate decoder Adam (lr 1e-5, betas 0.5 and
0.999, never scheduled) within one optimizer and one backward pass.
"""

from __future__ import annotations

import bisect
import functools
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from hpc_reid.config import CenterConfig, Config, OptimizerConfig, ScheduleConfig
from hpc_reid.losses.center import CenterLoss

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


def _fmt(x: float) -> str:
    mantissa, exponent = f"{x:.2e}".split("e")
    mantissa = mantissa.rstrip("0")
    if mantissa.endswith("."):
        mantissa += "0"
    return f"{mantissa}e{int(exponent)}"


def scaled_lr(cfg: OptimizerConfig, global_batch: int) -> tuple[float, str]:
    """The learning rate for ``global_batch`` images per step under ``optimizer.lr_scaling``, and a
    one-line description for the run log.

    linear: lr * global / base (Goyal et al., "Accurate, Large Minibatch SGD", 2017);
    sqrt: lr * sqrt(global / base) (Krizhevsky, "One weird trick", 2014; usual for Adam).
    """
    if global_batch < 1:
        raise ValueError(f"global batch size must be >= 1, got {global_batch}")
    rule, base = cfg.lr_scaling.rule, cfg.lr_scaling.base_batch_size
    if rule == "none":
        return cfg.lr, f"lr {_fmt(cfg.lr)} (no scaling rule, global batch {global_batch})"
    ratio = global_batch / base
    if rule == "linear":
        lr = cfg.lr * ratio
        return lr, f"lr {_fmt(cfg.lr)} x {global_batch}/{base} (linear rule) = {_fmt(lr)}"
    lr = cfg.lr * math.sqrt(ratio)
    return lr, f"lr {_fmt(cfg.lr)} x sqrt({global_batch}/{base}) (sqrt rule) = {_fmt(lr)}"


#: The module name whose parameters ``optimizer.decoder_lr`` applies to (SAN's ``head.decoder``).
DECODER_MODULE = "decoder"


def _bot_groups(lr: float, cfg: OptimizerConfig, prefix: str = "") -> dict[str, dict[str, Any]]:
    return {
        f"{prefix}weights": {"params": [], "lr": lr, "weight_decay": cfg.weight_decay},
        f"{prefix}norm_weights": {"params": [], "lr": lr, "weight_decay": cfg.weight_decay_bias},
        f"{prefix}biases": {
            "params": [],
            "lr": lr * cfg.bias_lr_factor,
            "weight_decay": cfg.weight_decay_bias,
        },
    }


def param_groups(model: nn.Module, cfg: OptimizerConfig, lr: float) -> list[dict[str, Any]]:
    """BoT's groups: weights (lr, weight_decay), norm-layer weights (lr, weight_decay_bias),
    biases (lr * bias_lr_factor, weight_decay_bias). Frozen parameters are left out; a shared
    parameter is counted once; empty groups are dropped.

    With ``optimizer.decoder_lr``, the parameters of modules under one named ``decoder`` form the
    same three groups again, named ``decoder_*``, at ``decoder_lr`` (as given: not ``lr``'s
    batch-size rule), marked ``constant_lr`` (the schedule skips them) and with
    ``decoder_betas`` when set. They come after the others, so group 0 stays the encoder's
    weights (the learning rate the run log shows).
    """
    groups = _bot_groups(lr, cfg)
    if cfg.decoder_lr is not None:
        decoder = _bot_groups(cfg.decoder_lr, cfg, prefix="decoder_")
        for group in decoder.values():
            group["constant_lr"] = True
            if cfg.decoder_betas is not None:
                group["betas"] = tuple(cfg.decoder_betas)
            if cfg.decoder_weight_decay is not None:  # the released decoder Adam's is 0
                group["weight_decay"] = cfg.decoder_weight_decay
        groups.update(decoder)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        in_decoder = cfg.decoder_lr is not None and DECODER_MODULE in module_name.split(".")
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if name == "bias" or name.endswith("_bias"):
                kind = "biases"
            elif isinstance(module, NORM_LAYERS):
                kind = "norm_weights"
            else:
                kind = "weights"
            groups[f"decoder_{kind}" if in_decoder else kind]["params"].append(p)
    out = [{"name": name, **g} for name, g in groups.items() if g["params"]]
    if not out:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True")
    if cfg.decoder_lr is not None and not any(g["name"].startswith("decoder_") for g in out):
        raise ValueError(
            f"optimizer.decoder_lr={cfg.decoder_lr} but {type(model).__name__} has no trainable "
            f"parameter under a module named {DECODER_MODULE!r} (model.head: san has one); "
            "set optimizer.decoder_lr=null"
        )
    return out


def _check_adam_options(cfg: OptimizerConfig) -> None:
    """Options that only an Adam-type optimizer has, refused rather than ignored."""
    for key in ("decoder_betas", "decoder_weight_decay"):
        if getattr(cfg, key) is not None and cfg.decoder_lr is None:
            raise ValueError(
                f"optimizer.{key}={getattr(cfg, key)} applies to the decoder's own groups, which "
                "exist only with optimizer.decoder_lr set; set both or neither"
            )
    if cfg.name == "sgd":
        for key in ("amsgrad", "decoder_betas"):
            if getattr(cfg, key) not in (None, False):
                raise ValueError(
                    f"optimizer.{key}={getattr(cfg, key)} is an Adam option, but "
                    "optimizer.name=sgd; use adam or adamw, or unset it"
                )


@functools.cache
def _fused_kernel_runs(cls: type[torch.optim.Optimizer], device: str, dtype: torch.dtype) -> bool:
    # Asking torch is the only reliable test: support depends on the build, device and dtype, and
    # the check happens at the first step, not at construction.
    p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
    p.grad = torch.zeros_like(p)
    try:
        cls([p], lr=0.0, fused=True).step()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def fused_supported(cls: type[torch.optim.Optimizer], params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused ``cls`` kernel for every device and dtype among ``params``."""
    kinds = {(str(p.device), p.dtype) for p in params}
    return all(_fused_kernel_runs(cls, device, dtype) for device, dtype in kinds)


def _apex_optimizer(groups: list[dict], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.fused is True:
        raise ValueError(
            "optimizer.apex=true and optimizer.fused=true are alternatives; set one of them"
        )
    try:
        from apex import optimizers as apex_optimizers
    except ImportError:
        raise ValueError(
            "optimizer.apex=true but apex is not installed; torch's fused optimizers are the "
            "default (optimizer.fused=null uses them where supported), so set optimizer.apex=false"
        ) from None
    if cfg.name == "sgd":
        return apex_optimizers.FusedSGD(groups, lr=lr, momentum=cfg.momentum, nesterov=False)
    if cfg.amsgrad:
        raise ValueError(
            "optimizer.amsgrad=true: apex's FusedAdam has no AMSGrad variant; set "
            "optimizer.apex=false (torch's Adam has it, fused or not)"
        )
    return apex_optimizers.FusedAdam(
        groups, lr=lr, betas=tuple(cfg.betas), adam_w_mode=cfg.name == "adamw"
    )


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum, no Nesterov) over :func:`param_groups` at base ``lr`` (the
    scaled one, see :func:`scaled_lr`).

    ``optimizer.fused``: null uses torch's fused kernel for parameters on a GPU where it exists for
    their dtype, else the default (foreach) one. On the CPU torch 2.14 has fused kernels too, but
    they are slower than foreach (Adam over OSNet x0.25's 148k parameters on 2 cores: 165 ms against
    20 ms a step), so null does not pick them there; true asks for them anyway, and is an error
    where they do not exist. ``optimizer.apex`` uses apex's FusedAdam / FusedSGD.

    ``optimizer.amsgrad``: Adam's and AdamW's AMSGrad variant (Reddi, Kale and Kumar, "On the
    Convergence of Adam and Beyond", ICLR 2018: the denominator from the running maximum of the
    second-moment estimate), the optimizer of SAN's released recipe.
    """
    _check_adam_options(cfg)
    groups = param_groups(model, cfg, lr)
    if cfg.apex:
        return _apex_optimizer(groups, cfg, lr)
    cls = OPTIMIZERS[cfg.name]
    params = [p for g in groups for p in g["params"]]
    supported = fused_supported(cls, params)
    if cfg.fused and not supported:
        kinds = sorted({f"{p.dtype} on {p.device}" for p in params})
        raise ValueError(
            f"optimizer.fused=true but torch has no fused {cls.__name__} for parameters of "
            f"{', '.join(kinds)}; set optimizer.fused=null or false"
        )
    on_gpu = all(p.device.type == "cuda" for p in params)
    fused = (supported and on_gpu) if cfg.fused is None else cfg.fused
    if cfg.name == "sgd":
        extra: dict[str, Any] = {"momentum": cfg.momentum, "nesterov": False}
    else:
        extra = {"betas": tuple(cfg.betas), "amsgrad": cfg.amsgrad}
    return cls(groups, lr=lr, weight_decay=cfg.weight_decay, fused=fused, **extra)


def build_center_optimizer(center_loss: CenterLoss, cfg: CenterConfig) -> torch.optim.SGD:
    """Plain SGD on the centers at ``loss.center.lr``, as in BoT."""
    return torch.optim.SGD(center_loss.parameters(), lr=cfg.lr)


def strategy_args(config: Config, criterion) -> dict:
    """The keyword arguments a strategy (DDP or DeepSpeed) takes from the config besides the
    model, optimizer, scheduler and device: precision, gradient clipping, DDP's search for unused
    parameters, and the criterion's center loss if it has one (the centers as extra parameters,
    their own SGD, and the gradient rescaling by 1 / weight)."""
    kwargs = {
        "precision": config.engine.precision,
        "grad_clip": config.engine.grad_clip,
        "find_unused_parameters": config.distributed.find_unused_parameters,
    }
    center = getattr(criterion, "center", None)
    if center is None:
        return {**kwargs, "extra_params": [], "extra_optimizer": None, "extra_grad_scale": 1.0}
    cfg = config.loss.center
    return {
        **kwargs,
        "extra_params": list(center.parameters()),
        "extra_optimizer": build_center_optimizer(center, cfg),
        "extra_grad_scale": 1.0 / cfg.weight,
    }


class WarmupScheduler(LRScheduler):
    """Per-iteration LR: ``group base lr * factor(iteration)`` for every parameter group, so the
    groups keep their ratios (bias_lr_factor) throughout; a group marked ``constant_lr`` (SAN's
    decoder, :func:`param_groups`) keeps its base lr.

    With W = warmup_epochs * iters_per_epoch and T = epochs * iters_per_epoch:
    - warm-up, it < W: warmup_factor + (1 - warmup_factor) * it / W (BoT's linear warm-up);
    - multistep: times gamma ** (number of milestones m with it >= m * iters_per_epoch), applied
      during warm-up too, as BoT's WarmupMultiStepLR does;
    - cosine, it >= W: r + (1 - r) * (1 + cos(pi * (it - W) / (T - W))) / 2, where
      r = min_lr / base_lr, base_lr being the optimizer's default lr (the weights' group): that
      group anneals to ``min_lr``, the others to the same fraction of their own base;
    - exponential (AlignedReID, huanghoujing's ``adjust_lr_exp``), per epoch: in (1-based) epoch
      e >= decay_start, times decay_to ** ((e + 1 - decay_start) / (epochs + 1 - decay_start)),
      times the warm-up factor while it lasts.

    ``state_dict`` holds the position (iteration, base lrs); the schedule itself comes from the
    config, so a resumed run continues exactly where it stopped.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: ScheduleConfig,
        iters_per_epoch: int,
        base_lr: float | None = None,
    ):
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        base_lr = optimizer.defaults["lr"] if base_lr is None else base_lr
        if cfg.kind == "cosine" and cfg.min_lr > base_lr:
            raise ValueError(
                f"schedule.min_lr={cfg.min_lr} is above the base learning rate {base_lr}"
            )
        self.kind = cfg.kind
        self.warmup_iters = cfg.warmup_epochs * iters_per_epoch
        self.total_iters = cfg.epochs * iters_per_epoch
        self.warmup_factor = cfg.warmup_factor
        self.milestone_iters = [m * iters_per_epoch for m in cfg.milestones]
        self.gamma = cfg.gamma
        self.min_ratio = cfg.min_lr / base_lr
        self.iters_per_epoch, self.epochs = iters_per_epoch, cfg.epochs
        self.decay_start, self.decay_to = cfg.decay_start, cfg.decay_to
        super().__init__(optimizer)

    def factor(self, it: int) -> float:
        """The multiplier of every group's base lr at iteration ``it`` (0-based)."""
        warm = it < self.warmup_iters
        alpha = it / self.warmup_iters if warm else 1.0
        warmup = self.warmup_factor + (1.0 - self.warmup_factor) * alpha
        if self.kind == "multistep":
            return warmup * self.gamma ** bisect.bisect_right(self.milestone_iters, it)
        if self.kind == "exponential":
            epoch = it // self.iters_per_epoch + 1  # 1-based, as the reference counts
            if epoch < self.decay_start:
                return warmup
            span = self.epochs + 1 - self.decay_start
            return warmup * self.decay_to ** ((epoch + 1 - self.decay_start) / span)
        if warm:
            return warmup
        t = min(1.0, (it - self.warmup_iters) / (self.total_iters - self.warmup_iters))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        groups = self.optimizer.param_groups
        return [
            base if group.get("constant_lr", False) else base * f
            for base, group in zip(self.base_lrs, groups, strict=True)
        ]

    _POSITION = ("last_epoch", "_step_count", "base_lrs", "_last_lr")

    def state_dict(self) -> dict[str, Any]:
        return {key: self.__dict__[key] for key in self._POSITION}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [key for key in self._POSITION if key not in state_dict]
        if missing:
            raise KeyError(f"scheduler state lacks {missing}; got keys {sorted(state_dict)}")
        self.__dict__.update({key: state_dict[key] for key in self._POSITION})


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, iters_per_epoch: int
) -> WarmupScheduler:
    """The per-iteration schedule of ``schedule.*``; call ``step()`` after every optimizer step."""
    return WarmupScheduler(optimizer, cfg, iters_per_epoch)
