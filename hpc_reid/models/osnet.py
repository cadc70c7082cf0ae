"""OSNet (Zhou, Yang, Cavallaro, Xiang, "Omni-Scale Feature Learning for Person
Re-Identification", ICCV 2019).

Written from the paper (Sec. 3, Table 1). Module names follow the authors' public release
(torchreid's ``osnet_x1_0_imagenet.pth``: ``conv2.0.conv2b.1.conv1.weight``, ``conv2.2.0.conv.*``
for the transition, ...), so its ImageNet weights load with :func:`load_pretrained`; its ``fc.*``
(512-d embedding) and ``classifier.*`` keys are the head, which we do not build.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvLayer(nn.Module):
    """Convolution + BatchNorm (+ ReLU): the paper's standard layer."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, relu: bool = True
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class LiteConv3x3(nn.Module):
    """Lite 3x3 (Sec. 3.1, Fig. 3): a linear pointwise 1x1 then a depthwise 3x3, followed by BN and
    ReLU; the factorisation cuts a 3x3 layer's cost from 9·c·c' to (c + 9)·c'."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class AggregationGate(nn.Module):
    """Unified aggregation gate (Sec. 3.2, Eq. 3): channel weights in (0, 1) from global average
    pooling -> FC -> ReLU -> FC -> sigmoid, the FCs as 1x1 convolutions with reduction 16. One gate
    is shared by all streams of a block, so the fusion is input-dependent but scale-agnostic."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"gate over {channels} channels with reduction {reduction} is empty")
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * weights.sigmoid()


class OSBlock(nn.Module):
    """Omni-scale residual bottleneck (Sec. 3.2, Fig. 4): 1x1 reduction to ``cout // 4``, T = 4
    streams of 1, 2, 3 and 4 lite 3x3 layers (receptive fields 3, 5, 7, 9), the shared gate on
    each stream, their sum, then a linear 1x1 expansion added to the (projected) input."""

    def __init__(self, cin: int, cout: int, bottleneck_reduction: int = 4):
        super().__init__()
        mid = cout // bottleneck_reduction
        self.conv1 = ConvLayer(cin, mid, 1)
        self.conv2a = LiteConv3x3(mid, mid)
        self.conv2b = nn.Sequential(*(LiteConv3x3(mid, mid) for _ in range(2)))
        self.conv2c = nn.Sequential(*(LiteConv3x3(mid, mid) for _ in range(3)))
        self.conv2d = nn.Sequential(*(LiteConv3x3(mid, mid) for _ in range(4)))
        self.gate = AggregationGate(mid)
        self.conv3 = ConvLayer(mid, cout, 1, relu=False)
        self.downsample = ConvLayer(cin, cout, 1, relu=False) if cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    @property
    def residual_bn(self) -> nn.BatchNorm2d:
        """The BatchNorm whose output is added to the shortcut (zeroed by zero-init residual)."""
        return self.conv3.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        streams = (self.conv2a, self.conv2b, self.conv2c, self.conv2d)
        fused = sum(self.gate(stream(y)) for stream in streams)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(fused) + identity)


def _stage(cin: int, cout: int, blocks: int, transition: bool) -> nn.Sequential:
    """``blocks`` OS blocks; with ``transition``, then a 1x1 conv and 2x2 average pooling."""
    layers: list[nn.Module] = [OSBlock(cin if i == 0 else cout, cout) for i in range(blocks)]
    if transition:
        layers.append(nn.Sequential(ConvLayer(cout, cout, 1), nn.AvgPool2d(2, stride=2)))
    return nn.Sequential(*layers)


class OSNet(nn.Module):
    """OSNet trunk (Table 1): conv1 7x7/2 + 3x3/2 max pool, stages conv2..conv4 of 2 OS blocks with
    transitions after conv2 and conv3, conv5 1x1. Channels are [64, 256, 384, 512] x ``width``
    (x0.25: [16, 64, 96, 128]); the output stride is 16 and ``out_channels = 512 * width``. The
    paper's global pooling and 512-d FC embedding are left to the ReID head.

    ``forward_stages`` returns the maps of conv2, conv3 (each before its transition), conv4 and
    conv5, at Table 1's resolutions (output strides 4, 8, 16, 16, as a ResNet's layer1..layer4
    with last stride 1); their channels are ``stage_channels``."""

    def __init__(self, width: float = 1.0, blocks: tuple[int, int, int] = (2, 2, 2)):
        super().__init__()
        c = [int(base * width) for base in (64, 256, 384, 512)]
        self.conv1 = ConvLayer(3, c[0], 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = _stage(c[0], c[1], blocks[0], transition=True)
        self.conv3 = _stage(c[1], c[2], blocks[1], transition=True)
        self.conv4 = _stage(c[2], c[3], blocks[2], transition=False)
        self.conv5 = ConvLayer(c[3], c[3], 1)
        self.out_channels = c[3]
        self.stage_channels = (c[1], c[2], c[3], c[3])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.conv4(self.conv3(self.conv2(x))))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """conv2, conv3 (before their transitions), conv4 and conv5's maps; the last is
        ``forward``'s."""
        x = self.maxpool(self.conv1(x))
        stages = []
        for stage in (self.conv2, self.conv3):
            for block in stage[:-1]:
                x = block(x)
            stages.append(x)
            x = stage[-1](x)  # the transition: 1x1 conv and 2x2 average pooling
        x = self.conv4(x)
        stages.append(x)
        stages.append(self.conv5(x))
        return stages
