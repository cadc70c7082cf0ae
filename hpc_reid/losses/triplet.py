"""Batch-hard triplet loss, on one process or mined over the batches of every rank.

Hermans, Beyer and Leibe, "In Defense of the Triplet Loss for Person Re-Identification", 2017,
Eq. 5 (batch hard) and Sec. 3.1 (soft margin): for every anchor a of the batch,

    l_a = [m + max_{p: y_p = y_a, p != a} D(a, p) - min_{n: y_n != y_a} D(a, n)]_+      (margin m)
    l_a = softplus(max_p D(a, p) - min_n D(a, n))                                   (soft margin)

with D the euclidean distance (or the cosine distance 1 - cos, ``distance="cosine"``: then l_a =
[cos(a, n_hardest) - cos(a, p_hardest) + m]_+, the fine-grained ReID triplet), and the loss is the
mean of l_a. An anchor without a positive
(its identity appears once) or without a negative (one identity in the batch) has no triplet: it
is excluded from the sum and from the count. The identity-balanced sampler (K >= 2 images per
identity, P >= 2 identities) never produces such anchors; the loss of a batch with none left is 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def pairwise_euclidean(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(M, N) euclidean distances between the rows of ``x`` and ``y``.

    Computed as sqrt(|x|^2 + |y|^2 - 2 x.y) with the square clamped at ``eps`` (as BoT does), so
    coinciding points give distance sqrt(eps) and a zero gradient instead of the NaN of
    d sqrt(s) / ds at s = 0.
    """
    sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    return sq.clamp(min=eps).sqrt()


def pairwise_cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(M, N) cosine distances 1 - cos(x_i, y_j) between the rows of ``x`` and ``y`` (each row
    L2-normalised, a zero row staying zero)."""
    return 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).t()


#: ``distance`` of the batch-hard losses -> the (M, N) distances between the rows of two matrices
DISTANCES = {"euclidean": pairwise_euclidean, "cosine": pairwise_cosine_distance}


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """``DISTANCES[distance](x, y)``; a ValueError naming the choices for another name."""
    if distance not in DISTANCES:
        raise ValueError(
            f"triplet distance {distance!r}: expected one of {', '.join(sorted(DISTANCES))}"
        )
    return DISTANCES[distance](x, y)


def triplet_masks(
    anchor_pids: torch.Tensor, candidate_pids: torch.Tensor, anchor_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positives, negatives, valid): the (A, C) masks of each anchor's positive candidates (same
    pid, not itself: ``anchor_index[i]`` is anchor i's row among the candidates) and negatives,
    and the (A,) mask of anchors that have both, the only ones with a triplet."""
    same = anchor_pids.unsqueeze(1) == candidate_pids.unsqueeze(0)
    cols = torch.arange(candidate_pids.shape[0], device=candidate_pids.device)
    is_self = anchor_index.unsqueeze(1) == cols.unsqueeze(0)
    pos = same & ~is_self
    neg = ~same
    return pos, neg, pos.any(1) & neg.any(1)


def triplet_terms(
    d_ap: torch.Tensor, d_an: torch.Tensor, valid: torch.Tensor, margin: float | None
) -> torch.Tensor:
    """Per-anchor losses relu(d_ap - d_an + margin), or softplus(d_ap - d_an) with ``margin``
    None (soft margin), zero where not ``valid``. Excluded anchors get 0 - 0: no stray value
    (an inf of an empty mask) reaches the loss, so no NaN reaches the gradient."""
    zero = torch.zeros_like(d_ap)
    gap = torch.where(valid, d_ap, zero) - torch.where(valid, d_an, zero)
    terms = F.softplus(gap) if margin is None else F.relu(gap + margin)
    return torch.where(valid, terms, zero)


