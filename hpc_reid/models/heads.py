"""Global pooling (average, GeM) and the BNNeck head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No
    Human Annotation", TPAMI 2018, Eq. 3): f_c = (mean_hw x_c^p)^(1/p) with one learnable p;
    p = 1 is average pooling and p -> inf tends to max pooling. Inputs are clamped at ``eps`` so
    the power is defined (and its gradient finite) for the zeros a ReLU leaves."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # at least float32: in fp16, x^p overflows for activations above 65504^(1/p)
        dtype = torch.promote_types(x.dtype, torch.float32)
        p = self.p.to(dtype)
        pooled = x.to(dtype).clamp(min=self.eps).pow(p).mean(dim=(2, 3))
        return pooled.pow(1.0 / p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4g}, eps={self.eps}"


class AvgPool(nn.Module):
    """Global average pooling to (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class BNNeck(nn.Module):
    """BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person Re-identification",
    CVPRW 2019, Sec. 3.5; "A Strong Baseline and Batch Normalization Neck", TMM 2019).

    The pooled feature f_t feeds the triplet loss; f_i = BN(f_t) feeds a bias-free classifier (the
    ID loss) and retrieval. The BN's shift is frozen at zero and the classifier has no bias, so the
    ID loss's decision boundaries pass through the origin of the normalised feature space, where
    cosine retrieval works; weight 1, classifier weights N(0, 0.001^2) as in the authors' code.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """The BN feature; the classifier is applied by the caller, in training only."""
        return self.bn(feat)
