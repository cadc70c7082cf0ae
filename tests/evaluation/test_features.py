import numpy as np
import pytest
import torch
from torch import nn

from hpc_reid.evaluation import extract_features


class TinyReid(nn.Module):
    """A linear embedding with a BNNeck, returning the dict every hpc_reid model returns."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3 * 4 * 6, 5)
        self.bn = nn.BatchNorm1d(5)
        # Non-trivial running statistics, so eval mode (which uses them) is visible in the output.
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, images):
        g = self.embed(images.flatten(1))
        return {"global": g, "bn": self.bn(g)}


class GlobalFeatureReid(TinyReid):
    def retrieval_feature(self, outputs):
        return outputs["global"]


def batches(as_dict):
    rng = np.random.default_rng(0)
    out = []
    for start, size in [(0, 3), (3, 1), (4, 4)]:
        images = torch.from_numpy(rng.normal(size=(size, 3, 4, 6)).astype(np.float32))
        pids = torch.arange(start, start + size) * 10
        camids = np.arange(start, start + size) % 2
        out.append(
            {"images": images, "pids": pids, "camids": camids, "paths": ["x"] * size}
            if as_dict
            else (images, pids, camids)
        )
    return out


def expected_features(model, loader, key, flip):
    images = torch.cat([b["images"] if isinstance(b, dict) else b[0] for b in loader])
    with torch.no_grad():
        g = images.flatten(1) @ model.embed.weight.T + model.embed.bias
        bn = model.bn
        f = g if key == "global" else (g - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        f = f * (1 if key == "global" else bn.weight) + (0 if key == "global" else bn.bias)
        if flip:
            flipped = images.flip(-1)
            g2 = flipped.flatten(1) @ model.embed.weight.T + model.embed.bias
            if key == "global":
                f = f + g2
            else:
                f = f + (g2 - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
                f = f + bn.bias
            f = f / 2  # the average of the image's and its flip's features
    return f


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "tuple"])
@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_extract_features_keeps_order_and_uses_eval_mode_bn_features(as_dict, flip):
    model, loader = TinyReid().train(), batches(as_dict)
    feats, pids, camids = extract_features(model, loader, "cpu", flip=flip)
    assert feats.dtype == torch.float32 and feats.device.type == "cpu" and feats.shape == (8, 5)
    np.testing.assert_array_equal(pids, np.arange(8) * 10)
    np.testing.assert_array_equal(camids, np.arange(8) % 2)
    torch.testing.assert_close(feats, expected_features(model, loader, "bn", flip))
    assert model.training, "the model's mode is restored"


def test_extract_features_prefers_the_models_retrieval_feature():
    model, loader = GlobalFeatureReid(), batches(True)
    feats, _, _ = extract_features(model, loader, "cpu", flip=True)
    torch.testing.assert_close(feats, expected_features(model, loader, "global", True))


def test_extract_features_rejects_batches_without_the_keys():
    with pytest.raises(KeyError, match="camids"):
        extract_features(TinyReid(), [{"images": torch.zeros(1, 3, 4, 6), "pids": [1]}], "cpu")


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_extract_features_keeps_the_features_on_the_models_device(flip):
    # "meta" stands in for a GPU: the features must come back where the model computed them (a
    # copy to the host, as before, fails on meta tensors), float32, one row per image in order.
    model, loader = TinyReid().to("meta"), batches(True)
    feats, pids, camids = extract_features(model, loader, "meta", flip=flip)
    assert feats.device.type == "meta" and feats.dtype == torch.float32 and feats.shape == (8, 5)
    np.testing.assert_array_equal(pids, np.arange(8) * 10)
    np.testing.assert_array_equal(camids, np.arange(8) % 2)
