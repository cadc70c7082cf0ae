"""AlignedReID's head: stripe features against a direct computation of band pooling, 1x1 conv, BN
and ReLU; its declared outputs and retrieval parts; clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpc_reid.config import load_config
from hpc_reid.models import build_model


def aligned(*overrides: str):
    sets = ["model.backbone=osnet_x0_25", "model.head=aligned", *overrides]
    return build_model(load_config(None, sets).model, num_classes=5)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_stripes_are_bands_of_rows_pooled_then_conv_bn_relu(pooling):
    torch.manual_seed(0)
    model = aligned("model.local.stripes=4", f"model.local.pooling={pooling}").eval()
    head = model.head
    head.local_bn.running_mean.uniform_(-0.5, 0.5)
    head.local_bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 128, 64)
    with torch.no_grad():
        fmap = model.backbone(x)  # (3, 128, 8, 4): 2 rows per stripe
        out = model(x)
        rows = fmap.shape[2] // 4
        expected = []
        for s in range(4):
            band = fmap[:, :, s * rows : (s + 1) * rows, :].flatten(2)  # (B, C, rows * w)
            pooled = band.mean(2) if pooling == "avg" else band.amax(2)
            conv = pooled @ head.local_conv.weight[:, :, 0, 0].T + head.local_conv.bias
            bn = head.local_bn
            normed = (conv - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
            expected.append(F.relu(normed * bn.weight + bn.bias))
        expected = torch.stack(expected, dim=1)
    assert out["local"].shape == (3, 4, 128)
    torch.testing.assert_close(out["local"], expected, rtol=1e-4, atol=1e-5)


def test_normalised_stripes_have_unit_norm_and_the_head_declares_local():
    model = aligned("model.local.stripes=8", "model.local.dim=16", "model.local.normalize=true")
    out = model.train()(torch.randn(4, 3, 128, 64))
    assert set(out) == {"global", "bn", "logits", "local"} == set(model.output_keys)
    torch.testing.assert_close(out["local"].norm(dim=2), torch.ones(4, 8))
    parts = model.retrieval_parts
    assert list(parts) == ["global", "local"]
    assert (parts["local"].key, parts["local"].distance) == ("local", "dmli")
    assert model.head.meta == {"head": "aligned", "stripes": 8, "local_dim": 16}


def test_more_stripes_than_rows_is_refused_naming_the_key():
    model = aligned("model.local.stripes=9")
    with pytest.raises(ValueError, match=r"model\.local\.stripes=9: .* only 8 rows"):
        model(torch.randn(2, 3, 128, 64))
