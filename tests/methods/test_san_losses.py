"""SAN's loss terms (issue 18): the decoder triplet's fixed pattern against a direct loop over the
released code's index list, its gradient by central differences, hard mining against a
brute-force loop, the masked texture L1 against numpy, and the errors (batch layout, shapes, an
output the model lacks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc_reid.config import ConfigError, LossConfig
from hpc_reid.losses import ReidLoss
from hpc_reid.methods.san.losses import (
    DECODER_BLOCKS,
    check_fixed_layout,
    decoder_triplet_loss,
    pairwise_mse,
    texture_l1_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: small stand-ins for the four block outputs (C, H, W): channels fall as the maps grow
BLOCK_SHAPES = ((8, 4, 2), (4, 8, 4), (2, 16, 8), (2, 32, 16))
#: tinier ones for central differences (two loss evaluations per input element)
TINY_SHAPES = ((3, 2, 1), (2, 2, 2), (1, 4, 2), (1, 4, 4))


def _blocks(
    batch: int, seed: int, dtype=torch.float64, scale: float = 1.0, shapes=BLOCK_SHAPES
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, *s, generator=g, dtype=dtype) for s in shapes]


def _pk_pids(p: int, k: int = 4, seed: int = 0) -> torch.Tensor:
    """P distinct identities (not 0..P-1: the pattern must not depend on pid values) x k each."""
    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))[:p]
    return ids.repeat_interleave(k)


def _mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x - y) ** 2))


def _released_loop(blocks: list[np.ndarray], batch_size: int, margin: float = 0.3) -> float:
    """main.py's train() loop as written there (num_instances 4), in numpy: block 4 compares
    MSE(x[i], x[i+3]) with MSE(x[i+3], x[i+4])."""
    x1, x2, x3, x4 = blocks
    total = 0.0
    for i in range(0, ((batch_size // 4) - 1) * 4, 4):
        total += max(_mse(x1[i], x1[i + 1]) - _mse(x1[i], x1[i + 4]) + margin, 0.0)
        total += max(_mse(x2[i + 1], x2[i + 2]) - _mse(x2[i + 1], x2[i + 5]) + margin, 0.0)
        total += max(_mse(x3[i + 2], x3[i + 3]) - _mse(x3[i + 2], x3[i + 6]) + margin, 0.0)
        total += max(_mse(x4[i], x4[i + 3]) - _mse(x4[i + 3], x4[i + 4]) + margin, 0.0)
    return total


# ------------------------------------------------------------------ decoder triplet: fixed


@pytest.mark.parametrize("p", [4, 16])
@pytest.mark.parametrize("margin", [0.3, 2.0])
def test_fixed_pattern_equals_released_loop_sum(p: int, margin: float):
    b = 4 * p
    blocks = _blocks(b, seed=p)
    got = decoder_triplet_loss(blocks, _pk_pids(p), margin, "fixed")
    want = _released_loop([x.numpy() for x in blocks], b, margin)
    assert want > 0  # some hinges are active: the comparison is not 0 == 0
    np.testing.assert_allclose(got.item(), want, rtol=1e-12)


def test_fixed_pattern_float32_close_to_float64_loop():
    blocks = _blocks(64, seed=7, dtype=torch.float32)
    got = decoder_triplet_loss(blocks, _pk_pids(16), 0.3, "fixed")
    want = _released_loop([x.double().numpy() for x in blocks], 64)
    np.testing.assert_allclose(got.item(), want, rtol=1e-5)


def test_fixed_pattern_gradient_matches_central_differences_on_anchor_positive_negative():
    p, margin = 3, 0.3
    blocks = [x.requires_grad_() for x in _blocks(4 * p, seed=3, scale=0.5, shapes=TINY_SHAPES)]
    pids = _pk_pids(p)
    # gradcheck: the analytic gradient against central differences of the float64 loss
    assert torch.autograd.gradcheck(
        lambda *xs: decoder_triplet_loss(list(xs), pids, margin, "fixed"), tuple(blocks)
    )
    # and no side is detached: every image an active hinge uses as anchor, positive or negative
    # receives a gradient (the reference backpropagates into all three)
    loss = decoder_triplet_loss(blocks, pids, margin, "fixed")
    grads = torch.autograd.grad(loss, blocks)
    offsets = ((0, 1, 4), (1, 2, 5), (2, 3, 6), (3, 0, 4))
    checked = 0
    for x, g, (a, pos, n) in zip(blocks, grads, offsets, strict=True):
        for i in range(0, (p - 1) * 4, 4):
            hinge = _mse(x[i + a].detach().numpy(), x[i + pos].detach().numpy()) - _mse(
                x[i + a].detach().numpy(), x[i + n].detach().numpy()
            )
            if hinge + margin > 0:
                for j in (i + a, i + pos, i + n):
                    assert g[j].abs().sum() > 0, (a, pos, n, i, j)
                checked += 1
    assert checked > 0


def test_fixed_pattern_refuses_batch_not_p_by_4_naming_pids():
    blocks = _blocks(16, seed=0)
    # a random sampler's batch: groups of 4 mix identities
    mixed = torch.tensor([5, 5, 5, 9, 9, 9, 9, 5, 1, 1, 1, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match=r"mining=fixed.*images 0\.\.3 have pids \[5, 5, 5, 9\]"):
        decoder_triplet_loss(blocks, mixed, 0.3, "fixed")
    # K = 2 x P = 8: groups of 4 hold two identities
    with pytest.raises(ValueError, match=r"num_instances=4.*mining=hard"):
        decoder_triplet_loss(blocks, _pk_pids(8, k=2), 0.3, "fixed")
    # two consecutive groups of one identity: the "negative" would be a positive
    same = torch.tensor([3] * 8 + [4] * 4 + [6] * 4)
    with pytest.raises(ValueError, match=r"groups 0 and 1 .* share pid 3"):
        decoder_triplet_loss(blocks, same, 0.3, "fixed")
    # a batch that is not a multiple of 4, or a single identity group
    with pytest.raises(ValueError, match=r"batch of 6 images is not P >= 2"):
        check_fixed_layout(torch.tensor([1, 1, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"batch of 4 images is not P >= 2"):
        check_fixed_layout(torch.tensor([1, 1, 1, 1]))
    # the identity sampler's layout passes; hard mining takes any batch with positives
    check_fixed_layout(_pk_pids(4))
    decoder_triplet_loss(blocks, mixed, 0.3, "hard")


def test_decoder_block_of_wrong_batch_is_refused_naming_it():
    blocks = _blocks(16, seed=0)
    blocks[2] = blocks[2][:12]
    with pytest.raises(ValueError, match=r"'decoder\.3' has shape \(12, 2, 16, 8\) for 16 pids"):
        decoder_triplet_loss(blocks, _pk_pids(4), 0.3, "fixed")


# ------------------------------------------------------------------- decoder triplet: hard


def _brute_force_hard(blocks: list[np.ndarray], pids: np.ndarray, margin: float) -> float:
    total = 0.0
    b = len(pids)
    for x in blocks:
        hinges = []
        for a in range(b):
            pos = [_mse(x[a], x[j]) for j in range(b) if j != a and pids[j] == pids[a]]
            neg = [_mse(x[a], x[j]) for j in range(b) if pids[j] != pids[a]]
            if pos and neg:
                hinges.append(max(max(pos) - min(neg) + margin, 0.0))
        total += sum(hinges) / max(len(hinges), 1)
    return total


@pytest.mark.parametrize("margin", [0.3, 3.0])
def test_hard_mining_equals_brute_force_sum_over_blocks_of_mean_hinge(margin: float):
    # an uneven batch: identities with 1 (no positive), 2 and 5 images, not in consecutive order
    pids = torch.tensor([4, 7, 4, 9, 7, 7, 2, 2, 7, 4, 7, 11])
    perm = torch.randperm(len(pids), generator=torch.Generator().manual_seed(1))
    pids = pids[perm]
    blocks = _blocks(len(pids), seed=11)
    got = decoder_triplet_loss(blocks, pids, margin, "hard")
    want = _brute_force_hard([x.numpy() for x in blocks], pids.numpy(), margin)
    assert want > 0
    np.testing.assert_allclose(got.item(), want, rtol=1e-10)


def test_pairwise_mse_float32_with_common_offset_close_to_direct_float64():
    # a large shared offset is where |a|^2 + |b|^2 - 2 a.b cancels: the centring keeps it exact
    g = torch.Generator().manual_seed(2)
    maps = 50.0 + torch.randn(12, 4, 16, 8, generator=g)
    got = pairwise_mse(maps).double().numpy()
    x = maps.double().flatten(1).numpy()
    want = ((x[:, None, :] - x[None, :, :]) ** 2).mean(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_hard_mining_gradient_matches_central_differences():
    pids = _pk_pids(3, k=3)
    blocks = [x.requires_grad_() for x in _blocks(9, seed=5, scale=0.5, shapes=TINY_SHAPES)]
    assert decoder_triplet_loss(blocks, pids, 0.3, "hard") > 0  # hinges active: a real gradient
    assert torch.autograd.gradcheck(
        lambda *xs: decoder_triplet_loss(list(xs), pids, 0.3, "hard"), tuple(blocks)
    )


# ------------------------------------------------------------------------------ texture L1


def test_texture_l1_with_mask_equals_numpy_mean_over_valid_samples():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(6, 3, 8, 4, generator=g, dtype=torch.float64)
    target = torch.rand(6, 3, 8, 4, generator=g, dtype=torch.float64) * 2 - 1
    valid = torch.tensor([True, False, True, True, False, True])
    target[~valid] = float("nan")  # a placeholder target must not reach value or gradient
    pred.requires_grad_()
    got = texture_l1_loss(pred, target, valid)
    p, t, v = pred.detach().numpy(), target.numpy(), valid.numpy()
    np.testing.assert_allclose(got.item(), np.abs(p[v] - t[v]).mean(), rtol=1e-12)
    (grad,) = torch.autograd.grad(got, pred)
    want_grad = np.zeros_like(p)
    want_grad[v] = np.sign(p[v] - t[v]) / np.abs(p[v] - t[v]).size
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-12)
    # without a mask: nn.L1Loss of the whole batch
    t_all = torch.nan_to_num(target, nan=0.25)
    np.testing.assert_allclose(
        texture_l1_loss(pred, t_all).item(), torch.nn.L1Loss()(pred, t_all).item(), rtol=1e-12
    )


def test_texture_l1_all_invalid_is_zero_with_a_graph():
    pred = torch.randn(4, 3, 8, 8, requires_grad=True)
    target = torch.full((4, 3, 8, 8), float("nan"))
    loss = texture_l1_loss(pred, target, torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # DDP needs every rank's backward to reach the decoder
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros_like(pred))


def test_texture_l1_size_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 64, 64\).*\(2, 3, 256, 256\)"):
        texture_l1_loss(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 256, 256))
    with pytest.raises(ValueError, match=r"'texture_valid' has shape \(3,\) for 2 textures"):
        texture_l1_loss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), torch.ones(3).bool())


# ------------------------------------------------------------------------- through ReidLoss


def _san_loss_config(mining: str = "fixed") -> LossConfig:
    return LossConfig.model_validate(
        {
            "ce": {"weight": 0.0},
            "triplet": {"weight": 0.0},
            "center": {"weight": 0.0},
            "texture": {"weight": 0.5},
            "decoder_triplet": {"weight": 2.0, "mining": mining},
        }
    )


def test_reid_loss_sums_weighted_san_terms_reading_outputs_and_batch_fields():
    pids = _pk_pids(4)
    blocks = _blocks(16, seed=8)
    g = torch.Generator().manual_seed(9)
    texture = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
    target = torch.rand(16, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    valid = torch.rand(16, generator=g) > 0.3
    outputs = {"texture": texture, **dict(zip(DECODER_BLOCKS, blocks, strict=True))}
    criterion = ReidLoss(_san_loss_config(), 4, 8, output_keys=outputs.keys())
    assert criterion.batch_fields == ["texture", "texture_valid"]
    total, parts = criterion(outputs, pids, {"texture": target, "texture_valid": valid})
    v = valid.numpy()
    want_tex = np.abs(texture.numpy()[v] - target.numpy()[v]).mean()
    want_tri = _released_loop([x.numpy() for x in blocks], 16)
    np.testing.assert_allclose(parts["texture"].item(), want_tex, rtol=1e-12)
    np.testing.assert_allclose(parts["decoder_triplet"].item(), want_tri, rtol=1e-12)
    np.testing.assert_allclose(total.item(), 0.5 * want_tex + 2.0 * want_tri, rtol=1e-12)


def test_san_terms_on_baseline_head_outputs_are_a_config_error():
    with pytest.raises(ConfigError) as err:
        ReidLoss(_san_loss_config(), 4, 8, output_keys={"global", "bn", "logits"}, head="bnneck")
    message = str(err.value)
    assert "loss.texture reads the model output 'texture'" in message
    for key in DECODER_BLOCKS:
        assert f"loss.decoder_triplet reads the model output '{key}'" in message
