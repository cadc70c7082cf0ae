from __future__ import annotations

import pytest
import torch

from hpc_reid.config import CenterConfig
from hpc_reid.engine.optim import build_center_optimizer
from hpc_reid.losses import CenterLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(x: torch.Tensor, pids: list[int], centers: torch.Tensor) -> torch.Tensor:
    """BoT Eq. 6: (1/B) sum_i |x_i - c_{y_i}|^2, one sample at a time."""
    total = sum(((x[i] - centers[y]) ** 2).sum() for i, y in enumerate(pids))
    return total / len(pids)


@pytest.mark.parametrize("seed", [0, 1])
def test_center_loss_equals_per_sample_squared_distance_mean(seed):
    torch.manual_seed(seed)
    loss = CenterLoss(num_classes=6, feat_dim=4).double()
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    pids = torch.randint(0, 6, (10,))
    ours = loss(x, pids)
    ref = _reference(x, pids.tolist(), loss.centers)
    g_ours = torch.autograd.grad(ours, [x, loss.centers])
    g_ref = torch.autograd.grad(ref, [x, loss.centers])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_center_loss_is_zero_on_its_centers_and_rejects_wrong_width():
    loss = CenterLoss(num_classes=3, feat_dim=2)
    pids = torch.tensor([2, 0, 2])
    with torch.no_grad():
        assert float(loss(loss.centers[pids], pids)) == pytest.approx(1e-12)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        loss(torch.zeros(3, 5), pids)


def test_center_optimizer_is_plain_sgd_at_the_configured_lr():
    opt = build_center_optimizer(CenterLoss(5, 4), CenterConfig(lr=0.5))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["momentum"] == 0 and opt.param_groups[0]["weight_decay"] == 0
