"""Models: backbones by name, heads by name, and :func:`build_model` putting one on the other."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hpc_reid.config import ModelConfig
from hpc_reid.models.backbones import (
    available_backbones,
    build_backbone,
    load_pretrained,
    register_backbone,
)
from hpc_reid.models.heads import (
    RetrievalPart,
    available_heads,
    build_head,
    register_head,
)

__all__ = [
    "ReidModel",
    "RetrievalPart",
    "available_backbones",
    "available_heads",
    "build_backbone",
    "build_head",
    "build_model",
    "inferring",
    "load_pretrained",
    "register_backbone",
    "register_head",
]


class ReidModel(nn.Module):
    """A backbone and a head (``model.backbone``, ``model.head``): ``forward(x)`` returns the head's
    outputs dict for the backbone's map of ``x``.

    What the model produces and ranks with is the head's declaration, never a branch in the
    trainer or evaluation: ``output_keys`` (the training outputs losses may read),
    ``retrieval_parts`` (name -> :class:`RetrievalPart`: the outputs evaluation ranks with, e.g.
    ``global``, and AlignedReID's ``local``) and ``feature_dim`` (the ``global`` output's size).

    A head with ``wants_stages`` (SAN's, whose decoder takes skips) is given the backbone's
    ``forward_stages`` maps too; a head with ``wants_input`` (FGReID's, which runs a second trunk
    of its own on the same images) is given the images the backbone ran on too (the B x T frames
    as one (B*T, C, H, W) batch for tracklets); every other head gets ``forward``'s map alone.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_wants_stages = bool(getattr(head, "wants_stages", False))
        self.head_wants_input = bool(getattr(head, "wants_input", False))
        if self.head_wants_stages and not callable(getattr(backbone, "forward_stages", None)):
            raise TypeError(
                f"the {type(head).__name__} head reads the backbone's stages, but "
                f"{type(backbone).__name__} has no forward_stages (hpc_reid.models.backbones)"
            )
        self._register_load_state_dict_pre_hook(_head_keys_of_before_heads)

    @property
    def output_keys(self) -> frozenset[str]:
        return frozenset(self.head.output_keys)

    @property
    def retrieval_parts(self) -> dict[str, RetrievalPart]:
        return dict(self.head.retrieval_parts)

    @property
    def feature_dim(self) -> int:
        return int(self.head.feature_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head's outputs for images (B, C, H, W), or for tracklets (B, T, C, H, W) with a
        temporal head (``temporal = True``, :mod:`hpc_reid.models.temporal`; tracklets only) or
        one that takes both (``accepts_tracklets = True``: FGReID's): the backbone runs on the
        B x T frames as one (B*T, C, H, W) batch, channels_last kept when every frame of ``x``
        is, and the head gets its maps as (B, T, C, h, w) and returns one row per tracklet."""
        temporal = bool(getattr(self.head, "temporal", False))
        if x.dim() == 5 or temporal:
            return self._forward_tracklets(x, temporal)
        if self.head_wants_stages:
            stages = self.backbone.forward_stages(x)
            return self.head(stages[-1], stages)
        if self.head_wants_input:
            return self.head(self.backbone(x), x)
        return self.head(self.backbone(x))

    def _forward_tracklets(self, x: torch.Tensor, temporal: bool) -> dict[str, torch.Tensor]:
        head = type(self.head).__name__
        if x.dim() != 5:
            raise TypeError(
                f"the {head} head pools tracklets over time and takes (B, T, C, H, W) clips, got "
                f"a {x.dim()}-D batch of shape {tuple(x.shape)}; give it T frames per sample (an "
                "image alone is a clip of T = 1: x.unsqueeze(1)), or use an image head (bnneck)"
            )
        if not (temporal or getattr(self.head, "accepts_tracklets", False)):
            image_only = (
                " (it reads the backbone's stages: image-only)" if self.head_wants_stages else ""
            )
            raise TypeError(
                f"the {head} head{image_only} takes images (B, C, H, W), got tracklets (B, T, C, "
                f"H, W) of shape {tuple(x.shape)}; use a temporal head (model.head: temporal_avg "
                "or temporal_attention, hpc_reid.models.temporal; fgreid takes both), or feed "
                "the frames as images"
            )
        t = x.shape[1]
        frames = x.flatten(0, 1)  # a view when B and T are contiguous, keeping each frame's layout
        if x[:, 0].is_contiguous(memory_format=torch.channels_last) and not x[:, 0].is_contiguous():
            frames = frames.contiguous(memory_format=torch.channels_last)  # no-op for a view
        fmaps = self.backbone(frames).unflatten(0, (-1, t))
        return self.head(fmaps, frames) if self.head_wants_input else self.head(fmaps)

    def retrieval_feature(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``global`` retrieval part's output (the BN feature by default, BoT; the pooled one
        with ``model.retrieval_feature: global``)."""
        return outputs[self.head.retrieval_parts["global"].key]


#: Top-level modules of the BoT model before heads were registered (2026-12-06): now ``head.*``.
_OLD_HEAD_MODULES = ("pool.", "neck.", "classifier.")


def _head_keys_of_before_heads(state_dict, prefix, *args) -> None:
    """Load checkpoints written before heads had a name: their ``pool.*``, ``neck.*`` and
    ``classifier.*`` keys are the ``bnneck`` head's ``head.pool.*``, ... (renamed in place)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.startswith(_OLD_HEAD_MODULES):
            state_dict[f"{prefix}head.{rest}"] = state_dict.pop(key)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model ``cfg`` describes, with a ``num_classes``-way ID classifier: a
    :class:`ReidModel`, or with ``model.members`` > 1 a
    :class:`~hpc_reid.methods.alignedreid.mutual.MutualModel` of that many, built one after
    another from the current generator (each member its own initial weights; member 0 the same
    as a one-member model from the same seed)."""

    def one() -> ReidModel:
        backbone = build_backbone(
            cfg.backbone,
            cfg.last_stride,
            cfg.pretrained,
            zero_residual=cfg.zero_init_residual,
            non_local=cfg.non_local,
        )
        stages = getattr(backbone, "stage_channels", None)
        head = build_head(cfg.head, backbone.out_channels, num_classes, cfg, stages)
        return ReidModel(backbone, head)

    if cfg.members == 1:
        return one()
    from hpc_reid.methods.alignedreid.mutual import MutualModel  # methods import models

    return MutualModel([one() for _ in range(cfg.members)])


@contextlib.contextmanager
def inferring(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``torch.inference_mode`` for the block, its train/eval mode
    restored afterwards (also when the block raises): how evaluation, extraction and the method
    passes that run between training steps use a model."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)
