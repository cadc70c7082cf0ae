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
    """Backbone + pooling + neck. ``forward`` returns a dict: ``"global"`` (the pooled feature,
    input of the triplet and center losses), ``"bn"`` (the BNNeck feature, used for retrieval;
    the pooled feature itself without a neck) and, in training mode, ``"logits"``."""

    def __init__(self, backbone: nn.Module, pool: nn.Module, num_classes: int, neck: str):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.feature_dim = backbone.out_channels
        if neck == "bnneck":
            self.neck = BNNeck(self.feature_dim, num_classes)
        else:
            self.neck = None
            self.classifier = nn.Linear(self.feature_dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.pool(self.backbone(x))
        if self.neck is not None:
            bn, logits = self.neck(feat)
        else:
            bn, logits = feat, self.classifier(feat)
        out = {"global": feat, "bn": bn}
        if self.training:
            out["logits"] = logits
        return out

    def retrieval_feature(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["bn"]


def build_model(cfg: ModelConfig, num_classes: int) -> ReidModel:
    backbone = build_backbone(cfg.backbone, cfg.last_stride, cfg.pretrained)
    pool = GeM(cfg.gem_p) if cfg.pooling == "gem" else AvgPool()
    return ReidModel(backbone, pool, num_classes, cfg.neck)
