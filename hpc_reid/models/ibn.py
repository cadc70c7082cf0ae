"""ResNet-50-IBN-a (Pan et al., "Two at Once: Enhancing Learning and Generalization Capacities via
IBN-Net", ECCV 2018): in layer1..layer3 the first normalisation of every bottleneck is IBN, instance
norm on half of the channels and batch norm on the rest; layer4 is plain. Key names follow the
public IBN-Net checkpoints (``bn1.IN.*``, ``bn1.BN.*``), torchvision's otherwise."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class IBN(nn.Module):
    """Instance norm (affine) on the first ``planes // 2`` channels, batch norm on the rest."""

    def __init__(self, planes: int):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


def resnet50_ibn_a() -> torchvision.models.ResNet:
    net = torchvision.models.resnet50(weights=None)
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            block.bn1 = IBN(block.bn1.num_features)
    return net
