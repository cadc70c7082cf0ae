"""CACE-Net's pair losses, ``loss.pair_id`` and ``loss.pair_triplet`` (Jiang et al., arXiv
2009.05250; the released ``compute_loss`` of models/cacenet.py and ``loss`` / ``fc_pair`` /
``pairwise_hard_triplet_loss`` of the TF nets/cacenet/cacenet.py, which agree on both).

The terms read the pair outputs of ``model.head: cace`` for the B^2 ordered pairs k = i * B + j of
the batch (:func:`hpc_reid.methods.cace.pair_graph.pair_index`): f0_k, image j conditioned on image
i, and f1_k, image i conditioned on image j. Their labels come from the B images' pids:
(y_i, y_j) of pair k.

- Mixed-up ID loss: mean over the pairs of alpha CE(pair_fc(f0_k), y_j) + (1 - alpha)
  CE(pair_fc(f0_k), y_i), plus the same for f1 with y_i and y_j swapped: each conditioned feature
  is mostly its own image's identity and a little the other's. The two sums are added, not
  averaged (the releases' ``mixup_loss_0`` + ``mixup_loss_1``, each of weight 1), so weight 1 is
  their scale. The releases use plain CE here (``loss.pair_id.label_smoothing`` 0).
- Pair triplet: Dm[i, j] = ||n(f0_k) - n(f1_k)||, the B x B matrix of the conditioned pairs'
  distances, batch-hard (Hermans et al. 2017, Eq. 5) with row i's labels y_i against column j's
  y_j: for each anchor image i, the farthest conditioned pair with a same-identity image and the
  closest with another identity's, hinge with margin 0.5. The TF release leaves the (i, i) pairs
  out of the positives (``exclude_diagonal``); the PyTorch release keeps them, where Dm[i, i] ~ 0
  (the two halves of a pair of one image are the same map), so they never are the hardest
  positive of an anchor that has another. As the repository's batch-hard triplet, an anchor
  without a positive or a negative is left out of the mean.
"""

from __future__ import annotations

import torch

from hpc_reid.losses import label_smoothing_cross_entropy, register_loss
from hpc_reid.losses.triplet import triplet_terms
from hpc_reid.methods.cace.model import normalized_pair_distance
from hpc_reid.methods.cace.pair_graph import pair_index


def _batch_of_pairs(pairs: int, pids: torch.Tensor, term: str) -> int:
    """B, for B^2 pair rows and the batch's B pids; an error naming ``term`` otherwise."""
    b = pids.shape[0]
    if pids.dim() != 1 or pairs != b * b:
        raise ValueError(
            f"{term}: {pairs} pair rows for {tuple(pids.shape)} pids; expected B^2 rows for B "
            "pids (the cace head pairs every two images of the batch it is given)"
        )
    return b


def pair_labels(pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_i, y_j) of the B^2 ordered pairs k = i * B + j of a batch with labels ``pids`` (B,)."""
    i, j = pair_index(pids.shape[0], pids.device)
    return pids[i], pids[j]


def mixed_up_id_loss(
    logits0: torch.Tensor,
    logits1: torch.Tensor,
    pids: torch.Tensor,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The mixed-up ID loss (module docstring) of the pair logits (B^2, #ids) each and the
    batch's pids (B,)."""
    _batch_of_pairs(logits0.shape[0], pids, "loss.pair_id")
    if logits1.shape != logits0.shape:
        raise ValueError(
            f"loss.pair_id: pair_logits0 {tuple(logits0.shape)} and pair_logits1 "
            f"{tuple(logits1.shape)}; expected one shape"
        )
    y_i, y_j = pair_labels(pids)

    def ce(logits, labels):
        return label_smoothing_cross_entropy(logits, labels, label_smoothing)

    own0 = alpha * ce(logits0, y_j) + (1.0 - alpha) * ce(logits0, y_i)  # f0: image j | i
    own1 = alpha * ce(logits1, y_i) + (1.0 - alpha) * ce(logits1, y_j)  # f1: image i | j
    return own0 + own1


def pair_triplet_loss(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    pids: torch.Tensor,
    margin: float,
    exclude_diagonal: bool = True,
) -> torch.Tensor:
    """The pair triplet (module docstring) of the conditioned features (B^2, D) each."""
    b = _batch_of_pairs(feat0.shape[0], pids, "loss.pair_triplet")
    if feat1.shape != feat0.shape:
        raise ValueError(
            f"loss.pair_triplet: pair_feat0 {tuple(feat0.shape)} and pair_feat1 "
            f"{tuple(feat1.shape)}; expected one shape"
        )
    dist = normalized_pair_distance(feat0, feat1).view(b, b)  # [i, j]: pair k = i * B + j
    same = pids.unsqueeze(1) == pids.unsqueeze(0)
    pos = same
    if exclude_diagonal:
        pos = same & ~torch.eye(b, dtype=torch.bool, device=same.device)
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(1)
    return triplet_terms(d_ap, d_an, valid, margin).sum() / valid.sum().clamp(min=1)


@register_loss("pair_id", inputs=("pair_logits0", "pair_logits1"))
def _pair_id(section, num_classes: int, feature_dim: int):
    def pair_id(outputs, pids):
        return mixed_up_id_loss(
            outputs["pair_logits0"],
            outputs["pair_logits1"],
            pids,
            section.alpha,
            section.label_smoothing,
        )

    return pair_id


@register_loss("pair_triplet", inputs=("pair_feat0", "pair_feat1"))
def _pair_triplet(section, num_classes: int, feature_dim: int):
    def pair_triplet(outputs, pids):
        return pair_triplet_loss(
            outputs["pair_feat0"],
            outputs["pair_feat1"],
            pids,
            section.margin,
            section.exclude_diagonal,
        )

    return pair_triplet
