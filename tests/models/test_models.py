"""Backbones, pooling, BNNeck and pretrained loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hpc_reid.config import ConfigError, ModelConfig
from hpc_reid.models import available_backbones, build_backbone, build_model
from hpc_reid.models.heads import GeM
from hpc_reid.models.ibn import IBN

SHARED = Path(
    os.environ.get("HPC_REID_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared/data")
)
MOBILENET = SHARED / "weights/mobilenet_v2_imagenet_features.pth"

# (channels, total stride with last_stride=2, whether last_stride changes it)
EXPECTED = {
    "resnet18": (512, 32, True),
    "resnet34": (512, 32, True),
    "resnet50": (2048, 32, True),
    "resnet50_ibn_a": (2048, 32, True),
    "mobilenet_v2": (1280, 32, True),
    "osnet_x1_0": (512, 16, False),
    "osnet_x0_25": (128, 16, False),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_holds_every_configurable_backbone():
    from hpc_reid.config import BACKBONES

    assert set(BACKBONES) == set(available_backbones())


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("last_stride", [1, 2])
def test_feature_map_shape_follows_the_strides(name, last_stride):
    channels, stride, follows_last = EXPECTED[name]
    if last_stride == 1 and follows_last:
        stride //= 2
    backbone = build_backbone(name, last_stride).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 128, 64))
    assert backbone.out_channels == channels
    assert tuple(out.shape) == (2, channels, 128 // stride, 64 // stride)


def test_resnet101_builds_with_last_stride_one():
    backbone = build_backbone("resnet101", 1).eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 32)).shape == (1, 2048, 4, 2)


def test_unknown_backbone_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet5' \(did you mean 'resnet50'"):
        build_backbone("resnet5")


def test_ibn_a_normalises_half_the_channels_per_instance():
    backbone = build_backbone("resnet50_ibn_a")
    ibns = [m for m in backbone.modules() if isinstance(m, IBN)]
    assert len(ibns) == 3 + 4 + 6  # every bottleneck of layer1..layer3, none in layer4
    for ibn in ibns:
        planes = ibn.IN.num_features + ibn.BN.num_features
        assert ibn.IN.num_features == planes // 2 and ibn.IN.affine
    # instance norm on the first half: each sample's first-half channels have zero mean
    ibn = IBN(8).train()
    y = ibn(torch.randn(4, 8, 5, 5) * 3 + 2)
    assert torch.allclose(y[:, :4].mean(dim=(2, 3)), torch.zeros(4, 4), atol=1e-5)


def test_osnet_sizes_match_the_paper():
    count = lambda name: sum(p.numel() for p in build_backbone(name).parameters())  # noqa: E731
    # the paper's 2.2M for x1.0 includes a 512-d fc layer we do not build (0.26M)
    assert 1.8e6 < count("osnet_x1_0") < 2.0e6
    assert 0.1e6 < count("osnet_x0_25") < 0.2e6


def test_gem_between_average_and_max_pooling():
    x = torch.rand(3, 5, 4, 4) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)
    big = GeM(p=60.0)(x)
    assert torch.allclose(big, x.amax(dim=(2, 3)), rtol=0.05)
    mid = GeM(p=3.0)(x)
    assert (mid >= x.mean(dim=(2, 3)) - 1e-6).all() and (mid <= x.amax(dim=(2, 3)) + 1e-6).all()


def test_bnneck_outputs_and_modes():
    model = build_model(ModelConfig(backbone="osnet_x0_25"), num_classes=7)
    assert not model.neck.bn.bias.requires_grad and model.neck.classifier.bias is None
    x = torch.randn(4, 3, 64, 32)
    out = model.train()(x)
    assert set(out) == {"global", "bn", "logits"}
    assert out["global"].shape == out["bn"].shape == (4, model.feature_dim)
    assert out["logits"].shape == (4, 7)
    # BNNeck in training: the BN feature is the batch-normalised global feature
    ref = F.batch_norm(out["global"], None, None, model.neck.bn.weight, model.neck.bn.bias, True)
    assert torch.allclose(out["bn"], ref, atol=1e-4)
    evaluated = model.eval()(x)
    assert set(evaluated) == {"global", "bn"}
    assert torch.equal(model.retrieval_feature(evaluated), evaluated["bn"])


def test_no_neck_retrieves_the_pooled_feature():
    model = build_model(ModelConfig(backbone="osnet_x0_25", neck="none"), num_classes=3).eval()
    out = model(torch.randn(2, 3, 64, 32))
    assert torch.equal(out["bn"], out["global"])


def test_model_learns_a_small_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="osnet_x0_25"), num_classes=4).train()
    x, y = torch.randn(8, 3, 64, 32), torch.arange(4).repeat(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x)["logits"], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.skipif(not MOBILENET.is_file(), reason=f"{MOBILENET} not found")
def test_real_imagenet_mobilenet_loads_exactly():
    state = torch.load(MOBILENET, map_location="cpu", weights_only=True)
    backbone = build_backbone("mobilenet_v2", pretrained=str(MOBILENET))
    own = backbone.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    config = ModelConfig(backbone="mobilenet_v2", pretrained=str(MOBILENET))
    model = build_model(config, num_classes=3)
    assert torch.equal(model.backbone.features[0][0].weight, state["features.0.0.weight"])


@pytest.mark.skipif(not MOBILENET.is_file(), reason=f"{MOBILENET} not found")
def test_weights_of_another_architecture_list_the_keys():
    with pytest.raises(ConfigError) as info:
        build_backbone("resnet18", pretrained=str(MOBILENET))
    message = str(info.value)
    assert "does not fit" in message and str(MOBILENET) in message
    assert "missing keys (" in message and "conv1.weight" in message
    assert "unexpected keys (" in message and "features.0.0.weight" in message


def test_missing_weights_file_and_classifier_keys_are_handled(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_backbone("osnet_x0_25", pretrained=str(tmp_path / "none.pth"))
    source = build_backbone("resnet18")
    state = {**source.state_dict(), "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
    torch.save({"state_dict": state}, tmp_path / "r18.pth")
    loaded = build_backbone("resnet18", pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    bad = dict(state)
    bad["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"shape mismatches \(1\): conv1\.weight"):
        build_backbone("resnet18", pretrained=str(tmp_path / "bad.pth"))
