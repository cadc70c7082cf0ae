"""OSNet (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification", ICCV 2019)."""

from __future__ import annotations

from torch import nn


class ConvBN(nn.Sequential):
    """Convolution + BatchNorm + ReLU (the paper's standard layer)."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1, relu=True):
        layers = [
            nn.Conv2d(cin, cout, k, stride, padding, bias=False, groups=groups),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class LiteConv3x3(nn.Sequential):
    """Lite 3x3: pointwise 1x1 then depthwise 3x3 (Sec. 3.1), BN + ReLU after."""

    def __init__(self, cin, cout):
        super().__init__(
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False, groups=cout),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class AggregationGate(nn.Module):
    """Unified aggregation gate (Sec. 3.2): channel weights from a shared mini-network."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, max(channels // reduction, 1), 1)
        self.fc2 = nn.Conv2d(max(channels // reduction, 1), channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return x * self.fc2(self.relu(self.fc1(self.pool(x)))).sigmoid()


class OSBlock(nn.Module):
    """Omni-scale residual bottleneck: T=4 streams of 1..4 lite 3x3 layers, one shared gate."""

    def __init__(self, cin, cout, bottleneck_reduction=4, streams=4):
        super().__init__()
        mid = cout // bottleneck_reduction
        self.conv1 = ConvBN(cin, mid, 1)
        self.streams = nn.ModuleList(
            nn.Sequential(*[LiteConv3x3(mid, mid) for _ in range(t)]) for t in range(1, streams + 1)
        )
        self.gate = AggregationGate(mid)
        self.conv3 = ConvBN(mid, cout, 1, relu=False)
        self.downsample = ConvBN(cin, cout, 1, relu=False) if cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv1(x)
        y = sum(self.gate(stream(y)) for stream in self.streams)
        y = self.conv3(y)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(y + identity)


class OSNet(nn.Module):
    """OSNet backbone: conv1 7x7/2 + max pool, three stages of 2 OS blocks with 1x1 conv + 2x2
    average-pool transitions after stages 2 and 3, and conv5 1x1 (Table 1)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c = [int(64 * width), int(256 * width), int(384 * width), int(512 * width)]
        self.conv1 = ConvBN(3, c[0], 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Sequential(OSBlock(c[0], c[1]), OSBlock(c[1], c[1]))
        self.pool2 = nn.Sequential(ConvBN(c[1], c[1], 1), nn.AvgPool2d(2, stride=2))
        self.conv3 = nn.Sequential(OSBlock(c[1], c[2]), OSBlock(c[2], c[2]))
        self.pool3 = nn.Sequential(ConvBN(c[2], c[2], 1), nn.AvgPool2d(2, stride=2))
        self.conv4 = nn.Sequential(OSBlock(c[2], c[3]), OSBlock(c[3], c[3]))
        self.conv5 = ConvBN(c[3], c[3], 1)
        self.out_channels = c[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3(x))
        return self.conv5(self.conv4(x))
