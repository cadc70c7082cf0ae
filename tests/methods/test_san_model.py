"""SAN's model: SA-Dec's shapes on every backbone and its blocks against direct re-computations,
the released initialisation and parameter count, the baseline outputs untouched by the stage
plumbing, eval-mode outputs with and without ``decoding``, the fc512 embedding, and a training
step with the decoder's constant learning rate beside the encoder's warm-up."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.config import load_config
from hpc_reid.engine.optim import build_optimizer, build_scheduler
from hpc_reid.methods.san import SanHead, decoding
from hpc_reid.methods.san.decoder import SemanticsAlignedDecoder, Up
from hpc_reid.models import ReidModel, RetrievalPart, build_head, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50_ibn_a",
    "mobilenet_v2",
    "osnet_x1_0",
    "osnet_x0_25",
    "resnet101",
]
#: The released decoder's widths (main.py ConvResDecoder): reduced map, then up1..up4's outputs.
RELEASED = (512, 256, 64, 32, 16)
BLOCKS = ("decoder.1", "decoder.2", "decoder.3", "decoder.4")


def config(*overrides: str):
    return load_config(None, ["model.head=san", *overrides])


def san_model(backbone: str = "osnet_x0_25", *overrides: str, classes: int = 5) -> ReidModel:
    sets = [
        f"model.backbone={backbone}",
        "model.san.texture_size=[32,32]",
        "model.san.decoder_width=0.25",
        *overrides,
    ]
    return build_model(config(*sets).model, num_classes=classes)


@pytest.mark.parametrize("last_stride", [1, 2])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_decoder_blocks_double_the_last_map_and_the_texture_has_the_configured_size(
    backbone, last_stride
):
    torch.manual_seed(0)
    model = san_model(backbone, f"model.last_stride={last_stride}").train()
    x = torch.randn(2, 3, 64, 32)
    out = model(x)
    with torch.no_grad():
        h, w = model.backbone(x).shape[-2:]  # the decoder climbs from the last map
    widths = [round(c * 0.25) for c in RELEASED]
    for i, key in enumerate(BLOCKS, start=1):
        assert tuple(out[key].shape) == (2, widths[i], h * 2**i, w * 2**i), key
    assert tuple(out["texture"].shape) == (2, 3, 32, 32)
    assert set(out) == set(model.output_keys)


def test_resnet50_decoder_has_the_released_shapes_at_256x128():
    torch.manual_seed(0)
    model = build_model(config("model.backbone=resnet50").model, num_classes=3).train()
    out = model(torch.randn(2, 3, 256, 128))
    shapes = {k: tuple(out[k].shape[1:]) for k in (*BLOCKS, "texture")}
    assert shapes == {  # the comments of the released ConvResDecoder.forward
        "decoder.1": (256, 32, 16),
        "decoder.2": (64, 64, 32),
        "decoder.3": (32, 128, 64),
        "decoder.4": (16, 256, 128),
        "texture": (3, 256, 256),
    }


def _bn_train(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(
        1, -1, 1, 1
    )


def _bilinear_x2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 with half-pixel centres (align_corners=False), written out: output pixel o
    samples input coordinate (o + 0.5) / 2 - 0.5, clamped to the border."""

    def weights(n: int) -> torch.Tensor:
        m = torch.zeros(2 * n, n, dtype=x.dtype)
        for o in range(2 * n):
            src = min(max((o + 0.5) / 2 - 0.5, 0.0), n - 1)
            lo = math.floor(src)
            hi = min(lo + 1, n - 1)
            m[o, lo] += 1 - (src - lo)
            m[o, hi] += src - lo
        return m

    rows, cols = weights(x.shape[2]), weights(x.shape[3])
    return torch.einsum("oh,bchw,pw->bcop", rows, x, cols)


