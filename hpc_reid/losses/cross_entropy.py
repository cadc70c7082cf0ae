"""Cross-entropy with label smoothing for the identity classifier.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016, Sec. 7, as
used for re-identification by Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification" (BoT), CVPRW 2019, Eq. 2: the target distribution of a sample of class y over
N classes is q_i = (1 - eps) [i = y] + eps / N, and the loss is the batch mean of
-sum_i q_i log p_i, with p the softmax of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothing_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Mean over the batch of -sum_i q_i log softmax(logits)_i, q = (1-eps) one-hot + eps/N.

    ``logits`` is (B, N), ``targets`` (B,) class indices. Written as
    (1 - eps) * NLL + eps * mean_i(-log p_i), which is the same sum split in its two parts
    (and the same value as ``F.cross_entropy(..., label_smoothing=eps)``).
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon must lie in [0, 1), got {epsilon}")
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (B, N) and targets (B,), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    log_probs = F.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()
