"""FGReID's loss terms beside the toolkit's (Pathak, arXiv 2011.13475; the released loss/loss.py
and the training step of main_scripts/Image.py / Video.py; the method's notes, section 2).

The reference's total is L_id + (1 - beta) L_tri + 0.0005 L_cen + beta L_osm + var + lsr_w L_sr +
lcn_w L_cns: the ``ce`` term with ``also: [logits2]`` (the mean of the label-smoothed CE of the two
branches), ``triplet`` with ``distance: cosine``, ``center``, and the four terms here, each a
registered term with its ``loss.<name>`` section and weight (0: off). f is the ``global`` output
(FGReID's [F1, F2]); p1, p2 the class probabilities of ``logits`` and ``logits2``.

- ``osm``: online soft mining with class-aware attention (Wang et al., "Deep Metric Learning by
  Online Soft Mining and Class-Aware Attention", AAAI 2019, arXiv 1811.01459, Eqs. 3-9 as the
  reference's ``OSM_CAA_Loss``): on x = f / |f|, d_ij = |x_i - x_j|; positive pairs weigh
  S+ = exp(-d^2 / sigma^2), negative ones S- = max(alpha - d, 1e-12); a_i = softmax_c(x_i . C_c)
  at y_i, C the center loss's centers each L2-normalised (the reference hands its OSM the
  centers, not the classifier the paper uses); W = S min(a_i, a_j), diagonal out;
  L_P = 1/2 sum W_P d^2 / sum W_P, L_N = 1/2 sum W_N S-^2 / sum W_N; L = (1 - l) L_P + l L_N.
  A part without pairs in the batch is 0 (the reference's 0 / 0 is NaN). The centers are the
  ``center`` term's, linked by :class:`hpc_reid.losses.ReidLoss` (``reads_terms``); with
  ``center_grad`` (the reference) the loss moves them too, and their gradient is rescaled by the
  center loss's 1 / weight before their SGD step as the reference's whole center gradient is.
- ``variance``: within-class variance, sum over the batch and dimensions of (f - proto_y)^2 over
  (K - 1) B / K, proto_y the sum of the batch's features of y over K. ``instances`` K is the
  reference's hard-coded 4, or (null) each identity's own count in the batch, where proto_y is its
  mean and the count B - #identities. The reference divides by (seq_len - 1) x train_batch //
  seq_len, which is this pooled count on its video batches (train_batch the tracklets) but K times
  smaller on its image batches (train_batch the identities, seq_len their K images): its image
  var_weight is K times this term's weight.
- ``satisfied_rank``: mean over the batch of min(relu(p1[y] - p2[y] + m_r), relu(2 m_s - p1[y] -
  p2[y])), m_r = 2 and m_s = 1 (the reference's ``Satisfied_Rank_loss2``).
- ``rank_consistency``: relu(mean over the batch of KL(p1 || p2) - m_cs), m_cs = 0.005, the KL
  from log-probabilities (the reference's p1 log(p1 / (p2 + 1e-12) + 1e-12) differs by its epsilons
  only).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.losses import register_loss
from hpc_reid.losses.triplet import pairwise_euclidean


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (num is then 0 too: a sum of no pair), with finite gradients."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def osm_caa_loss(
    features: torch.Tensor,
    pids: torch.Tensor,
    centers: torch.Tensor,
    alpha: float,
    sigma: float,
    l: float,  # noqa: E741  (the paper's name)
) -> torch.Tensor:
    """OSM with class-aware attention (module docstring) of ``features`` (B, D) with labels
    ``pids`` (B,) and class centers ``centers`` (C, D)."""
    if features.dim() != 2 or centers.dim() != 2 or centers.shape[1] != features.shape[1]:
        raise ValueError(
            f"loss.osm: features {tuple(features.shape)} and centers {tuple(centers.shape)}; "
            "expected (B, D) and (classes, D)"
        )
    x = F.normalize(features, dim=1)
    d = pairwise_euclidean(x, x)
    same = pids[:, None] == pids[None, :]
    s_neg = (alpha - d).clamp(min=1e-12)
    similarity = torch.where(same, torch.exp(-d.pow(2) / sigma**2), s_neg)
    attention = F.softmax(x @ F.normalize(centers.to(x.dtype), dim=1).t(), dim=1)
    own = attention.gather(1, pids.long()[:, None]).squeeze(1)
    weights = similarity * torch.minimum(own[:, None], own[None, :])
    off_diagonal = ~torch.eye(len(pids), dtype=torch.bool, device=features.device)
    w_p = torch.where(same & off_diagonal, weights, 0.0)
    w_n = torch.where(~same & off_diagonal, weights, 0.0)
    l_p = 0.5 * _safe_ratio((w_p * d.pow(2)).sum(), w_p.sum())
    l_n = 0.5 * _safe_ratio((w_n * s_neg.pow(2)).sum(), w_n.sum())
    return (1.0 - l) * l_p + l * l_n


class OsmLoss(nn.Module):
    """``loss.osm`` on the ``global`` output, with the ``center`` term's centers
    (:meth:`link`, called by :class:`hpc_reid.losses.ReidLoss`). No state of its own."""

    reads_terms = ("center",)

    def __init__(self, section):
        super().__init__()
        self.alpha, self.sigma, self.l = section.alpha, section.sigma, section.l
        self.center_grad = section.center_grad
        self._center: tuple[nn.Module, ...] = ()  # a tuple: not a submodule, no second state copy

    def link(self, terms: Mapping[str, object]) -> None:
        center = terms["center"]
        if not isinstance(getattr(center, "centers", None), torch.Tensor):
            raise TypeError(f"loss.osm reads the center term's centers; {center!r} has none")
        self._center = (center,)

    def forward(self, outputs, pids):
        if not self._center:
            raise RuntimeError(
                "loss.osm reads the center loss's centers: build it through hpc_reid.losses."
                "ReidLoss (with loss.center on), which links them"
            )
        centers = self._center[0].centers
        centers = centers if self.center_grad else centers.detach()
        return osm_caa_loss(outputs["global"], pids, centers, self.alpha, self.sigma, self.l)


@register_loss("osm", inputs=("global",))
def _osm(section, num_classes: int, feature_dim: int) -> OsmLoss:
    return OsmLoss(section)


def variance_loss(
    features: torch.Tensor, pids: torch.Tensor, instances: int | None = None
) -> torch.Tensor:
    """The within-class variance term (module docstring) of ``features`` (B, D), labels ``pids``
    (B,): K = ``instances``, or each identity's count in the batch when None."""
    ids, inverse, counts = torch.unique(pids, return_inverse=True, return_counts=True)
    sums = features.new_zeros(len(ids), features.shape[1]).index_add_(0, inverse, features)
    b = features.shape[0]
    if instances is None:
        prototypes = sums / counts[:, None].to(features.dtype)
        pooled = b - len(ids)
    else:
        prototypes = sums / instances
        pooled = (instances - 1) * b / instances
    spread = (features - prototypes[inverse]).pow(2).sum()
    return spread / max(pooled, 1)  # every identity alone (null K): no spread, 0


