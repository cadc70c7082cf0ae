"""Non-local blocks in the ResNet trunks (``model.non_local``, CACE-Net's backbone): the block
against a per-position sum, the identity start, where the blocks sit, that they train, the
refusal of other trunks, ImageNet loading without them, and a checkpoint with them refused by a
model without."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from hpc_reid.config import ConfigError, ModelConfig
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.errors import CheckpointError
from hpc_reid.engine.trainer import train
from hpc_reid.models import build_backbone, build_model
from hpc_reid.models.resnet import NonLocalBlock, resnet50_ibn_a
from tests.tiny import tiny_config

# Residual blocks per stage (He et al. 2016, Table 1) and the channels of layer2..layer4.
ARCHITECTURES = {
    "resnet18": ((2, 2, 2, 2), (128, 256, 512)),
    "resnet34": ((3, 4, 6, 3), (128, 256, 512)),
    "resnet50": ((3, 4, 6, 3), (512, 1024, 2048)),
    "resnet101": ((3, 4, 23, 3), (512, 1024, 2048)),
    "resnet50_ibn_a": ((3, 4, 6, 3), (512, 1024, 2048)),
}
LAYERS = ("layer2", "layer3", "layer4")


def randomize_(block: NonLocalBlock, seed: int) -> NonLocalBlock:
    """Every parameter and BN statistic of ``block`` random, the output BN's scale included, so
    the block is no longer the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        block.out_bn.running_mean.copy_(torch.randn(block.out_bn.num_features, generator=gen))
        block.out_bn.running_var.copy_(torch.rand(block.out_bn.num_features, generator=gen) + 0.5)
    return block


