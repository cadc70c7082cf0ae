"""Pooling and the BNNeck head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović, Tolias, Chum, TPAMI 2018): (mean x^p)^(1/p) with a
    learnable p; p=1 is average pooling and p -> inf tends to max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p).flatten(1)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class BNNeck(nn.Module):
    """BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline", CVPRW 2019, Sec. 3.5): the
    pooled feature feeds the triplet loss; after a BatchNorm without a learned shift it feeds a
    bias-free classifier (the ID loss) and retrieval."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)  # no shift: keeps the feature centred for the CE loss
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn(feat)
        return bn, self.classifier(bn)
