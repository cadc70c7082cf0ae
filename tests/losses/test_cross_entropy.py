from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpc_reid.losses import label_smoothing_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(logits: np.ndarray, targets: np.ndarray, eps: float) -> float:
    """-sum_i q_i log p_i averaged over the batch, with q built explicitly (Szegedy et al.)."""
    b, n = logits.shape
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    q = np.full((b, n), eps / n)
    q[np.arange(b), targets] += 1.0 - eps
    return float(-(q * log_p).sum(1).mean())


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_ce_equals_explicit_smoothed_target_formula(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(12, 7))
    targets = rng.integers(0, 7, size=12)
    got = label_smoothing_cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets), eps)
    assert float(got) == pytest.approx(_reference(logits, targets, eps), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_ce_matches_torch_value_and_gradient(eps):
    torch.manual_seed(1)
    logits = torch.randn(16, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (16,))
    ours = label_smoothing_cross_entropy(logits, targets, eps)
    (g_ours,) = torch.autograd.grad(ours, logits)
    theirs = F.cross_entropy(logits, targets, label_smoothing=eps)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)


def test_label_smoothing_ce_rejects_bad_epsilon_and_shapes():
    logits, targets = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="epsilon"):
        label_smoothing_cross_entropy(logits, targets, 1.0)
    with pytest.raises(ValueError, match="targets"):
        label_smoothing_cross_entropy(logits, torch.zeros(3, dtype=torch.long), 0.1)
