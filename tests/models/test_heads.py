"""GeM pooling against average/max pooling references, and the BNNeck's frozen shift."""

from __future__ import annotations

import torch

from hpc_reid.models.heads import AvgPool, BNNeck, GeM


def test_gem_with_p_one_is_average_pooling():
    torch.manual_seed(0)
    x = torch.rand(3, 5, 4, 6) + 0.01
    reference = x.sum(dim=(2, 3)) / (4 * 6)
    torch.testing.assert_close(GeM(p=1.0)(x), reference)
    torch.testing.assert_close(AvgPool()(x), reference)


def test_gem_with_large_p_approaches_max_pooling():
    torch.manual_seed(0)
    x = torch.rand(3, 5, 4, 6) + 0.1
    maximum = x.flatten(2).max(dim=2).values
    # (mean x^p)^(1/p) >= max * (1/hw)^(1/p): within 1/24^(1/100) ~ 3% of the max at p = 100
    gem = GeM(p=100.0)(x)
    assert (gem <= maximum * (1 + 1e-5)).all()
    assert (gem >= maximum * (1 / 24) ** (1 / 100) * (1 - 1e-5)).all()
    errors = [(GeM(p=p)(x) - maximum).abs().max().item() for p in (3.0, 10.0, 30.0, 100.0)]
    assert errors == sorted(errors, reverse=True)


def test_gem_matches_the_generalised_mean_and_learns_p():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 5)
    x[0, 0] = 0.0  # ReLU zeros are clamped at eps, keeping the gradient finite
    gem = GeM(p=3.0, eps=1e-6)
    out = gem(x)
    reference = (x.clamp(min=1e-6) ** 3).flatten(2).mean(dim=2) ** (1 / 3)
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad)


def test_gem_keeps_half_precision_inputs_from_overflowing():
    x = torch.full((1, 2, 3, 3), 100.0, dtype=torch.float16)  # 100^3 > fp16's max 65504
    out = GeM(p=3.0)(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.full((1, 2), 100.0), rtol=1e-3, atol=0)


def test_bnneck_shift_is_frozen_at_zero_and_the_classifier_has_no_bias():
    torch.manual_seed(0)
    neck = BNNeck(16, 5).train()
    assert not neck.bn.bias.requires_grad and neck.classifier.bias is None
    assert torch.equal(neck.bn.weight, torch.ones(16))
    assert torch.equal(neck.bn.bias, torch.zeros(16))
    assert abs(neck.classifier.weight.std().item() - 0.001) < 0.0003
    optimizer = torch.optim.SGD(neck.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        feat = torch.randn(8, 16) * 4 + 2
        loss = torch.nn.functional.cross_entropy(neck.classifier(neck(feat)), torch.arange(8) % 5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(neck.bn.bias, torch.zeros(16))
    assert not torch.equal(neck.bn.weight, torch.ones(16))  # the scale does learn


def test_bnneck_feature_is_the_batch_normalised_input():
    torch.manual_seed(0)
    feat = torch.randn(6, 4) * 3 + 1
    bn = BNNeck(4, 2).train()(feat)
    reference = (feat - feat.mean(0)) / torch.sqrt(feat.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(bn, reference, rtol=1e-4, atol=1e-5)
