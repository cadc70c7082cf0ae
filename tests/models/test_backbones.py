"""Backbone registry, output shapes against conv arithmetic, ResNet-IBN-a and OSNet structure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from hpc_reid.config import BACKBONES
from hpc_reid.models import available_backbones, build_backbone, register_backbone
from hpc_reid.models.resnet import IBN

REPO = Path(__file__).resolve().parents[2]

# The strided layers of each trunk as (kernel, stride, padding); "last" stands for last_stride.
# Read off the papers' architecture tables, not off our modules.
_RESNET = [(7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, "last", 1)]  # conv1, maxpool, layer2-4
_MOBILENET = [(3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, "last", 1)]  # stem, 24/32/64/160
_OSNET = [(7, 2, 3), (3, 2, 1), (2, 2, 0), (2, 2, 0)]  # conv1, maxpool, two transition poolings
TRUNKS = {
    "resnet18": (512, _RESNET),
    "resnet34": (512, _RESNET),
    "resnet50": (2048, _RESNET),
    "resnet50_ibn_a": (2048, _RESNET),
    "mobilenet_v2": (1280, _MOBILENET),
    "osnet_x1_0": (512, _OSNET),
    "osnet_x0_25": (128, _OSNET),
}


def expected_size(size: int, layers: list, last_stride: int) -> int:
    for kernel, stride, padding in layers:
        stride = last_stride if stride == "last" else stride
        size = (size + 2 * padding - kernel) // stride + 1
    return size


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_holds_exactly_the_configurable_backbones():
    assert sorted(BACKBONES) == available_backbones()


@pytest.mark.parametrize("last_stride", [1, 2])
@pytest.mark.parametrize("name", sorted(TRUNKS))
def test_feature_map_shape_follows_the_strides(name, last_stride):
    channels, layers = TRUNKS[name]
    backbone = build_backbone(name, last_stride).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 128, 64))
    h, w = expected_size(128, layers, last_stride), expected_size(64, layers, last_stride)
    assert backbone.out_channels == channels
    assert tuple(out.shape) == (2, channels, h, w)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "osnet_x0_25"])
def test_sizes_not_divisible_by_the_output_stride_follow_conv_arithmetic(name):
    channels, layers = TRUNKS[name]
    with torch.no_grad():
        out = build_backbone(name, 1).eval()(torch.randn(1, 3, 100, 38))
    assert tuple(out.shape) == (1, channels, *(expected_size(s, layers, 1) for s in (100, 38)))


def test_last_stride_one_doubles_the_map_of_resnets_and_mobilenet_not_osnet():
    sizes = {}
    for name in ("resnet18", "mobilenet_v2", "osnet_x0_25"):
        with torch.no_grad():
            sizes[name] = [
                build_backbone(name, s).eval()(torch.randn(1, 3, 128, 64)).shape[-2:]
                for s in (1, 2)
            ]
    assert sizes["resnet18"] == [(8, 4), (4, 2)]
    assert sizes["mobilenet_v2"] == [(8, 4), (4, 2)]
    assert sizes["osnet_x0_25"] == [(8, 4), (8, 4)]


# Each trunk's last four stage ends (forward_stages): their channels, from the papers' tables
# (ResNet Table 1, MobileNetV2 Table 2's 24/32/96 ends and 1280, OSNet Table 1's conv2..conv5),
# and how many of the trunk's strided layers (TRUNKS) precede each.
STAGES = {
    "resnet18": ((64, 128, 256, 512), (2, 3, 4, 5)),
    "resnet34": ((64, 128, 256, 512), (2, 3, 4, 5)),
    "resnet50": ((256, 512, 1024, 2048), (2, 3, 4, 5)),
    "resnet50_ibn_a": ((256, 512, 1024, 2048), (2, 3, 4, 5)),
    "mobilenet_v2": ((24, 32, 96, 1280), (2, 3, 4, 5)),
    "osnet_x1_0": ((256, 384, 512, 512), (2, 3, 4, 4)),  # conv2, conv3 before their transitions
    "osnet_x0_25": ((64, 96, 128, 128), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("last_stride", [1, 2])
@pytest.mark.parametrize("name", sorted(STAGES))
def test_forward_stages_follow_the_strides_and_end_with_forwards_map(name, last_stride):
    channels, preceding = STAGES[name]
    layers = TRUNKS[name][1]
    torch.manual_seed(0)
    backbone = build_backbone(name, last_stride).eval()
    x = torch.randn(2, 3, 100, 38)  # not a multiple of the output stride
    with torch.no_grad():
        stages, final = backbone.forward_stages(x), backbone(x)
    assert backbone.stage_channels == channels
    expected = [
        (2, c, *(expected_size(s, layers[:k], last_stride) for s in (100, 38)))
        for c, k in zip(channels, preceding, strict=True)
    ]
    assert [tuple(m.shape) for m in stages] == expected
    assert torch.equal(stages[-1], final)


def test_resnet101_builds_with_last_stride_one():  # the only resnet101 instance of the suite
    backbone = build_backbone("resnet101", 1).eval()
    assert backbone.out_channels == 2048 and len(backbone.layer3) == 23
    assert backbone.stage_channels == (256, 512, 1024, 2048)
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        out, stages = backbone(x), backbone.forward_stages(x)
    assert out.shape == (1, 2048, 4, 2)
    assert [m.shape[1] for m in stages] == [256, 512, 1024, 2048] and torch.equal(stages[-1], out)


def test_resnet_keys_are_torchvisions_without_the_classifier():
    reference = torchvision.models.resnet18(weights=None).state_dict()
    expected = {k for k in reference if not k.startswith("fc.")}
    assert set(build_backbone("resnet18").state_dict()) == expected


def test_unknown_backbone_names_the_closest_and_lists_all():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet5")
    message = str(info.value)
    assert "unknown backbone 'resnet5' (did you mean 'resnet50'?)" in message
    assert all(name in message for name in BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'; available: "):
        build_backbone("vgg16")


def test_a_user_registered_backbone_passes_config_validation_and_builds():
    from hpc_reid.config import ConfigError, load_config
    from hpc_reid.models import build_model

    def tiny(last_stride):
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))
        net.out_channels = 8
        return net

    with pytest.raises(ConfigError, match="unknown backbone 'my_tiny_net'"):
        load_config(REPO / "configs/synthetic/bot.yaml", ["model.backbone=my_tiny_net"])
    register_backbone("my_tiny_net")(tiny)
    config = load_config(REPO / "configs/synthetic/bot.yaml", ["model.backbone=my_tiny_net"])
    model = build_model(config.model, num_classes=5)
    assert model.feature_dim == 8


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_backbone("resnet18")(lambda last_stride: nn.Identity())


def test_ibn_a_puts_instance_norm_on_exactly_half_the_channels_of_layer1_to_3():
    backbone = build_backbone("resnet50_ibn_a")
    for index, depth in enumerate((3, 4, 6, 3)):
        layer = getattr(backbone, f"layer{index + 1}")
        assert len(layer) == depth
        for block in layer:
            if index == 3:  # layer4 stays plain
                assert isinstance(block.bn1, nn.BatchNorm2d)
                continue
            planes = block.conv1.out_channels
            assert isinstance(block.bn1, IBN)
            assert block.bn1.IN.num_features == planes // 2 and block.bn1.IN.affine
            assert block.bn1.BN.num_features == planes - planes // 2
            assert isinstance(block.bn2, nn.BatchNorm2d) and isinstance(block.bn3, nn.BatchNorm2d)
    assert sum(isinstance(m, IBN) for m in backbone.modules()) == 3 + 4 + 6


def test_ibn_normalises_each_image_on_the_first_half_and_the_batch_on_the_rest():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3 + torch.arange(4.0).view(4, 1, 1, 1)  # per-image offsets
    y = IBN(8).train()(x)
    first, rest = x[:, :4], x[:, 4:]
    per_image = (2, 3)  # statistics over each image's pixels vs the whole batch's
    reference_in = (first - first.mean(per_image, keepdim=True)) / torch.sqrt(
        first.var(per_image, unbiased=False, keepdim=True) + 1e-5
    )
    per_batch = (0, 2, 3)
    reference_bn = (rest - rest.mean(per_batch, keepdim=True)) / torch.sqrt(
        rest.var(per_batch, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(y[:, :4], reference_in, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y[:, 4:], reference_bn, rtol=1e-4, atol=1e-5)


def test_ibn_a_keys_match_the_public_ibn_net_checkpoint():
    # IBN-Net's resnet50_ibn_a: torchvision's names, with bn1 of layer1..3 split into IN and BN
    expected = set()
    for key in torchvision.models.resnet50(weights=None).state_dict():
        parts = key.split(".")
        if key.startswith("fc."):
            continue
        if parts[0] in ("layer1", "layer2", "layer3") and parts[2] == "bn1":
            prefix = ".".join(parts[:3])
            if parts[3] in ("weight", "bias"):
                expected.add(f"{prefix}.IN.{parts[3]}")
            expected.add(f"{prefix}.BN.{parts[3]}")
        else:
            expected.add(key)
    assert set(build_backbone("resnet50_ibn_a").state_dict()) == expected


def test_parameter_counts_match_the_papers():
    resnet50 = count_parameters(build_backbone("resnet50"))
    assert resnet50 == 25_557_032 - (2048 * 1000 + 1000)  # torchvision's resnet50 minus its fc
    # IBN's affine IN + BN hold as many parameters as the BN they replace
    assert count_parameters(build_backbone("resnet50_ibn_a")) == resnet50
    # OSNet paper, Table 2: 2.2M (x1.0) and 0.2M (x0.25), counting the 512-d fc embedding
    # (Linear + BatchNorm1d) of the authors' model, which our trunk leaves to the head
    for name, width, paper in (("osnet_x1_0", 512, 2.2e6), ("osnet_x0_25", 128, 0.2e6)):
        trunk = count_parameters(build_backbone(name))
        with_fc = trunk + width * 512 + 512 + 2 * 512
        assert abs(with_fc - paper) / paper < 0.05, (name, trunk, with_fc)
    assert 1.85e6 < count_parameters(build_backbone("osnet_x1_0")) < 1.95e6


def test_osnet_block_has_four_gated_streams_of_one_to_four_lite_layers():
    from hpc_reid.models.osnet import AggregationGate, LiteConv3x3, OSBlock

    backbone = build_backbone("osnet_x0_25")
    blocks = [m for m in backbone.modules() if isinstance(m, OSBlock)]
    assert len(blocks) == 6
    block = blocks[0]
    streams = (block.conv2a, block.conv2b, block.conv2c, block.conv2d)
    depths = [sum(isinstance(m, LiteConv3x3) for m in s.modules()) for s in streams]
    assert depths == [1, 2, 3, 4]
    assert sum(isinstance(m, AggregationGate) for m in block.modules()) == 1  # shared
    lite = block.conv2a
    assert lite.conv1.kernel_size == (1, 1) and lite.conv2.groups == lite.conv2.out_channels
    # channels per stage: [16, 64, 96, 128] for x0.25
    assert backbone.conv1.conv.out_channels == 16
    assert [getattr(backbone, f"conv{i}")[0].conv3.conv.out_channels for i in (2, 3, 4)] == [
        64,
        96,
        128,
    ]


def test_osnet_gate_is_the_sigmoid_of_a_two_layer_mlp_on_the_pooled_map():
    from hpc_reid.models.osnet import AggregationGate

    torch.manual_seed(0)
    gate, x = AggregationGate(32), torch.randn(2, 32, 6, 4)
    pooled = x.mean(dim=(2, 3))
    hidden = torch.relu(pooled @ gate.fc1.weight.flatten(1).T + gate.fc1.bias)
    weights = torch.sigmoid(hidden @ gate.fc2.weight.flatten(1).T + gate.fc2.bias)
    torch.testing.assert_close(gate(x), x * weights[:, :, None, None])


def test_osnet_keys_follow_the_authors_release():
    keys = set(build_backbone("osnet_x0_25").state_dict())
    for key in (
        "conv1.conv.weight",
        "conv1.bn.running_mean",
        "conv2.0.conv1.conv.weight",
        "conv2.0.conv2a.conv1.weight",
        "conv2.0.conv2a.conv2.weight",
        "conv2.0.conv2d.3.bn.weight",
        "conv2.0.gate.fc1.bias",
        "conv2.0.gate.fc2.weight",
        "conv2.0.conv3.bn.weight",
        "conv2.0.downsample.conv.weight",
        "conv2.2.0.conv.weight",  # transition: 1x1 conv then average pooling
        "conv3.2.0.bn.weight",
        "conv4.1.conv3.conv.weight",
        "conv5.conv.weight",
    ):
        assert key in keys, key
    absent = ("conv2.1.downsample", "conv4.2", "fc.", "classifier.")
    assert not any(k.startswith(absent) for k in keys)


# Residual blocks per trunk, from the papers' architecture tables: ResNet-18 (2, 2, 2, 2),
# ResNet-34/50 (3, 4, 6, 3), MobileNetV2's bottlenecks whose input and output match (stride 1, same
# channels: 1 + 2 + 3 + 2 + 2 of the 17), OSNet (2, 2, 2).
RESIDUAL_BLOCKS = {
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnet50_ibn_a": 16,
    "mobilenet_v2": 10,
    "osnet_x1_0": 6,
    "osnet_x0_25": 6,
}


def _shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a residual block computes when its residual branch is zero."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    if isinstance(block, InvertedResidual):
        return x
    down = block.downsample
    return torch.relu(x if down is None else down(x))


@pytest.mark.parametrize("name", sorted(RESIDUAL_BLOCKS))
def test_zero_init_residual_starts_every_residual_block_as_its_shortcut(name):
    from torchvision.models.mobilenetv2 import InvertedResidual

    from hpc_reid.models.osnet import OSBlock

    kinds = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck, OSBlock)
    zeroed = build_backbone(name, zero_residual=True).eval()
    plain = build_backbone(name).eval()
    blocks = [
        m
        for m in zeroed.modules()
        if isinstance(m, kinds) or (isinstance(m, InvertedResidual) and m.use_res_connect)
    ]
    assert len(blocks) == RESIDUAL_BLOCKS[name]
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o))) for b in blocks]
    with torch.no_grad():
        zeroed(torch.randn(2, 3, 64, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks)
    for block, x, out in seen:
        with torch.no_grad():
            torch.testing.assert_close(out, _shortcut(block, x), rtol=0, atol=0)
    # nothing but those BatchNorm scales differs from the plain initialisation's distribution
    n_zero = sum(int((p == 0).all()) for n, p in zeroed.named_parameters() if n.endswith("weight"))
    n_plain = sum(int((p == 0).all()) for n, p in plain.named_parameters() if n.endswith("weight"))
    assert n_zero - n_plain == RESIDUAL_BLOCKS[name]


def test_zero_init_residual_leaves_pretrained_weights_as_loaded(tmp_path):
    source = build_backbone("resnet18")
    torch.nn.init.constant_(source.layer1[0].bn2.weight, 0.5)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = build_backbone("resnet18", pretrained=tmp_path / "w.pth", zero_residual=True)
    assert torch.equal(loaded.layer1[0].bn2.weight, source.layer1[0].bn2.weight)
