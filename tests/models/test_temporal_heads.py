"""Temporal heads and ReidModel on tracklets (B, T, C, H, W): every backbone runs per frame, the
average head is the bnneck head on the mean of the per-frame pooled features, the attention head
equals a per-frame numpy loop of Gao and Nevatia's TA with its weights copied, and the wrong kind
of input is refused naming what to use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpc_reid.config import ModelConfig, load_config
from hpc_reid.models import (
    ReidModel,
    available_backbones,
    build_backbone,
    build_head,
    build_model,
    temporal,
)
from hpc_reid.models.temporal import TemporalAttentionHead

CLASSES = 5


def random_maps(seed: int, b: int = 3, t: int = 4, c: int = 8, h: int = 4, w: int = 2):
    """Non-negative per-frame maps (a backbone's ReLU output), float64, varying over frames."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, c, h, w, generator=g, dtype=torch.float64) * 2 + 0.01


def randomise_neck(head, seed: int) -> None:
    """Running statistics and a BN scale far from their initial values, so eval mode is tested."""
    g = torch.Generator().manual_seed(seed)
    bn = head.neck.bn
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 2 - 1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


def neck_reference(feat: np.ndarray, head, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """BNNeck (BN with a zero shift, then a bias-free classifier) written out in numpy."""
    bn = head.neck.bn
    if training:
        mean, var = feat.mean(axis=0), feat.var(axis=0)
    else:
        mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    scale, shift = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    normed = (feat - mean) / np.sqrt(var + bn.eps) * scale + shift
    return normed, normed @ head.neck.classifier.weight.detach().double().numpy().T


def frame_pooled(maps: np.ndarray, pooling: str, p: float) -> np.ndarray:
    """(B, T, C): each frame pooled on its own, a loop over frames (avg, or GeM's formula)."""
    b, t, c = maps.shape[:3]
    out = np.zeros((b, t, c))
    for i in range(b):
        for j in range(t):
            frame = maps[i, j]
            if pooling == "avg":
                out[i, j] = frame.mean(axis=(1, 2))
            else:
                out[i, j] = (np.maximum(frame, 1e-6) ** p).mean(axis=(1, 2)) ** (1 / p)
    return out


def check_outputs(out: dict, feat: np.ndarray, head, training: bool) -> None:
    bn, logits = neck_reference(feat, head, training)
    assert set(out) == ({"global", "bn", "logits"} if training else {"global", "bn"})
    np.testing.assert_allclose(out["global"].detach().numpy(), feat, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["bn"].detach().numpy(), bn, rtol=1e-7, atol=1e-8)
    if training:
        np.testing.assert_allclose(out["logits"].detach().numpy(), logits, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("backbone", available_backbones())
def test_every_backbone_gives_both_temporal_heads_one_row_per_tracklet(backbone):
    torch.manual_seed(0)
    trunk = build_backbone(backbone, last_stride=1)
    x = torch.randn(2, 3, 3, 64, 32)  # B = 2 tracklets of T = 3 frames
    with torch.no_grad():
        h, w = trunk.eval()(x[0, :1]).shape[2:]
    c = trunk.out_channels
    for name in ("temporal_avg", "temporal_attention"):
        if name == "temporal_avg":
            head = build_head(name, c, CLASSES, ModelConfig(backbone=backbone))
        else:
            head = TemporalAttentionHead(c, CLASSES, ModelConfig(), map_size=(h, w))
        model = ReidModel(trunk, head).train()
        with torch.no_grad():
            out = model(x)
            assert {k: tuple(v.shape) for k, v in out.items()} == {
                "global": (2, c),
                "bn": (2, c),
                "logits": (2, CLASSES),
            }
            assert model.feature_dim == c
            assert set(model.eval()(x)) == {"global", "bn"}


@pytest.mark.parametrize("pooling", ["avg", "gem"])
@pytest.mark.parametrize("training", [True, False])
def test_temporal_avg_is_the_bnneck_head_on_the_mean_of_per_frame_pooled_features(
    pooling, training
):
    torch.manual_seed(1)
    cfg = ModelConfig(pooling=pooling, gem_p=2.5)
    head = build_head("temporal_avg", 8, CLASSES, cfg).double().train(training)
    randomise_neck(head, 2)
    maps = random_maps(3)
    out = head(maps)
    pooled = frame_pooled(maps.numpy(), pooling, 2.5)
    check_outputs(out, pooled.sum(axis=1) / maps.shape[1], head, training)
    # the bnneck head's parameters, by name: the checkpoints of one load strictly into the other
    image_head = build_head("bnneck", 8, CLASSES, cfg).double()
    image_head.load_state_dict(head.state_dict(), strict=True)
    # a tracklet of one frame gives the image head's outputs for that frame
    single, image = head.eval()(maps[:, :1]), image_head.eval()(maps[:, 0])
    for key in ("global", "bn"):
        torch.testing.assert_close(single[key], image[key], rtol=1e-12, atol=1e-12)


def attention_reference(maps: np.ndarray, head) -> np.ndarray:
    """(B, T) attention of Gao and Nevatia's TA, one frame and one time step at a time: the
    spatial conv as a full contraction of each frame's map with each filter, ReLU, the temporal
    conv as a sum over the neighbours t-1, t, t+1 (zeros outside), ReLU, softmax over T."""
    conv_w = head.attention_conv.weight.detach().double().numpy()  # (D, C, h, w)
    conv_b = head.attention_conv.bias.detach().double().numpy()
    tconv_w = head.attention_tconv.weight.detach().double().numpy()  # (1, D, 3)
    tconv_b = head.attention_tconv.bias.detach().double().numpy()
    b, t = maps.shape[:2]
    weights = np.zeros((b, t))
    for i in range(b):
        spatial = [
            np.maximum(
                [(conv_w[d] * maps[i, j]).sum() + conv_b[d] for d in range(len(conv_b))], 0.0
            )
            for j in range(t)
        ]
        scores = []
        for j in range(t):
            s = tconv_b[0]
            for tap, neighbour in enumerate((j - 1, j, j + 1)):
                if 0 <= neighbour < t:
                    s += float(np.dot(tconv_w[0, :, tap], spatial[neighbour]))
            scores.append(max(s, 0.0))
        e = np.exp(np.array(scores) - max(scores))
        weights[i] = e / e.sum()
    return weights


def attention_head(seed: int, c: int = 8, dim: int = 6, map_size=(4, 2)) -> TemporalAttentionHead:
    """A head whose attention is far from uniform: weights scaled so few ReLUs are dead."""
    torch.manual_seed(seed)
    head = TemporalAttentionHead(c, CLASSES, ModelConfig(), map_size=map_size, attention_dim=dim)
    head = head.double()
    with torch.no_grad():
        head.attention_conv.weight.normal_(0.0, 2.0 / (c * map_size[0] * map_size[1]) ** 0.5)
        head.attention_conv.bias.fill_(0.1)
        head.attention_tconv.weight.normal_(0.0, 0.3)
        head.attention_tconv.bias.fill_(1.0)
    randomise_neck(head, seed + 1)
    return head


@pytest.mark.parametrize("training", [True, False])
def test_temporal_attention_equals_a_per_frame_loop_with_the_weights_copied(training):
    head = attention_head(11).train(training)
    maps = random_maps(5, b=3, t=5)
    weights = attention_reference(maps.numpy(), head)
    # T distinct weights per tracklet: no frame's score is a dead ReLU's, and a mean would fail
    assert all(len(set(row.round(6))) == 5 for row in weights), weights
    np.testing.assert_allclose(head.attention(maps).detach().numpy(), weights, rtol=1e-9)
    pooled = frame_pooled(maps.numpy(), "avg", 1.0)
    feat = np.einsum("bt,btc->bc", weights, pooled)
    check_outputs(head(maps), feat, head, training)


@pytest.mark.parametrize("t", [1, 2, 5])
def test_attention_weights_are_non_negative_and_sum_to_one_over_t(t):
    torch.manual_seed(6)
    head = TemporalAttentionHead(8, CLASSES, ModelConfig(), map_size=(4, 2)).double()
    weights = head.attention(random_maps(7, b=4, t=t))
    assert weights.shape == (4, t) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_training_gradients_reach_both_attention_convs():
    head = attention_head(8).train()
    maps = random_maps(9).requires_grad_()
    loss = F.cross_entropy(head(maps)["logits"], torch.arange(3) % CLASSES)
    loss.backward()
    for conv in (head.attention_conv, head.attention_tconv):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_the_attention_refuses_a_map_of_another_size_naming_both():
    head = TemporalAttentionHead(8, CLASSES, ModelConfig(), map_size=(4, 2))
    with pytest.raises(ValueError, match=r"map is 8x4 .* built for 4x2 .* set it to \[8, 4\]"):
        head(torch.rand(2, 3, 8, 8, 4))
    assert head.meta == {"head": "temporal_attention", "map_size": [4, 2], "attention_dim": 256}


@pytest.mark.parametrize(
    "backbone,last_stride,expected",
    [("osnet_x0_25", 1, [8, 4]), ("osnet_x0_25", 2, [8, 4]), ("resnet18", 2, [4, 2])],
)
def test_a_whole_config_sizes_the_attention_from_the_input_and_the_head_reads_its_keys(
    backbone, last_stride, expected
):
    from hpc_reid.config import Config

    config = Config.model_validate(
        {
            "data": {"height": 128, "width": 64},
            "model": {
                "backbone": backbone,
                "head": "temporal_attention",
                "last_stride": last_stride,
                "temporal": {"attention_dim": 16},
            },
        }
    )
    assert list(config.model.temporal.map_size) == expected
    model = build_model(config.model, CLASSES).eval()
    assert model.head.meta["map_size"] == expected and model.head.meta["attention_dim"] == 16
    assert model.head.attention_conv.weight.shape[:1] == (16,)
    with torch.no_grad():  # the backbone's map at this input is the size the head was built for
        assert model(torch.randn(1, 2, 3, 128, 64))["bn"].shape == (1, model.feature_dim)
    other = Config.model_validate(
        {"model": {"head": "temporal_attention", "temporal": {"map_size": [3, 3]}}}
    )
    assert list(other.model.temporal.map_size) == [3, 3]  # an explicit size is kept


def frames_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) whose every frame is NHWC in memory."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("head_name", ["temporal_avg", "temporal_attention"])
def test_the_model_on_tracklets_equals_the_backbone_run_one_frame_at_a_time(head_name, monkeypatch):
    monkeypatch.setattr(temporal, "MAP_SIZE", (4, 2))  # 64 x 32 at output stride 16
    torch.manual_seed(10)
    model = build_model(ModelConfig(backbone="osnet_x0_25", head=head_name), CLASSES).eval()
    randomise_neck(model.head, 11)
    x = torch.randn(2, 3, 3, 64, 32)
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(x)
        out_cl = model(frames_channels_last(x))
        hook.remove()
        maps = torch.stack(
            [torch.cat([model.backbone(x[i, j][None]) for j in range(3)]) for i in range(2)]
        )
        reference = model.head(maps)
    for key in ("global", "bn"):
        torch.testing.assert_close(out[key], reference[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out_cl[key], reference[key], rtol=1e-4, atol=1e-5)
    # the B x T frames went through as one batch, NHWC frames as NHWC (a view, not a copy)
    assert [tuple(s.shape) for s in seen] == [(6, 3, 64, 32)] * 2
    assert seen[0].is_contiguous() and seen[1].is_contiguous(memory_format=torch.channels_last)


def test_a_non_temporal_head_refuses_tracklets_naming_the_temporal_heads():
    model = build_model(ModelConfig(backbone="osnet_x0_25"), CLASSES)
    with pytest.raises(TypeError, match=r"GlobalHead head takes images .*temporal_avg"):
        model(torch.randn(2, 3, 3, 64, 32))
    model(torch.randn(2, 3, 64, 32))  # images still go through


def test_a_stage_reading_head_refuses_tracklets_as_image_only():
    model = build_model(ModelConfig(backbone="osnet_x0_25", head="san"), CLASSES)
    with pytest.raises(TypeError, match=r"SanHead head \(it reads the backbone's stages: image"):
        model(torch.randn(2, 3, 3, 64, 32))


def test_a_temporal_head_refuses_images_naming_the_clip_layout():
    model = build_model(ModelConfig(backbone="osnet_x0_25", head="temporal_avg"), CLASSES)
    with pytest.raises(TypeError, match=r"TemporalAvgHead head .*\(B, T, C, H, W\).*unsqueeze"):
        model(torch.randn(2, 3, 64, 32))


def test_the_temporal_heads_validate_as_model_head():
    for name in ("temporal_avg", "temporal_attention"):
        assert load_config(None, [f"model.head={name}"]).model.head == name
