"""ReidModel: outputs per mode and neck, pooling choice, and that it can fit a small batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpc_reid.config import ModelConfig
from hpc_reid.models import ReidModel, build_model
from hpc_reid.models.heads import AvgPool, GeM


@pytest.fixture(scope="module")
def bnneck_model() -> ReidModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="osnet_x0_25"), num_classes=7)


def test_training_mode_returns_global_bn_and_logits(bnneck_model):
    x = torch.randn(4, 3, 64, 32)
    out = bnneck_model.train()(x)
    assert set(out) == {"global", "bn", "logits"}
    assert bnneck_model.feature_dim == 128
    assert out["global"].shape == out["bn"].shape == (4, 128)
    assert out["logits"].shape == (4, 7)
    pooled = bnneck_model.backbone(x).mean(dim=(2, 3))  # average pooling by default
    torch.testing.assert_close(out["global"], pooled, rtol=1e-4, atol=1e-5)
    normalised = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out["bn"], normalised, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out["logits"], out["bn"] @ bnneck_model.neck.classifier.weight.T)


def test_eval_mode_returns_features_only_and_retrieves_the_bn_feature(bnneck_model):
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        out = bnneck_model.eval()(x)
    assert set(out) == {"global", "bn"}
    assert not torch.equal(out["bn"], out["global"])  # BN on running statistics
    assert torch.equal(bnneck_model.retrieval_feature(out), out["bn"])
    assert not bnneck_model.neck.bn.bias.requires_grad


def test_without_a_neck_bn_is_the_pooled_feature_and_the_classifier_has_a_bias():
    model = build_model(ModelConfig(backbone="osnet_x0_25", neck="none"), num_classes=3).train()
    out = model(torch.randn(2, 3, 64, 32))
    assert torch.equal(out["bn"], out["global"]) and out["logits"].shape == (2, 3)
    assert model.neck is None and model.classifier.bias is not None
    assert torch.equal(model.retrieval_feature(out), out["global"])


def test_pooling_follows_the_config():
    gem = build_model(ModelConfig(backbone="osnet_x0_25", pooling="gem", gem_p=4.0), 3)
    assert isinstance(gem.pool, GeM) and gem.pool.p.item() == 4.0 and gem.pool.p.requires_grad
    avg = build_model(ModelConfig(backbone="osnet_x0_25"), 3)
    assert isinstance(avg.pool, AvgPool)


def test_model_fits_a_small_batch_within_30_sgd_steps():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="osnet_x0_25"), num_classes=4).train()
    x, y = torch.randn(8, 3, 64, 32), torch.arange(4).repeat(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x)["logits"], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
