"""Loading local ImageNet weights: the real MobileNetV2 checkpoint; errors that list the keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpc_reid.config import ConfigError, ModelConfig
from hpc_reid.models import build_backbone, build_model, load_pretrained
from tests.shared_data import require_shared_data


@pytest.fixture
def mobilenet() -> Path:
    """The real ImageNet MobileNetV2 weights in ../shared/data (a failure under CI if missing)."""
    return require_shared_data("weights/mobilenet_v2_imagenet_features.pth")


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_backbone("resnet18").state_dict()


def test_real_imagenet_mobilenet_v2_loads_exactly(mobilenet):
    state = torch.load(mobilenet, map_location="cpu", weights_only=True)
    fresh = build_backbone("mobilenet_v2").state_dict()
    assert not torch.equal(fresh["features.0.0.weight"], state["features.0.0.weight"])
    model = build_model(ModelConfig(backbone="mobilenet_v2", pretrained=str(mobilenet)), 3)
    own = model.backbone.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    # a sanity check of real ImageNet statistics: BN running variances are not the initial ones
    assert not torch.equal(own["features.18.1.running_var"], torch.ones(1280))


def test_mobilenet_weights_into_resnet50_list_missing_and_unexpected_keys(mobilenet):
    with pytest.raises(ValueError) as info:
        build_backbone("resnet50", pretrained=mobilenet)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert f"{mobilenet} does not fit backbone 'resnet50'" in message
    own, state = build_backbone("resnet50").state_dict(), torch.load(mobilenet, weights_only=True)
    n_missing = sum(not k.endswith("num_batches_tracked") for k in own)  # no key is shared
    assert f"missing keys ({n_missing}): conv1.weight, bn1.weight" in message
    assert f"unexpected keys ({len(state)}): features.0.0.weight" in message
    assert f"(+{n_missing - 10} more)" in message and f"(+{len(state) - 10} more)" in message
    assert "shape mismatches" not in message


def test_checkpoint_dicts_module_prefix_and_the_classifier_are_accepted(tmp_path, resnet18_state):
    head = {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    prefixed = {f"module.{k}": v for k, v in {**resnet18_state, **head}.items()}
    torch.save({"epoch": 3, "state_dict": prefixed}, tmp_path / "ddp.pth")
    torch.save({"model": {**resnet18_state, **head}}, tmp_path / "model.pth")
    for name in ("ddp.pth", "model.pth"):
        target = build_backbone("resnet18")
        load_pretrained(target, tmp_path / name)
        for key, value in target.state_dict().items():
            assert torch.equal(value, resnet18_state[key]), (name, key)


def test_checkpoints_without_batchnorm_counters_load(tmp_path, resnet18_state):
    old = {k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    target = build_backbone("resnet18")
    load_pretrained(target, tmp_path / "old.pth")
    torch.testing.assert_close(target.conv1.weight, resnet18_state["conv1.weight"])


def test_shape_mismatch_and_missing_keys_are_listed(tmp_path, resnet18_state):
    bad = dict(resnet18_state)
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del bad["layer4.1.bn2.weight"]
    bad["layer5.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    target = build_backbone("resnet18")
    before = target.conv1.weight.detach().clone()
    with pytest.raises(ConfigError) as info:
        load_pretrained(target, tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing keys (1): layer4.1.bn2.weight" in message
    assert "unexpected keys (1): layer5.weight" in message
    assert "shape mismatches (1): conv1.weight (64, 3, 3, 3) in file vs (64, 3, 7, 7)" in message
    assert torch.equal(target.conv1.weight, before)  # nothing was half-loaded


def test_unreadable_or_missing_files_are_named(tmp_path):
    target = build_backbone("osnet_x0_25")
    with pytest.raises(ConfigError, match=r"weights file .*none\.pth not found"):
        load_pretrained(target, tmp_path / "none.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot read .*garbage\.pth as a state dict"):
        load_pretrained(target, tmp_path / "garbage.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(ConfigError, match=r"list\.pth is not a state dict: 1 entries"):
        load_pretrained(target, tmp_path / "list.pth")
