from __future__ import annotations

import pytest
import torch

from hpc_reid.config import LossConfig
from hpc_reid.losses import (
    ReidLoss,
    batch_hard_triplet_loss,
    label_smoothing_cross_entropy,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pids = torch.arange(4).repeat_interleave(4)
    outputs = {
        "global": torch.randn(16, 8, generator=g),
        "logits": torch.randn(16, 4, generator=g),
    }
    return outputs, pids


def test_reid_loss_is_the_weighted_sum_of_independently_computed_parts():
    cfg = LossConfig.model_validate(
        {
            "ce": {"weight": 0.7, "label_smoothing": 0.2},
            "triplet": {"weight": 1.3, "margin": None},
            "center": {"weight": 0.01},
        }
    )
    torch.manual_seed(5)
    loss = ReidLoss(cfg, num_classes=4, feat_dim=8)
    outputs, pids = _batch()
    total, parts = loss(outputs, pids)
    ce = label_smoothing_cross_entropy(outputs["logits"], pids, 0.2)
    tri = batch_hard_triplet_loss(outputs["global"], pids, None)
    centers = loss.center.centers.detach()
    center = ((outputs["global"] - centers[pids]) ** 2).sum(1).mean()
    assert set(parts) == {"ce", "triplet", "center"}
    assert all(not v.requires_grad for v in parts.values())
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["triplet"], tri)
    torch.testing.assert_close(parts["center"], center)
    torch.testing.assert_close(total, 0.7 * ce + 1.3 * tri + 0.01 * center)
    assert total.requires_grad


def test_zero_weight_losses_are_not_built_nor_computed():
    cfg = LossConfig.model_validate({"ce": {"weight": 0}, "center": {"weight": 0}})
    loss = ReidLoss(cfg, num_classes=4, feat_dim=8)
    outputs, pids = _batch()
    del outputs["logits"]  # not needed when the CE weight is 0
    total, parts = loss(outputs, pids)
    assert loss.center is None and list(loss.parameters()) == []
    assert set(parts) == {"triplet"}
    torch.testing.assert_close(total, batch_hard_triplet_loss(outputs["global"], pids, 0.3))


def test_reid_loss_names_a_missing_model_output_and_refuses_all_zero_weights():
    loss = ReidLoss(LossConfig(), num_classes=4, feat_dim=8)
    outputs, pids = _batch()
    with pytest.raises(KeyError, match="logits"):
        loss({"global": outputs["global"]}, pids)
    zero = {"ce": {"weight": 0}, "triplet": {"weight": 0}, "center": {"weight": 0}}
    with pytest.raises(ValueError, match="every loss weight is 0"):
        ReidLoss(LossConfig.model_validate(zero), num_classes=4, feat_dim=8)


def test_cross_rank_flag_without_torch_distributed_is_the_local_triplet():
    cfg = LossConfig.model_validate({"triplet": {"cross_rank": True}, "center": {"weight": 0}})
    outputs, pids = _batch(1)
    _, parts = ReidLoss(cfg, 4, 8)(outputs, pids)
    torch.testing.assert_close(
        parts["triplet"], batch_hard_triplet_loss(outputs["global"], pids, 0.3)
    )


def test_a_term_reading_an_output_the_model_lacks_is_a_config_error_naming_both():
    from hpc_reid.config import ConfigError

    cfg = LossConfig.model_validate({"local_triplet": {"weight": 1.0}})
    keys = frozenset({"global", "bn", "logits"})
    with pytest.raises(ConfigError) as err:
        ReidLoss(cfg, num_classes=4, feat_dim=8, output_keys=keys, head="bnneck")
    assert str(err.value) == (
        "loss.local_triplet reads the model output 'local', which model.head 'bnneck' does not "
        "produce (it produces: bn, global, logits)"
    )
    ReidLoss(cfg, num_classes=4, feat_dim=8, output_keys=keys | {"local"})  # a head with stripes


def test_registered_terms_are_built_from_their_sections_and_summed_with_their_weights():
    from hpc_reid.losses import available_losses, register_loss

    assert {"ce", "triplet", "center", "local_triplet"} <= set(available_losses())
    with pytest.raises(ValueError, match="'ce' is already registered"):
        register_loss("ce", inputs=("logits",))(lambda section, n, d: None)
    outputs, pids = _batch(3)
    cfg = LossConfig.model_validate({"ce": {"weight": 0.5}, "triplet": {"weight": 0.0}})
    loss = ReidLoss(cfg, 4, 8, output_keys=frozenset(outputs))
    total, parts = loss(outputs, pids)
    assert set(parts) == {"ce", "center"} and loss.center is not None
    expected = (
        0.5 * label_smoothing_cross_entropy(outputs["logits"], pids, 0.1) + 5e-4 * parts["center"]
    )
    torch.testing.assert_close(total, expected)
    assert [k for k in loss.state_dict()] == ["center.centers"]  # checkpoints keep their keys