def reference_non_local(x: np.ndarray, p: dict[str, np.ndarray], training: bool, eps: float):
    """Wang et al. 2018 Eq. 1-2 with the embedded Gaussian (Eq. 3), one position at a time:
    y_i = sum_j exp(theta_i . phi_j) g_j / sum_j exp(theta_i . phi_j), z_i = x_i + BN(W y_i)."""
    n, c, h, w = x.shape

    def conv(name: str, v: np.ndarray) -> np.ndarray:
        out = p[f"{name}.weight"][:, :, 0, 0] @ v
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    wy = np.zeros((n, c, h * w))
    for b in range(n):
        cols = [x[b, :, i // w, i % w] for i in range(h * w)]
        theta = [conv("theta", v) for v in cols]
        phi = [conv("phi", v) for v in cols]
        g = [conv("g", v) for v in cols]
        for i in range(h * w):
            logits = [float(theta[i] @ phi[j]) for j in range(h * w)]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            y = sum(wj * gj for wj, gj in zip(weights, g, strict=True)) / sum(weights)
            wy[b, :, i] = conv("out", y)
    if training:  # batch statistics over images and positions, biased variance
        mean, var = wy.mean(axis=(0, 2)), wy.var(axis=(0, 2))
    else:
        mean, var = p["out_bn.running_mean"], p["out_bn.running_var"]
    bn = (wy - mean[:, None]) / np.sqrt(var[:, None] + eps)
    bn = bn * p["out_bn.weight"][:, None] + p["out_bn.bias"][:, None]
    return x + bn.reshape(n, c, h, w)


@pytest.mark.parametrize("training", [False, True])
def test_block_equals_the_per_position_embedded_gaussian_sum(training):
    block = randomize_(NonLocalBlock(16, reduction=4), seed=0).double().train(training)
    assert block.theta.out_channels == 4  # channels // reduction
    x = torch.randn(2, 16, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = {k: v.numpy() for k, v in block.state_dict().items()}
    expected = reference_non_local(x.numpy(), p, training, block.out_bn.eps)
    with torch.no_grad():
        out = block(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def plain_keys(name: str) -> set[str]:
    net = resnet50_ibn_a() if name == "resnet50_ibn_a" else getattr(torchvision.models, name)()
    return {k for k in net.state_dict() if not k.startswith("fc.")}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_zero_init_blocks_leave_every_stage_map_and_trunk_weight_as_without_them(name):
    torch.manual_seed(0)
    plain = build_backbone(name)
    torch.manual_seed(0)
    with_blocks = build_backbone(name, non_local=True)
    plain_state, state = plain.state_dict(), with_blocks.state_dict()
    assert set(plain_state) == plain_keys(name)  # no key changes while off: old files load
    added = set(state) - set(plain_state)
    assert (
        set(plain_state) <= set(state) and added and all(k.startswith("non_local.") for k in added)
    )
    for key, value in plain_state.items():  # the blocks are built after the trunk's weights
        assert torch.equal(state[key], value), key
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(2))
    for training in (True, False):
        with torch.no_grad():
            ours = with_blocks.train(training).forward_stages(x)
            theirs = plain.train(training).forward_stages(x)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_blocks_run_right_after_the_second_to_last_block_of_layers_2_3_and_4(name):
    """Call order and data flow, seen by hooks: block i-1 of layerK -> its non-local block ->
    block i (i = blocks - 1), with inter channels C/16 as CACE-Net's releases."""
    blocks_per_stage, channels = ARCHITECTURES[name]
    trunk = build_backbone(name, non_local=True).eval()
    non_local = [m for m in trunk.modules() if isinstance(m, NonLocalBlock)]
    assert len(non_local) == 3
    for k, block in enumerate(non_local):
        randomize_(block, seed=k)  # not the identity, so the data flow below is telling
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    named = [(f"{layer}.{i}", m) for layer in LAYERS for i, m in enumerate(getattr(trunk, layer))]
    named += [(f"non_local.{layer}", trunk.non_local[layer]) for layer in LAYERS]
    hooks = [
        m.register_forward_hook(lambda m, i, o, tag=tag: calls.append((tag, i[0], o)))
        for tag, m in named
    ]
    with torch.no_grad():
        stages = trunk.forward_stages(torch.randn(1, 3, 64, 32))
    for h in hooks:
        h.remove()
    order = [tag for tag, _, _ in calls]
    for k, layer in enumerate(LAYERS):
        n = blocks_per_stage[k + 1]
        expected = [f"{layer}.{i}" for i in range(n - 1)] + [
            f"non_local.{layer}",
            f"{layer}.{n - 1}",
        ]
        start = order.index(f"{layer}.0")
        assert order[start : start + n + 1] == expected
        at = start + n - 1  # the non-local call
        assert torch.equal(calls[at][1], calls[at - 1][2])  # it takes block n-2's output
        assert torch.equal(calls[at + 1][1], calls[at][2])  # and feeds block n-1
        assert torch.equal(stages[k + 1], calls[at + 1][2])  # the stage map includes its effect
        block = trunk.non_local[layer]
        assert (block.theta.in_channels, block.theta.out_channels) == (
            channels[k],
            channels[k] // 16,
        )
    assert len(order) == len(named)  # each block once
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), trunk.forward_stages(x)[-1], rtol=0, atol=0)


def test_blocks_leave_the_identity_after_one_step_and_all_their_weights_train():
    """Only the output BN is zeroed: step 1 moves its scale and shift, step 2 then reaches the
    convs (zeroing the output conv too would leave the block dead at the identity forever)."""
    torch.manual_seed(0)
    trunk = build_backbone("resnet18", non_local=True).train()
    blocks = [trunk.non_local[layer] for layer in LAYERS]
    start = {k: v.clone() for k, v in trunk.non_local.named_parameters()}
    residuals: list[float] = []
    hooks = [
        b.register_forward_hook(
            lambda m, i, o: residuals.append(float((o - i[0]).detach().abs().max()))
        )
        for b in blocks
    ]
    gen = torch.Generator().manual_seed(3)
    x, target = torch.randn(4, 3, 64, 32, generator=gen), torch.randn(4, 512, 4, 2, generator=gen)
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.1)
    seen = []
    for _ in range(2):
        residuals.clear()
        loss = ((trunk(x) - target) ** 2).mean()
        seen.append(list(residuals))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for h in hooks:
        h.remove()
    assert seen[0] == [0.0, 0.0, 0.0]  # the identity at the start
    assert all(r > 0 for r in seen[1])  # one step later every block adds something
    for key, value in trunk.non_local.named_parameters():  # two steps: every weight has moved
        if key.endswith("weight"):  # (phi's and g's biases are constant shifts that the
            assert not torch.equal(value, start[key]), key  # softmax and the BN cancel)


