"""Backbones by name: a registry of trunks whose forward returns the last feature map (N, C, h, w)
and which carry ``out_channels`` (C). Pooling and the neck live in :mod:`hpc_reid.models.heads`.

Every built-in trunk also has ``forward_stages(x)``: the maps of its last four stages, the last
one ``forward``'s, with their channels in ``stage_channels`` (a decoder's skips: SAN's SA-Dec,
:mod:`hpc_reid.methods.san`). A registered trunk without them serves every head but those that
declare ``wants_stages``.

No weights are ever downloaded: ImageNet weights come from a local file (``model.pretrained``),
loaded strictly by :func:`load_pretrained`.

``model.non_local`` asks the trunk for its non-local blocks (``add_non_local()``, the ResNets':
:class:`hpc_reid.models.resnet.NonLocalBlock`); a trunk without that method is refused.
"""

from __future__ import annotations

import difflib
import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from hpc_reid.config import ConfigError
from hpc_reid.models.osnet import OSNet
from hpc_reid.models.resnet import ResNetTrunk, resnet50_ibn_a

log = logging.getLogger(__name__)

BackboneFactory = Callable[[int], nn.Module]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register ``factory(last_stride) -> nn.Module`` under ``name``; the module's forward returns
    the last feature map and it has ``out_channels`` (and, for heads with ``wants_stages``,
    ``forward_stages`` and ``stage_channels``: module docstring). A name can be registered once."""

    def add(factory: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered ({_BACKBONES[name]!r})")
        _BACKBONES[name] = factory
        return factory

    return add


def available_backbones() -> list[str]:
    return sorted(_BACKBONES)


def _resnet(depth: int) -> BackboneFactory:
    def factory(last_stride: int) -> nn.Module:
        return ResNetTrunk(getattr(torchvision.models, f"resnet{depth}")(weights=None), last_stride)

    factory.__name__ = f"resnet{depth}"
    return factory


for _depth in (18, 34, 50, 101):
    register_backbone(f"resnet{_depth}")(_resnet(_depth))


@register_backbone("resnet50_ibn_a")
def _resnet50_ibn_a(last_stride: int) -> nn.Module:
    return ResNetTrunk(resnet50_ibn_a(), last_stride)


@register_backbone("mobilenet_v2")
class MobileNetV2Trunk(nn.Module):
    """MobileNetV2 (Sandler et al., CVPR 2018): torchvision's ``features``, 1280 channels out.

    ``last_stride=1`` removes the stride of the last stride-2 block (the first 160-channel one),
    so the output stride is 16 instead of 32, the same ReID practice as a ResNet's last stride.
    The trunk keeps the ``features.`` prefix, so its keys are those of torchvision's ImageNet
    checkpoint as they are (the checkpoint's ``classifier.*`` is ignored on loading).

    Its stages for ``forward_stages``: the ends of the stride-4, 8 and 16 resolutions (the last
    24-, 32- and 96-channel blocks, ``features[3]``, ``[6]``, ``[13]``) and the final 1280-channel
    map, the same ladder as a ResNet's layer1..layer4.
    """

    STAGE_ENDS = (3, 6, 13)  # torchvision's layout: the block before each later stride-2 block

    def __init__(self, last_stride: int):
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        self.features = torchvision.models.mobilenet_v2(weights=None).features
        if last_stride == 1:
            last = [m for m in self.features if isinstance(m, InvertedResidual) and m.stride == 2]
            depthwise = [m for m in last[-1].modules() if getattr(m, "stride", None) == (2, 2)]
            (conv,) = depthwise  # one strided conv per block: the depthwise 3x3
            conv.stride = (1, 1)
            last[-1].stride = 1  # its residual test is fixed at build time (96 -> 160: none)
        self.out_channels = 1280
        ends = [self.features[i].out_channels for i in self.STAGE_ENDS]
        self.stage_channels = (*ends, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps after ``features[3]``, ``[6]``, ``[13]`` and the last; the last is
        ``forward``'s."""
        stages = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.STAGE_ENDS:
                stages.append(x)
        stages.append(x)
        return stages


# OSNet's last stage has no stride (output stride 16 by design), so ``last_stride`` is moot.
register_backbone("osnet_x1_0")(lambda last_stride: OSNet(width=1.0))
register_backbone("osnet_x0_25")(lambda last_stride: OSNet(width=0.25))


def residual_bns(trunk: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm at the end of every residual branch of ``trunk``: the one whose output is
    added to the shortcut (torchvision's ResNet blocks and IBN-a's, MobileNetV2's inverted
    residuals that keep their shortcut, OSNet's blocks)."""
    found = []
    for m in trunk.modules():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            found.append(m.bn3)
        elif isinstance(m, torchvision.models.resnet.BasicBlock):
            found.append(m.bn2)
        elif isinstance(m, InvertedResidual) and m.use_res_connect:
            found.append(m.conv[-1])
        elif isinstance(getattr(m, "residual_bn", None), nn.BatchNorm2d):
            found.append(m.residual_bn)
    return found


def zero_init_residual(trunk: nn.Module) -> int:
    """Start every residual block of ``trunk`` as the identity: the scale of the BatchNorm ending
    each residual branch set to 0 (Goyal et al. 2017, Sec. 5.1; He et al., Bag of Tricks for Image
    Classification, CVPR 2019). Returns how many blocks it changed."""
    bns = residual_bns(trunk)
    for bn in bns:
        nn.init.zeros_(bn.weight)
    return len(bns)


def build_backbone(
    name: str,
    last_stride: int = 1,
    pretrained: str | Path | None = None,
    zero_residual: bool = False,
    non_local: bool = False,
) -> nn.Module:
    """The backbone ``name`` with ``last_stride`` (1 or 2; ResNets and MobileNetV2 follow it,
    OSNet has no last stride), loaded from the local state dict ``pretrained`` when given; with
    ``zero_residual`` and no ``pretrained``, every residual block starts as the identity
    (:func:`zero_init_residual`). With ``non_local``, the trunk's non-local blocks are added
    (``add_non_local()``, before loading: an ImageNet file lacks them and they keep their
    identity start); a ConfigError for a trunk without them (MobileNetV2, OSNet)."""
    if name not in _BACKBONES:
        close = difflib.get_close_matches(name, _BACKBONES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}{hint}; available: {', '.join(available_backbones())}"
        )
    backbone = _BACKBONES[name](last_stride)
    if not isinstance(getattr(backbone, "out_channels", None), int):
        raise TypeError(f"backbone {name!r} was built without an integer `out_channels`")
    if non_local:
        if not callable(getattr(backbone, "add_non_local", None)):
            raise ConfigError(
                f"model.non_local=true: backbone {name!r} has no place for non-local blocks "
                "(they go after the second-to-last residual block of a ResNet's layer2, layer3 "
                "and layer4); use a ResNet backbone (resnet18, resnet34, resnet50, resnet101, "
                "resnet50_ibn_a) or model.non_local=false"
            )
        backbone.add_non_local()
    if pretrained:
        load_pretrained(backbone, pretrained, what=f"backbone {name!r}")
    elif zero_residual:
        zero_init_residual(backbone)
    return backbone


def feature_map_size(name: str, last_stride: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of backbone ``name``'s map for a ``height`` x ``width`` input, found by running
    it on the meta device (shapes only: no memory, no arithmetic), so no table of output strides
    can drift from the code (OSNet ignores ``last_stride``; the ResNets and MobileNetV2 follow it).
    """
    with torch.device("meta"):
        trunk = build_backbone(name, last_stride)
        out = trunk(torch.empty(1, 3, height, width))
    return int(out.shape[-2]), int(out.shape[-1])


# The classifier of an ImageNet checkpoint: torchvision's ResNet and IBN-Net (``fc``), MobileNetV2
# (``classifier``), torchreid's OSNet (``fc``: embedding, ``classifier``), Cadene (``last_linear``).
_HEAD_PREFIXES = ("fc.", "classifier.", "last_linear.")
_LISTED = 10


def _state_dict_in(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: the file itself, or a checkpoint's "state_dict"/"model"."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        kind = type(obj).__name__
        raise ConfigError(f"model.pretrained: {path} holds a {kind}, not a state dict")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConfigError(
            f"model.pretrained: {path} is not a state dict: {len(not_tensors)} entries are not "
            f"tensors ({', '.join(not_tensors[:_LISTED])})"
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}  # (Distributed)DataParallel


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f", ... (+{len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return f"\n  {title} ({len(items)}): {', '.join(items[:_LISTED])}{more}"


def load_pretrained(module: nn.Module, path: str | Path, what: str | None = None) -> None:
    """Load the local state dict at ``path`` into ``module``, all or nothing.

    Accepted: a state dict, or a checkpoint dict holding one under "state_dict" or "model"; a
    ``module.`` prefix is removed. The checkpoint's classifier (``fc.*``, ``classifier.*``,
    ``last_linear.*``, when ``module`` has no such keys) is ignored, and so are BatchNorm
    ``num_batches_tracked`` counters absent from checkpoints older than PyTorch 0.4.1, and so are
    keys under ``module.fresh_prefixes`` (modules added to an ImageNet architecture, a ResNet's
    ``non_local.``): absent from the file, they keep their initialisation, said in one log line.
    Any other missing, unexpected or mismatched-shape key is a ConfigError (a ValueError) naming
    the file and listing them, so weights of another architecture are never half-loaded.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file {path} not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.pretrained: cannot read {path} as a state dict of tensors "
            f"(torch.load(weights_only=True): {first_line})"
        ) from exc
    state = _state_dict_in(loaded, path)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    fresh_prefixes = tuple(getattr(module, "fresh_prefixes", ()))
    fresh = [k for k in missing if fresh_prefixes and k.startswith(fresh_prefixes)]
    missing = [k for k in missing if k not in fresh]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(own[k].shape)} in model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"model.pretrained: {path} does not fit {what or type(module).__name__}:"
            + _listing("missing keys", missing)
            + _listing("unexpected keys", unexpected)
            + _listing("shape mismatches", mismatched)
        )
    for key in own.keys() - state.keys():  # num_batches_tracked and fresh: keep the module's own
        state[key] = own[key]
    module.load_state_dict(state)
    if fresh:
        prefixes = sorted({p for p in fresh_prefixes for k in fresh if k.startswith(p)})
        log.info(
            f"model.pretrained: {path} has no weights for the {len(fresh)} keys under "
            f"{', '.join(prefixes)} of {what or type(module).__name__} (added to the ImageNet "
            "architecture): they keep their initialisation"
        )
