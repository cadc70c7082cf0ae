"""Re-identification losses and their weighted sum, as configured by ``loss.*``.

BoT's objective (Luo et al., CVPRW 2019, Eq. 7): label-smoothed cross-entropy on the classifier's
logits, plus the batch-hard triplet loss and the center loss on the global feature before the
BNNeck.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hpc_reid.config import LossConfig
from hpc_reid.losses.center import CenterLoss
from hpc_reid.losses.cross_entropy import label_smoothing_cross_entropy
from hpc_reid.losses.triplet import (
    all_gather_with_grad,
    batch_hard_triplet_loss,
    cross_rank_batch_hard_triplet_loss,
    pairwise_euclidean,
)

__all__ = [
    "CenterLoss",
    "ReidLoss",
    "all_gather_with_grad",
    "batch_hard_triplet_loss",
    "cross_rank_batch_hard_triplet_loss",
    "label_smoothing_cross_entropy",
    "pairwise_euclidean",
]


class ReidLoss(nn.Module):
    """total = w_ce * CE(logits) + w_tri * triplet(global) + w_center * center(global).

    ``outputs`` is the model's dict: ``"logits"`` feeds the cross-entropy, ``"global"`` the
    triplet and center losses. A loss with weight 0 is neither built nor computed (and its input
    need not exist). ``parts`` holds each computed loss, unweighted and detached, for logging.
    ``self.center`` is the :class:`CenterLoss` (None when its weight is 0); its centers need their
    own optimizer (:func:`hpc_reid.engine.optim.build_center_optimizer`).
    """

    def __init__(self, cfg: LossConfig, num_classes: int, feat_dim: int):
        super().__init__()
        if cfg.ce.weight == 0 and cfg.triplet.weight == 0 and cfg.center.weight == 0:
            raise ValueError(
                "every loss weight is 0 (loss.ce.weight, loss.triplet.weight, "
                "loss.center.weight): nothing to train"
            )
        self.cfg = cfg
        self.center = CenterLoss(num_classes, feat_dim) if cfg.center.weight > 0 else None

    @staticmethod
    def _input(outputs: dict[str, torch.Tensor], key: str, loss: str) -> torch.Tensor:
        if key not in outputs:
            raise KeyError(
                f"{loss} needs the model output {key!r}; the model returned {sorted(outputs)}"
            )
        return outputs[key]

    def forward(
        self, outputs: dict[str, torch.Tensor], pids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        weighted: list[torch.Tensor] = []
        parts: dict[str, torch.Tensor] = {}
        if cfg.ce.weight > 0:
            logits = self._input(outputs, "logits", "loss.ce")
            parts["ce"] = label_smoothing_cross_entropy(logits, pids, cfg.ce.label_smoothing)
            weighted.append(cfg.ce.weight * parts["ce"])
        if cfg.triplet.weight > 0:
            feats = self._input(outputs, "global", "loss.triplet")
            distributed = dist.is_available() and dist.is_initialized()
            triplet = (
                cross_rank_batch_hard_triplet_loss
                if cfg.triplet.cross_rank and distributed
                else batch_hard_triplet_loss
            )
            parts["triplet"] = triplet(feats, pids, cfg.triplet.margin)
            weighted.append(cfg.triplet.weight * parts["triplet"])
        if self.center is not None:
            feats = self._input(outputs, "global", "loss.center")
            parts["center"] = self.center(feats, pids)
            weighted.append(cfg.center.weight * parts["center"])
        total = sum(weighted[1:], start=weighted[0])
        return total, {k: v.detach() for k, v in parts.items()}
