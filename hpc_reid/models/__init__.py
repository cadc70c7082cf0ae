"""Models: backbones by name, pooling, the BNNeck head, and :func:`build_model`."""

from __future__ import annotations

import torch
from torch import nn

from hpc_reid.config import ModelConfig
from hpc_reid.models.backbones import (
    available_backbones,
    build_backbone,
    load_pretrained,
    register_backbone,
)
from hpc_reid.models.heads import AvgPool, BNNeck, GeM

__all__ = [
    "ReidModel",
    "available_backbones",
    "build_backbone",
    "build_model",
    "load_pretrained",
    "register_backbone",
]


class ReidModel(nn.Module):
    """Backbone + global pooling + neck (the BoT baseline, Luo et al., CVPRW 2019).

    ``forward(x)`` returns a dict: ``"global"``, the pooled feature (input of the triplet and
    center losses); ``"bn"``, the BNNeck feature (the pooled feature itself when ``neck="none"``);
    and, in training mode only, ``"logits"``, the ID classifier applied to ``"bn"``.

    ``retrieval_key`` names the output evaluation ranks with (:meth:`retrieval_feature`): the model
    declares it, so evaluation, extraction and every caller follow it without a branch of their
    own. It is a test-time choice, no part of the weights: a checkpoint loads into either.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pool: nn.Module,
        num_classes: int,
        neck: str,
        retrieval_key: str = "bn",
    ):
        super().__init__()
        if neck not in ("bnneck", "none"):
            raise ValueError(f"neck must be 'bnneck' or 'none', got {neck!r}")
        if retrieval_key not in ("bn", "global"):
            raise ValueError(
                f"retrieval_key (model.retrieval_feature) must be 'bn' or 'global', "
                f"got {retrieval_key!r}"
            )
        self.retrieval_key = retrieval_key
        self.backbone = backbone
        self.pool = pool
        self.feature_dim: int = backbone.out_channels
        if neck == "bnneck":
            self.neck: BNNeck | None = BNNeck(self.feature_dim, num_classes)
        else:  # BoT's no-neck baseline: a plain linear classifier on the pooled feature
            self.neck = None
            self.classifier = nn.Linear(self.feature_dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.pool(self.backbone(x))
        bn = feat if self.neck is None else self.neck(feat)
        out = {"global": feat, "bn": bn}
        if self.training:
            classifier = self.classifier if self.neck is None else self.neck.classifier
            out["logits"] = classifier(bn)
        return out

    def retrieval_feature(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The feature to rank with, ``outputs[self.retrieval_key]``: by default the BN feature
        (BoT), which is the pooled one without a neck; ``"global"``, the pooled feature."""
        return outputs[self.retrieval_key]


def build_model(cfg: ModelConfig, num_classes: int) -> ReidModel:
    """The model ``cfg`` describes, with a ``num_classes``-way ID classifier."""
    backbone = build_backbone(
        cfg.backbone, cfg.last_stride, cfg.pretrained, zero_residual=cfg.zero_init_residual
    )
    pool = GeM(cfg.gem_p) if cfg.pooling == "gem" else AvgPool()
    return ReidModel(backbone, pool, num_classes, cfg.neck, cfg.retrieval_feature)
