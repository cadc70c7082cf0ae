"""ResNet trunks with a configurable last stride and optional non-local blocks, and
ResNet-50-IBN-a.

Built on torchvision's ResNet (He et al., CVPR 2016; stride on the bottleneck's 3x3, "v1.5"),
never with downloaded weights. Keys stay torchvision's (``conv1.weight``, ``layer1.0.bn1.weight``,
...), so ImageNet state dicts load with :func:`hpc_reid.models.backbones.load_pretrained`; the
non-local blocks live apart, under ``non_local.layer2.*`` ..., so they change none of those keys.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., "Non-local Neural Networks", CVPR 2018,
    Eq. 1-3 and Fig. 2): every position i of x gets z_i = x_i + W_z y_i with
    y_i = sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j), a response to all positions of the map
    (the whole body at once, where a 3x3 conv sees a neighbourhood).

    theta, phi and g are 1x1 convs from ``channels`` to ``channels // reduction``. The paper
    halves the channels; CACE-Net's releases divide by 16 (TF: ``compression: 16``; PyTorch:
    ``NonLocal(C, C // 16)``), the default here: it is the backbone their numbers come from, and
    its convs and attention products cost an eighth of the paper's C/2. No 1/sqrt(d) scaling of
    the dot products, as in the paper and both releases. The 1x1 convs have biases as in the
    releases (phi's and g's are constant shifts that the softmax and the BN cancel: harmless).

    W_z is a 1x1 conv followed by a BatchNorm whose scale and shift start at 0 (the paper's
    Sec. 4.1), so the block starts as the identity and an ImageNet trunk's features are
    untouched at the first step. Only the BN is zeroed: with W_z's weights zero as well, no
    gradient would reach either and the block would never train. (Both CACE-Net releases zero
    a plain W_z conv without a BN instead; the start is the same identity.)
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        inter = max(1, channels // reduction)
        self.theta = nn.Conv2d(channels, inter, kernel_size=1)
        self.phi = nn.Conv2d(channels, inter, kernel_size=1)
        self.g = nn.Conv2d(channels, inter, kernel_size=1)
        self.out = nn.Conv2d(inter, channels, kernel_size=1, bias=False)  # the BN has the shift
        self.out_bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.out_bn.weight)
        nn.init.zeros_(self.out_bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (n, hw, inter)
        phi = self.phi(x).flatten(2)  # (n, inter, hw)
        g = self.g(x).flatten(2).transpose(1, 2)  # (n, hw, inter)
        attention = torch.softmax(theta @ phi, dim=-1)  # f(x_i, x_j) / C(x), Eq. 3
        y = (attention @ g).transpose(1, 2).reshape(n, -1, h, w)
        return x + self.out_bn(self.out(y))


#: The stages that get a non-local block, after their second-to-last residual block (CACE-Net's
#: PyTorch release, ``i == blocks - 2`` in layer2..layer4; its TF release has layer3 and layer4).
NON_LOCAL_LAYERS = ("layer2", "layer3", "layer4")


class ResNetTrunk(nn.Module):
    """A ResNet without its average pooling and classifier, returning layer4's map.

    ``forward_stages`` returns layer1..layer4's maps (output strides 4, 8, 16 and 16 or 32), whose
    channels are ``stage_channels``: the skips of a decoder such as SAN's SA-Dec.

    ``last_stride=1`` removes layer4's downsampling (output stride 16 instead of 32): the larger
    final map gives finer features at little cost (Sun et al., PCB, ECCV 2018; Luo et al., Bag of
    Tricks, CVPRW 2019, Sec. 3.4). The stride sits on the first block's 3x3 conv (``conv1`` of a
    BasicBlock, ``conv2`` of a Bottleneck) and on its shortcut projection.

    :meth:`add_non_local` puts a :class:`NonLocalBlock` after the second-to-last residual block
    of layer2, layer3 and layer4 (``model.non_local``, CACE-Net's backbone); ``forward`` and
    ``forward_stages`` run them. Without them the trunk has exactly torchvision's keys.
    """

    #: Keys an ImageNet checkpoint cannot hold: absent from one, they keep their initialisation
    #: (:func:`hpc_reid.models.backbones.load_pretrained`).
    fresh_prefixes = ("non_local.",)

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
        # empty (no keys) unless add_non_local: layer name -> block, and the index it follows
        self.non_local = nn.ModuleDict()
        self.non_local_after: dict[str, int] = {}

    def add_non_local(self, reduction: int = 16) -> None:
        """Insert a :class:`NonLocalBlock` after the second-to-last residual block of layer2,
        layer3 and layer4 (index 2, 4 and 1 of ResNet-50's 3-4-6-3; index 0 of ResNet-18's
        two-block layers). Built after the trunk, so the trunk's own initial weights are those of
        a trunk without blocks from the same seed."""
        if len(self.non_local):
            raise ValueError("this ResNet trunk already has its non-local blocks")
        for name, channels in zip(NON_LOCAL_LAYERS, self.stage_channels[1:], strict=True):
            layer = getattr(self, name)
            if len(layer) < 2:
                raise ValueError(
                    f"{name} has {len(layer)} residual block(s): a non-local block goes after the "
                    "second-to-last, so it needs at least 2"
                )
            self.non_local[name] = NonLocalBlock(channels, reduction)
            self.non_local_after[name] = len(layer) - 2

    def _stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, name)
        if name not in self.non_local:
            return layer(x)
        after = self.non_local_after[name]
        for i, block in enumerate(layer):
            x = block(x)
            if i == after:
                x = self.non_local[name](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):  # earlier maps freed as it goes
            x = self._stage(name, x)
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """layer1..layer4's maps (with their non-local blocks); the last is ``forward``'s."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = self._stage(name, x)
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
