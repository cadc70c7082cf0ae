"""ResNet trunks with a configurable last stride, and ResNet-50-IBN-a.

Built on torchvision's ResNet (He et al., CVPR 2016; stride on the bottleneck's 3x3, "v1.5"),
never with downloaded weights. Keys stay torchvision's (``conv1.weight``, ``layer1.0.bn1.weight``,
...), so ImageNet state dicts load with :func:`hpc_reid.models.backbones.load_pretrained`.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class ResNetTrunk(nn.Module):
    """A ResNet without its average pooling and classifier, returning layer4's map.

    ``forward_stages`` returns layer1..layer4's maps (output strides 4, 8, 16 and 16 or 32), whose
    channels are ``stage_channels``: the skips of a decoder such as SAN's SA-Dec.

    ``last_stride=1`` removes layer4's downsampling (output stride 16 instead of 32): the larger
    final map gives finer features at little cost (Sun et al., PCB, ECCV 2018; Luo et al., Bag of
    Tricks, CVPRW 2019, Sec. 3.4). The stride sits on the first block's 3x3 conv (``conv1`` of a
    BasicBlock, ``conv2`` of a Bottleneck) and on its shortcut projection.
    """

    def __init__(self, resnet: torchvision.models.ResNet, last_stride: int):
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        block = resnet.layer4[0]
        bottleneck = isinstance(block, torchvision.models.resnet.Bottleneck)
        strided = block.conv2 if bottleneck else block.conv1
        strided.stride = (last_stride, last_stride)
        if block.downsample is not None:
            block.downsample[0].stride = (last_stride, last_stride)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
            resnet.layer4,
        )
        self.out_channels = resnet.fc.in_features
        expansion = type(block).expansion  # 1 (BasicBlock) or 4 (Bottleneck)
        self.stage_channels = tuple(width * expansion for width in (64, 128, 256, 512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """layer1..layer4's maps; the last is ``forward``'s."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return stages


class IBN(nn.Module):
    """Instance-batch normalisation (Pan et al., "Two at Once: Enhancing Learning and
    Generalization Capacities via IBN-Net", ECCV 2018, Sec. 3.2): affine instance norm on the first
    ``planes // 2`` channels, which removes per-image appearance (colour, contrast) and so helps
    across domains, and batch norm on the rest, which keeps the content discriminative."""

    def __init__(self, planes: int):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(first.contiguous()), self.BN(rest.contiguous())], dim=1)


def resnet50_ibn_a() -> torchvision.models.ResNet:
    """ResNet-50-IBN-a: the first normalisation of every bottleneck in layer1..layer3 is IBN; layer4
    stays plain (IN in the last stage hurts discrimination, paper Sec. 3.2). Keys follow the public
    IBN-Net checkpoint (``layer1.0.bn1.IN.weight``, ``layer1.0.bn1.BN.running_mean``)."""
    net = torchvision.models.resnet50(weights=None)
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            block.bn1 = IBN(block.bn1.num_features)
    return net