@pytest.mark.parametrize("name", ["mobilenet_v2", "osnet_x0_25"])
def test_non_local_is_refused_for_a_trunk_without_resnet_layers(name):
    with pytest.raises(ConfigError, match=rf"model.non_local=true: backbone '{name}'"):
        build_backbone(name, non_local=True)
    with pytest.raises(ConfigError, match=rf"backbone '{name}'"):
        build_model(ModelConfig(backbone=name, non_local=True), num_classes=5)


def imagenet_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet-18 ImageNet-style state dict: the trunk's keys and the 1000-way ``fc``."""
    torch.manual_seed(5)
    state = build_backbone("resnet18").state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    return path, state


def test_imagenet_weights_load_with_the_blocks_absent_in_one_quiet_log_line(tmp_path, caplog):
    path, state = imagenet_file(tmp_path)
    torch.manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="hpc_reid.models.backbones"):
            trunk = build_backbone("resnet18", pretrained=path, non_local=True)
    for key, value in trunk.state_dict().items():
        if not key.startswith("non_local."):
            assert torch.equal(value, state[key]), key
    for layer in LAYERS:  # the blocks keep their identity start
        assert not trunk.non_local[layer].out_bn.weight.any()
    n_block_keys = sum(
        1 for k in trunk.state_dict() if k.startswith("non_local.") and "num_batches" not in k
    )
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(records) == 1 and records[0][0] == logging.INFO
    assert f"has no weights for the {n_block_keys} keys under non_local." in records[0][1]
    assert str(path) in records[0][1]


def test_a_trunk_key_missing_beside_the_blocks_is_still_refused(tmp_path):
    path, state = imagenet_file(tmp_path)
    del state["layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"missing keys \(1\): layer1.0.conv1.weight$"):
        build_backbone("resnet18", pretrained=path, non_local=True)


def test_a_file_holding_the_blocks_loads_them_without_a_log_line(tmp_path, caplog):
    source = build_backbone("resnet18", non_local=True)
    randomize_(source.non_local["layer3"], seed=7)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.INFO, logger="hpc_reid.models.backbones"):
        loaded = build_backbone("resnet18", pretrained=tmp_path / "w.pth", non_local=True)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not caplog.records


def test_bnneck_with_blocks_trains_and_its_checkpoint_refuses_a_model_without_them(tmp_path):
    sets = ["model.backbone=resnet18", "evaluation.at_start=false", "logging.run_name=nl"]
    config = tiny_config(tmp_path, "configs/synthetic/bot.yaml", *sets, "model.non_local=true")
    train(config, max_steps=1)
    saved = load_checkpoint(CheckpointManager(tmp_path / "runs/nl").latest())
    assert saved["model_meta"]["non_local"] is True
    weights = saved["strategy"]["model"]
    for layer in LAYERS:  # one step moved the output BN off zero: the blocks are in the model
        assert weights[f"backbone.non_local.{layer}.out_bn.weight"].abs().sum() > 0
    without = tiny_config(tmp_path, "configs/synthetic/bot.yaml", *sets)
    with pytest.raises(CheckpointError, match=r"non_local: checkpoint True, this run None"):
        train(without, resume="auto", max_steps=2)