@register_loss("variance", inputs=("global",))
def _variance(section, num_classes: int, feature_dim: int):
    def variance(outputs, pids):
        return variance_loss(outputs["global"], pids, section.instances)

    return variance


def _own_probabilities(logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=1).gather(1, pids.long()[:, None]).squeeze(1)


def satisfied_rank_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    pids: torch.Tensor,
    margin: float = 2.0,
    satisfied: float = 1.0,
) -> torch.Tensor:
    """mean min(relu(p1[y] - p2[y] + margin), relu(2 satisfied - p1[y] - p2[y]))."""
    p1, p2 = _own_probabilities(logits1, pids), _own_probabilities(logits2, pids)
    return torch.minimum(F.relu(p1 - p2 + margin), F.relu(2.0 * satisfied - p1 - p2)).mean()


def rank_consistency_loss(
    logits1: torch.Tensor, logits2: torch.Tensor, margin: float = 0.005
) -> torch.Tensor:
    """relu(mean over the batch of KL(softmax(logits1) || softmax(logits2)) - margin)."""
    log_p1 = F.log_softmax(logits1.float(), dim=1)
    log_p2 = F.log_softmax(logits2.float(), dim=1)
    kl = (log_p1.exp() * (log_p1 - log_p2)).sum(dim=1).mean()
    return F.relu(kl - margin)


@register_loss("satisfied_rank", inputs=("logits", "logits2"))
def _satisfied_rank(section, num_classes: int, feature_dim: int):
    def satisfied_rank(outputs, pids):
        return satisfied_rank_loss(
            outputs["logits"], outputs["logits2"], pids, section.margin, section.satisfied
        )

    return satisfied_rank


@register_loss("rank_consistency", inputs=("logits", "logits2"))
def _rank_consistency(section, num_classes: int, feature_dim: int):
    def rank_consistency(outputs, pids):
        return rank_consistency_loss(outputs["logits"], outputs["logits2"], section.margin)

    return rank_consistency
