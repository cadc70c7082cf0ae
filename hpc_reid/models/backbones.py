"""Backbones by name: a registry of feature extractors ending in a feature map (N, C, h, w).

No weights are ever downloaded: ImageNet weights come from a local file (``model.pretrained``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from hpc_reid.config import ConfigError
from hpc_reid.models.ibn import resnet50_ibn_a
from hpc_reid.models.osnet import OSNet

BackboneFactory = Callable[[int], nn.Module]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str):
    """Register ``factory(last_stride) -> nn.Module`` (with ``out_channels``) under ``name``."""

    def add(factory: BackboneFactory) -> BackboneFactory:
        _BACKBONES[name] = factory
        return factory

    return add


def available_backbones() -> list[str]:
    return sorted(_BACKBONES)


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier; ``last_stride`` sets layer4's
    stride (1 in ReID: Sun et al., PCB, ECCV 2018; Luo et al., BoT, CVPRW 2019)."""

    def __init__(self, resnet: torchvision.models.ResNet, last_stride: int):
        super().__init__()
        block = resnet.layer4[0]
        (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (last_stride,) * 2
        if block.downsample is not None:
            block.downsample[0].stride = (last_stride,) * 2
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


for _depth in (18, 34, 50, 101):

    def _resnet(last_stride: int, _depth: int = _depth) -> nn.Module:
        return ResNetTrunk(
            getattr(torchvision.models, f"resnet{_depth}")(weights=None), last_stride
        )

    register_backbone(f"resnet{_depth}")(_resnet)


@register_backbone("resnet50_ibn_a")
def _resnet50_ibn_a(last_stride: int) -> nn.Module:
    return ResNetTrunk(resnet50_ibn_a(), last_stride)


class MobileNetV2Trunk(nn.Module):
    """torchvision's MobileNetV2 ``features`` (out 1280 channels). ``last_stride=1`` removes the
    stride of the last stride-2 block (the 160-channel stage), doubling the final map as ReID does
    for ResNets. Keys are ``features.*``, as in torchvision's ImageNet checkpoints."""

    def __init__(self, last_stride: int):
        super().__init__()
        self.features = torchvision.models.mobilenet_v2(weights=None).features
        if last_stride == 1:
            self.features[14].conv[1][0].stride = (1, 1)  # the first 160-channel block
        self.out_channels = 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


register_backbone("mobilenet_v2")(MobileNetV2Trunk)
register_backbone("osnet_x1_0")(lambda last_stride: OSNet(1.0))
register_backbone("osnet_x0_25")(lambda last_stride: OSNet(0.25))


def build_backbone(name: str, last_stride: int = 1, pretrained: str | None = None) -> nn.Module:
    """The backbone ``name``; OSNet has no last stride to change (its last stage has none)."""
    if name not in _BACKBONES:
        close = difflib.get_close_matches(name, _BACKBONES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}{hint}; available: {', '.join(available_backbones())}"
        )
    backbone = _BACKBONES[name](last_stride)
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


_DROPPED = ("fc.", "classifier.", "last_linear.")


def load_pretrained(module: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights from a local file into ``module``; the classifier's keys are ignored.

    Anything else that does not fit is an error listing the missing, unexpected and
    mismatched-shape keys, so a checkpoint of another architecture is never half-loaded.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(_DROPPED)}
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:

        def listing(title: str, keys: list[str]) -> str:
            more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
            return f"\n  {title} ({len(keys)}): {', '.join(keys[:10])}{more}" if keys else ""

        raise ConfigError(
            f"model.pretrained: {path} does not fit {type(module).__name__}:"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("shape mismatches", shapes)
        )
    module.load_state_dict(state)
