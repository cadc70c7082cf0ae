"""Center loss: pull every feature towards a learned center of its identity.

Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition", ECCV 2016,
Eq. 2 defines L_C = 1/2 sum_i |x_i - c_{y_i}|^2 over a mini-batch. We follow the re-identification
form of Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person Re-identification" (BoT),
CVPRW 2019, Eq. 6 and its ``center_loss.py``: no 1/2, and the sum divided by the batch size B,

    L_C = (1 / B) * sum_i clamp(|x_i - c_{y_i}|^2, 1e-12, 1e12).

(BoT clamps every entry of its masked B x C distance matrix, so its value carries an extra
(C - 1) * 1e-12 per sample; we clamp only the B distances that enter the loss.) The centers are a
parameter of this module, trained as in BoT by their own SGD optimizer (lr ``loss.center.lr``)
rather than by Wen et al.'s moving-average rule, with their gradient divided by the loss weight
before that step so the center update does not depend on the weight (the strategies do it:
``extra_grad_scale`` of :class:`hpc_reid.engine.strategy.DDPStrategy`, also averaging the
centers' gradient over ranks, as they are outside DDP).
"""

from __future__ import annotations

import torch
from torch import nn


class CenterLoss(nn.Module):
    """Center loss of Wen et al. (ECCV 2016) in BoT's form; ``centers`` is (num_classes, feat_dim),
    initialised from a standard normal as in BoT."""

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(
                f"CenterLoss needs num_classes >= 1 and feat_dim >= 1, got {num_classes}, "
                f"{feat_dim}"
            )
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(
                f"CenterLoss expects features (B, {self.feat_dim}), got {tuple(features.shape)}"
            )
        if pids.shape != features.shape[:1]:
            raise ValueError(f"expected pids ({features.shape[0]},), got {tuple(pids.shape)}")
        diff = features - self.centers.to(features.dtype)[pids.long()]
        return diff.pow(2).sum(1).clamp(min=1e-12, max=1e12).sum() / features.shape[0]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}"
