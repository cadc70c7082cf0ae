"""ReidModel: outputs per mode and neck, pooling choice, that it can fit a small batch, and the
inferring() context (eval mode, no autograd, mode restored)."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F

from hpc_reid.config import ConfigError, ModelConfig, load_config
from hpc_reid.evaluation.features import extract_features
from hpc_reid.models import ReidModel, build_model, inferring, register_head
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
    classifier = bnneck_model.head.neck.classifier
    torch.testing.assert_close(out["logits"], out["bn"] @ classifier.weight.T)


def test_eval_mode_returns_features_only_and_retrieves_the_bn_feature(bnneck_model):
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        out = bnneck_model.eval()(x)
    assert set(out) == {"global", "bn"}
    assert not torch.equal(out["bn"], out["global"])  # BN on running statistics
    assert torch.equal(bnneck_model.retrieval_feature(out), out["bn"])
    assert not bnneck_model.head.neck.bn.bias.requires_grad


def test_without_a_neck_bn_is_the_pooled_feature_and_the_classifier_has_a_bias():
    model = build_model(ModelConfig(backbone="osnet_x0_25", neck="none"), num_classes=3).train()
    out = model(torch.randn(2, 3, 64, 32))
    assert torch.equal(out["bn"], out["global"]) and out["logits"].shape == (2, 3)
    assert model.head.neck is None and model.head.classifier.bias is not None
    assert torch.equal(model.retrieval_feature(out), out["global"])


@pytest.mark.parametrize("neck", ["bnneck", "none"])
@pytest.mark.parametrize("key", ["bn", "global"])
def test_retrieval_feature_is_the_output_the_config_names(neck, key):
    torch.manual_seed(1)
    model = build_model(ModelConfig(backbone="osnet_x0_25", neck=neck, retrieval_feature=key), 5)
    if model.head.neck is not None:  # running statistics of a trained neck, far from identity
        model.head.neck.bn.running_mean.uniform_(-1.0, 1.0)
        model.head.neck.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        out = model.eval()(x)
        pooled = model.head.pool(model.backbone(x))  # the references, computed here
    assert torch.equal(model.retrieval_feature(out), out[key])
    if key == "global" or neck == "none":  # without a neck both keys name the pooled feature
        expected = pooled
    else:
        bn = model.head.neck.bn
        expected = (pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        expected = expected * bn.weight + bn.bias
    torch.testing.assert_close(model.retrieval_feature(out), expected, rtol=1e-4, atol=1e-5)


def test_extraction_ranks_with_the_configured_feature_of_the_same_weights():
    torch.manual_seed(2)
    bn = build_model(ModelConfig(backbone="osnet_x0_25"), 5)
    # else the BN feature is the pooled one / 1.000005
    bn.head.neck.bn.running_mean.uniform_(-1.0, 1.0)
    pooled = build_model(ModelConfig(backbone="osnet_x0_25", retrieval_feature="global"), 5)
    # a test-time choice: the weights of one load strictly into the other
    pooled.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(6, 3, 64, 32)
    batches = [(x[:4], torch.arange(4), torch.zeros(4)), (x[4:], torch.arange(2), torch.ones(2))]
    with torch.no_grad():
        reference = bn.eval()(x)
    for model, key in ((bn, "bn"), (pooled, "global")):
        feats, _, _ = extract_features(model, batches, "cpu")
        torch.testing.assert_close(feats, reference[key], rtol=1e-4, atol=1e-5)


def test_an_unknown_retrieval_feature_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.retrieval_feature: .*'bn' or 'global'"):
        load_config(None, ["model.retrieval_feature=logits"])
    cfg = ModelConfig(backbone="osnet_x0_25").model_copy(update={"retrieval_feature": "logits"})
    with pytest.raises(ValueError, match=r"model\.retrieval_feature: 'logits' is not an output"):
        build_model(cfg, 3)


def test_pooling_follows_the_config():
    gem = build_model(ModelConfig(backbone="osnet_x0_25", pooling="gem", gem_p=4.0), 3)
    pool = gem.head.pool
    assert isinstance(pool, GeM) and pool.p.item() == 4.0 and pool.p.requires_grad
    avg = build_model(ModelConfig(backbone="osnet_x0_25"), 3)
    assert isinstance(avg.head.pool, AvgPool)


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


def test_the_baseline_head_declares_its_outputs_and_its_one_retrieval_part(bnneck_model):
    assert bnneck_model.output_keys == {"global", "bn", "logits"}
    (name, part), *rest = bnneck_model.retrieval_parts.items()
    assert not rest and name == "global" and (part.key, part.distance) == ("bn", "metric")


def test_a_registered_head_is_built_by_name_and_an_unknown_one_is_refused_naming_it():
    class Stripes(torch.nn.Module):
        output_keys = frozenset({"global", "stripes"})
        retrieval_parts: typing.ClassVar[dict] = {}

        def __init__(self, channels, num_classes, cfg):
            super().__init__()
            self.feature_dim = channels

        def forward(self, fmap):
            return {"global": fmap.mean(dim=(2, 3)), "stripes": fmap.mean(dim=3)}

    register_head("test_stripes")(Stripes)
    cfg = load_config(None, ["model.backbone=osnet_x0_25", "model.head=test_stripes"]).model
    model = build_model(cfg, 3)
    out = model(torch.randn(2, 3, 64, 32))
    assert out["stripes"].shape == (2, 128, 4) and model.output_keys == {"global", "stripes"}
    with pytest.raises(ValueError, match="already registered"):
        register_head("test_stripes")(Stripes)
    with pytest.raises(ConfigError, match=r"model\.head: unknown head 'bneck' \(did you mean"):
        load_config(None, ["model.head=bneck"])


def test_a_checkpoint_from_before_named_heads_loads_into_the_bnneck_head():
    torch.manual_seed(3)
    model = build_model(ModelConfig(backbone="osnet_x0_25"), 4)
    old = {
        (k.removeprefix("head.") if k.startswith("head.") else k): v
        for k, v in model.state_dict().items()
    }
    assert "neck.bn.weight" in old and "pool.p" not in old  # the layout of those checkpoints
    fresh = build_model(ModelConfig(backbone="osnet_x0_25"), 4)
    fresh.load_state_dict(old, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_inferring_runs_in_eval_mode_without_autograd_and_restores_the_mode():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    for mode in (True, False):
        model.train(mode)
        with inferring(model) as same:
            assert same is model and not model.training
            assert all(not m.training for m in model.modules())
            y = model(torch.ones(4, 3))
            assert torch.is_inference_mode_enabled() and not y.requires_grad
            torch.testing.assert_close(y, model[0](torch.ones(4, 3)))  # dropout off
        assert model.training is mode and all(m.training is mode for m in model.modules())
        assert not torch.is_inference_mode_enabled()


def test_inferring_restores_training_mode_when_the_block_raises():
    model = torch.nn.Linear(3, 2).train()
    with pytest.raises(RuntimeError, match="boom"), inferring(model):
        raise RuntimeError("boom")
    assert model.training and not torch.is_inference_mode_enabled()