def _batch_hard_terms(
    anchors: torch.Tensor,
    anchor_pids: torch.Tensor,
    anchor_index: torch.Tensor,
    candidates: torch.Tensor,
    candidate_pids: torch.Tensor,
    margin: float | None,
    distance: str = "euclidean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor losses l_a (zero where excluded) and the mask of anchors with a triplet.

    ``anchor_index[i]`` is the row of anchor i among the candidates: it is not its own positive.
    """
    dist_ = pairwise_distance(anchors, candidates, distance)
    pos, neg, valid = triplet_masks(anchor_pids, candidate_pids, anchor_index)
    d_ap = dist_.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist_.masked_fill(~neg, float("inf")).amin(1)
    return triplet_terms(d_ap, d_an, valid, margin), valid


def _check(features: torch.Tensor, pids: torch.Tensor) -> None:
    if features.dim() != 2 or pids.shape != features.shape[:1]:
        raise ValueError(
            f"expected features (B, D) and pids (B,), got {tuple(features.shape)} and "
            f"{tuple(pids.shape)}"
        )


def batch_hard_triplet_loss(
    features: torch.Tensor,
    pids: torch.Tensor,
    margin: float | None,
    distance: str = "euclidean",
) -> torch.Tensor:
    """Batch-hard triplet loss of one batch (Hermans et al. 2017, Eq. 5); ``margin=None`` is the
    soft-margin variant; ``distance``: euclidean or cosine (1 - cos). The mean over the anchors
    that have a positive and a negative."""
    _check(features, pids)
    index = torch.arange(features.shape[0], device=features.device)
    terms, valid = _batch_hard_terms(features, pids, index, features, pids, margin, distance)
    return terms.sum() / valid.sum().clamp(min=1)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0, in rank order; the local slice is ``x`` itself.

    Gradients of the result flow into the local slice only: the other ranks' parts are received
    values, detached. Every rank must call this with a tensor of the same shape (the sampler gives
    every rank equally sized batches). In a single process it returns ``x``.
    """
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def cross_rank_batch_hard_triplet_loss(
    features: torch.Tensor,
    pids: torch.Tensor,
    margin: float | None,
    distance: str = "euclidean",
) -> torch.Tensor:
    """Batch-hard triplet loss mined over the batches of all ranks (one all-gather of features
    and pids); equal, after DDP's averaging, to the single-process loss on the whole global batch.

    Each local anchor finds its hardest positive and negative among all W*B gathered features.
    Why more than that is computed: with W ranks, the single-process loss on the concatenated
    batch is L = sum_a l_a / n (n anchors with a triplet, a over all W*B), and DDP averages the
    ranks' gradients. A local feature x_i receives gradient from its own anchor term and from every
    anchor, on any rank, that picked x_i as its hardest positive or negative. The gathered copies
    of x_i on other ranks are detached, so those remote anchors' pulls would be lost. Hence every
    rank also evaluates the remote anchors' terms (a (W*B)^2 distance matrix, small next to the
    network) and adds them as ``l - l.detach()``: zero in value, but their gradient reaches the
    local features. The rank's loss is

        L_r = (W / n) * [sum_{a local} l_a + sum_{a remote} (l_a - stopgrad(l_a))]

    so that (i) mean_r L_r = L exactly (the value is the rank's share of the global sum; it is the
    mean over local anchors when every anchor has a triplet, as with identity-balanced batches),
    and (ii) dL_r/dx_i = W dL/dx_i for every local x_i, so DDP's average over the W ranks of the
    parameter gradients equals the single-process gradient of L. In a single process this is
    :func:`batch_hard_triplet_loss`.
    """
    _check(features, pids)
    rank, world = _world()
    all_features = all_gather_with_grad(features)
    all_pids = all_gather_with_grad(pids)
    index = torch.arange(all_features.shape[0], device=features.device)
    terms, valid = _batch_hard_terms(
        all_features, all_pids, index, all_features, all_pids, margin, distance
    )
    b = features.shape[0]
    local = (index >= rank * b) & (index < (rank + 1) * b)
    terms = torch.where(local, terms, terms - terms.detach())
    return terms.sum() * world / valid.sum().clamp(min=1)