def test_up_block_is_residual_relu_then_bilinear_x2_reflection_pad_and_conv():
    torch.manual_seed(0)
    block = Up(6, 4).train()
    for bn in (block.res[1], block.res[4]):  # affine parameters away from the identity
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    block.up[2].bias.data.uniform_(-0.1, 0.1)
    x = torch.randn(3, 6, 5, 4)
    conv_a, bn_a, _, conv_b, bn_b = block.res
    with torch.no_grad():
        y = F.relu(_bn_train(F.conv2d(x, conv_a.weight, padding=1), bn_a))
        y = _bn_train(F.conv2d(y, conv_b.weight, padding=1), bn_b)
        y = _bilinear_x2(F.relu(x + y))
        y = F.pad(y, (1, 1, 1, 1), mode="reflect")
        expected = F.conv2d(y, block.up[2].weight, block.up[2].bias)
        got = block(x)
    assert got.shape == (3, 4, 10, 8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_skips_enter_before_up1_to_up3_resized_to_the_running_map():
    torch.manual_seed(0)
    decoder = SemanticsAlignedDecoder((5, 6, 7, 8), texture_size=(20, 12), width=0.05).train()
    # a last stride of 2 and an odd input: every skip differs from the running map it joins
    x1, x2, x3 = torch.randn(2, 5, 13, 7), torch.randn(2, 6, 7, 4), torch.randn(2, 7, 4, 2)
    last = torch.randn(2, 8, 2, 1)
    with torch.no_grad():
        texture, blocks = decoder([x1, x2, x3, last])

        def joined(running: torch.Tensor, embed: nn.Module, skip: torch.Tensor) -> torch.Tensor:
            e = embed(skip)
            size = running.shape[-2:]
            return running + F.interpolate(e, size=size, mode="bilinear", align_corners=False)

        d1 = decoder.blocks[0](joined(decoder.reduce(last), decoder.skips[0], x3))
        d2 = decoder.blocks[1](joined(d1, decoder.skips[1], x2))
        d3 = decoder.blocks[2](joined(d2, decoder.skips[2], x1))
        d4 = decoder.blocks[3](d3)
        conv = decoder.out[1]
        t = F.conv2d(F.pad(d4, (3, 3, 3, 3), mode="reflect"), conv.weight, conv.bias)
        t = F.interpolate(t, size=(20, 12), mode="bilinear", align_corners=True)
    for got, expected in zip(blocks, (d1, d2, d3, d4), strict=True):
        torch.testing.assert_close(got, expected)
    assert [tuple(b.shape[-2:]) for b in blocks] == [(4, 2), (8, 4), (16, 8), (32, 16)]
    torch.testing.assert_close(texture, t)


def test_decoder_parameters_and_initialisation_are_the_released_ones():
    torch.manual_seed(0)
    decoder = SemanticsAlignedDecoder((256, 512, 1024, 2048), texture_size=(256, 256))

    def embed(cin, cout):  # conv1x1 with bias, BN
        return cin * cout + cout + 2 * cout

    def up(cin, cout):  # two bias-free 3x3 convs and BNs at cin, then a 3x3 conv with bias
        return 2 * (9 * cin * cin + 2 * cin) + 9 * cin * cout + cout

    released = (
        embed(2048, 512)
        + embed(1024, 512)
        + embed(512, 256)
        + embed(256, 64)
        + up(512, 256)
        + up(256, 64)
        + up(64, 32)
        + up(32, 16)
        + 16 * 3 * 49
        + 3
    )
    assert sum(p.numel() for p in decoder.parameters()) == released
    # init_decoder_weights(xavier, gain 0.02): conv weights N(0, 0.02^2 * 2 / (fan_in + fan_out))
    reduce = decoder.reduce[0].weight  # 2048 -> 512: a million draws
    std = 0.02 * math.sqrt(2.0 / (2048 + 512))
    assert abs(reduce.std().item() / std - 1) < 0.01 and abs(reduce.mean().item()) < std / 100
    convs = [m for m in decoder.modules() if isinstance(m, nn.Conv2d)]
    assert all(not c.bias.any() for c in convs if c.bias is not None)
    scales = torch.cat([m.weight for m in decoder.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(scales.mean().item() - 1) < 0.002 and abs(scales.std().item() / 0.02 - 1) < 0.05
    assert not any(m.bias.any() for m in decoder.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("train", [True, False])
def test_baseline_outputs_are_bit_identical_with_and_without_the_stage_plumbing(train):
    x = torch.randn(4, 3, 64, 32)
    torch.manual_seed(3)
    baseline = build_model(load_config(None, ["model.backbone=osnet_x0_25"]).model, 5)
    torch.manual_seed(3)  # the SAN head builds its decoder after the baseline's layers
    san = san_model("osnet_x0_25")
    baseline.train(train)
    san.train(train)
    with torch.no_grad():
        base_out = baseline(x)
        direct = baseline.head(baseline.backbone(x))  # the path before stages existed
        san_out = san(x)
    assert set(base_out) == ({"global", "bn", "logits"} if train else {"global", "bn"})
    for key, value in base_out.items():
        assert torch.equal(value, direct[key]), key
        assert torch.equal(value, san_out[key]), key


def test_eval_mode_decodes_only_within_decoding_and_restores_the_switch():
    torch.manual_seed(0)
    model = san_model().eval()
    x = torch.randn(2, 3, 64, 32)
    wrapper = nn.Module()  # as DDP's .module or torch.compile's ._orig_mod hold the model
    wrapper.module = model
    with torch.no_grad():
        plain = model(x)
        with decoding(wrapper) as same:
            assert same is wrapper
            decoded = model(x)
        after = model(x)
        texture, blocks = model.head.decoder(model.backbone.forward_stages(x))
    assert set(plain) == set(after) == {"global", "bn"}
    assert set(decoded) == {"global", "bn", "texture", *BLOCKS}  # no logits out of training
    assert torch.equal(decoded["bn"], plain["bn"])
    torch.testing.assert_close(decoded["texture"], texture)  # the running statistics' decoder
    for key, block in zip(BLOCKS, blocks, strict=True):
        torch.testing.assert_close(decoded[key], block)
    with pytest.raises(RuntimeError, match="inside"), decoding(model):
        raise RuntimeError("inside")
    assert model.head.decoding is False
    baseline = build_model(load_config(None, ["model.backbone=osnet_x0_25"]).model, 5)
    with pytest.raises(ValueError, match=r"no SAN head \(model\.head: san\)"), decoding(baseline):
        pass


def test_embedding_dim_is_the_released_fc512_feature_classified_and_ranked():
    torch.manual_seed(0)
    model = san_model("osnet_x0_25", "model.san.embedding_dim=16", classes=7).eval()
    head = model.head
    assert model.feature_dim == 16 and head.neck is None
    assert model.retrieval_parts == {"global": RetrievalPart("bn")}
    linear, bn, _ = head.embedding
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        pooled = model.backbone(x).mean(dim=(2, 3))
        z = pooled @ linear.weight.T + linear.bias
        v = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        v = F.relu(v)
        out = model(x)
    assert out["global"] is out["bn"]  # one feature: the triplet's, the center loss's, ranked
    torch.testing.assert_close(model.retrieval_feature(out), v, rtol=1e-4, atol=1e-5)
    train_out = model.train()(x)
    expected = train_out["bn"] @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(train_out["logits"], expected)
    assert train_out["logits"].shape == (3, 7) and train_out["global"].shape == (3, 16)
    assert head.meta == {"head": "san", "decoder_width": 0.25, "embedding_dim": 16}


def test_a_backbone_without_stages_is_refused_naming_it():
    cfg = config("model.backbone=osnet_x0_25").model
    with pytest.raises(
        TypeError,
        match=r"model\.head='san' reads .*backbone='osnet_x0_25' has no `forward_stages`",
    ):
        build_head("san", 128, 5, cfg)
    head = build_head("san", 128, 5, cfg, stage_channels=(64, 96, 128, 128))
    assert isinstance(head, SanHead)
    with pytest.raises(TypeError, match="Conv2d has no forward_stages"):
        ReidModel(nn.Conv2d(3, 128, 1), head)


def test_one_training_step_trains_the_decoder_at_a_constant_rate_while_the_encoder_warms_up():
    cfg = config(
        "model.backbone=osnet_x0_25",
        "model.san.texture_size=[16,16]",
        "model.san.decoder_width=0.125",
        "optimizer.lr=1e-3",
        "optimizer.amsgrad=true",
        "optimizer.decoder_lr=1e-4",
        "optimizer.decoder_betas=[0.5,0.999]",
        "schedule.epochs=4",
        "schedule.milestones=[3]",
        "schedule.warmup_epochs=2",
        "schedule.warmup_factor=0.1",
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=4).train()
    optimizer = build_optimizer(model, cfg.optimizer, cfg.optimizer.lr)
    iters_per_epoch = 2
    scheduler = build_scheduler(optimizer, cfg.schedule, iters_per_epoch)
    assert all(g["amsgrad"] for g in optimizer.param_groups)
    groups = {g["name"]: g for g in optimizer.param_groups}
    decoder_params = {id(p) for p in model.head.decoder.parameters()}
    in_decoder_groups = {id(p) for n, g in groups.items() if "decoder" in n for p in g["params"]}
    assert in_decoder_groups == decoder_params
    assert groups["decoder_weights"]["betas"] == (0.5, 0.999)
    assert groups["weights"]["betas"] == (0.9, 0.999)

    g = torch.Generator().manual_seed(1)
    x, pids = torch.randn(8, 3, 64, 32, generator=g), torch.arange(4).repeat_interleave(2)
    target = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    # the reconstruction loss alone reaches the encoder, not the ID classifier
    F.l1_loss(model(x)["texture"], target).backward()
    assert model.backbone.conv1.conv.weight.grad.abs().sum() > 0
    assert model.head.neck.classifier.weight.grad is None
    optimizer.zero_grad(set_to_none=True)

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    warm_iters = 2 * iters_per_epoch
    for it in range(4):
        lr = {name: group["lr"] for name, group in groups.items()}
        warm = 0.1 + 0.9 * it / warm_iters  # BoT's linear warm-up, written out
        assert lr["weights"] == pytest.approx(1e-3 * warm, rel=1e-12), it
        assert lr["decoder_weights"] == lr["decoder_biases"] == 1e-4, it
        out = model(x)
        loss = F.cross_entropy(out["logits"], pids) + F.l1_loss(out["texture"], target)
        loss = loss + sum(out[k].pow(2).mean() for k in BLOCKS)  # the four blocks get gradients
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    # one backward reaches every trainable parameter, encoder and decoder
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert {f"head.decoder.{n}" for n, _ in model.head.decoder.named_parameters()} <= moved
    assert "backbone.conv1.conv.weight" in moved
