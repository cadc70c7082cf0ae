"""AlignedReID's local triplet loss: batch-hard triplet on the DMLI distance of stripe features.

Zhang et al., arXiv 1711.08184, Sec. 3: the local branch is trained with the same batch-hard
triplet loss as the global one (Hermans et al. 2017, Eq. 5), on the local (DMLI) distance of the
anchor to a hardest positive and a hardest negative. Which pair is hardest is decided

- ``mining="global"`` by the global euclidean distance (both reference codes' default: the local
  distance is evaluated only for the two pairs the global triplet picked; no gradient flows
  through the choice), or
- ``mining="local"`` by the DMLI distance itself (huanghoujing's ``local_dist_own_hard_sample``:
  the full N x N DMLI matrix of the batch).

The loss is mean_a [m + D_l(a, p) - D_l(a, n)]_+ (``margin=None``: softplus(D_l(a, p) - D_l(a, n)),
the soft margin). As in :mod:`hpc_reid.losses.triplet`, an anchor without a positive (an identity
seen once) or without a negative (one identity in the batch) has no triplet and is left out of the
sum and the count; a batch with no triplet at all has loss 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hpc_reid.losses.triplet import (
    all_gather_with_grad,
    pairwise_euclidean,
    triplet_masks,
    triplet_terms,
)
from hpc_reid.methods.alignedreid.dmli import dmli_matrix, dmli_paired

MINING = ("global", "local")


def _check(
    local: torch.Tensor, global_feats: torch.Tensor | None, pids: torch.Tensor, mining: str
) -> None:
    if mining not in MINING:
        raise ValueError(f"mining={mining!r}: expected one of {MINING}")
    if local.dim() != 3 or pids.shape != local.shape[:1]:
        raise ValueError(
            f"expected local features (B, S, C) and pids (B,), got {tuple(local.shape)} and "
            f"{tuple(pids.shape)}"
        )
    if mining == "global":
        if global_feats is None:
            raise ValueError("mining='global' needs the global features (B, D), got None")
        if global_feats.dim() != 2 or global_feats.shape[0] != local.shape[0]:
            raise ValueError(
                f"expected global features (B, D) with B = {local.shape[0]} as the local "
                f"features, got {tuple(global_feats.shape)}"
            )


def _local_triplet_terms(
    anchor_local: torch.Tensor,
    anchor_global: torch.Tensor | None,
    anchor_pids: torch.Tensor,
    anchor_index: torch.Tensor,
    cand_local: torch.Tensor,
    cand_global: torch.Tensor | None,
    cand_pids: torch.Tensor,
    margin: float | None,
    mining: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor losses l_a (zero where excluded) and the mask of anchors with a triplet.

    ``anchor_index[i]`` is the row of anchor i among the candidates: it is not its own positive.
    The masks and the hinge are the global triplet's (:func:`hpc_reid.losses.triplet.triplet_masks`,
    :func:`~hpc_reid.losses.triplet.triplet_terms`).
    """
    pos, neg, valid = triplet_masks(anchor_pids, cand_pids, anchor_index)
    if mining == "global":
        with torch.no_grad():
            mined = pairwise_euclidean(anchor_global.float(), cand_global.float())
        local_dist = None
    else:
        local_dist = dmli_matrix(anchor_local, cand_local)
        mined = local_dist.detach()
    # An excluded anchor's argmax / argmin is some arbitrary row; its term is masked out below.
    p = mined.masked_fill(~pos, float("-inf")).argmax(1)
    n = mined.masked_fill(~neg, float("inf")).argmin(1)
    if local_dist is None:
        d_ap = dmli_paired(anchor_local, cand_local[p])
        d_an = dmli_paired(anchor_local, cand_local[n])
    else:
        d_ap = local_dist.gather(1, p.unsqueeze(1)).squeeze(1)
        d_an = local_dist.gather(1, n.unsqueeze(1)).squeeze(1)
    return triplet_terms(d_ap, d_an, valid, margin), valid


def local_triplet_loss(
    local: torch.Tensor,
    global_feats: torch.Tensor | None,
    pids: torch.Tensor,
    margin: float | None,
    mining: str = "global",
    cross_rank: bool = False,
) -> torch.Tensor:
    """Batch-hard triplet loss of one batch on the DMLI distance of ``local`` (B, S, C), the pairs
    mined with ``global_feats`` (B, D) (``mining="global"``) or with the DMLI distance
    (``"local"``, ``global_feats`` unused); ``margin=None`` is the soft margin. The mean over the
    anchors that have a positive and a negative. Computed in float32 at least.
    ``cross_rank=True``: mined over all ranks' batches (:func:`cross_rank_local_triplet_loss`)."""
    if cross_rank:
        return cross_rank_local_triplet_loss(local, global_feats, pids, margin, mining)
    _check(local, global_feats, pids, mining)
    index = torch.arange(local.shape[0], device=local.device)
    terms, valid = _local_triplet_terms(
        local, global_feats, pids, index, local, global_feats, pids, margin, mining
    )
    return terms.sum() / valid.sum().clamp(min=1)


def cross_rank_local_triplet_loss(
    local: torch.Tensor,
    global_feats: torch.Tensor | None,
    pids: torch.Tensor,
    margin: float | None,
    mining: str = "global",
) -> torch.Tensor:
    """:func:`local_triplet_loss` mined over the batches of all ranks; equal, after DDP's
    averaging, to the single-process loss on the concatenated batch, in value and gradient.

    The scheme of :func:`hpc_reid.losses.cross_rank_batch_hard_triplet_loss`, for the same reason:
    one all-gather of local features (with gradient into the local slice), global features
    (mining only: no gradient) and pids; every rank evaluates all W*B anchors' terms, the remote
    ones as ``l - stopgrad(l)`` (zero in value, but their pull on this rank's features is kept),
    and returns (W / n) * the sum, n the anchors with a triplet over all ranks. In a single process
    this is :func:`local_triplet_loss`.
    """
    _check(local, global_feats, pids, mining)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    all_local = all_gather_with_grad(local)
    all_global = all_gather_with_grad(global_feats.detach()) if mining == "global" else None
    all_pids = all_gather_with_grad(pids)
    index = torch.arange(all_local.shape[0], device=local.device)
    terms, valid = _local_triplet_terms(
        all_local, all_global, all_pids, index, all_local, all_global, all_pids, margin, mining
    )
    b = local.shape[0]
    mine = (index >= rank * b) & (index < (rank + 1) * b)
    terms = torch.where(mine, terms, terms - terms.detach())
    return terms.sum() * world / valid.sum().clamp(min=1)
