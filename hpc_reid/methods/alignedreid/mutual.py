"""AlignedReID's mutual learning: K models of one architecture trained together, each pulled
toward its peers (Zhang et al., arXiv 1711.08184, Sec. 3.3, after Deep Mutual Learning: Zhang,
Xiang, Hospedales and Lu, CVPR 2018), as huanghoujing's reproduction computes it
(script/experiment/train_ml.py; its README runs K = 2 with weights pm 0, gdm 1, ldm 0, and reports
Market rank-1/mAP 87.05/71.38 -> 88.78/75.76 for its triplet-only global model).

For member i of K, its peers j != i entering as constants (detached), over a batch of N images:

    pm_i  = sum_{j != i} KL(p_j || p_i) / ((K - 1) N)              (loss.mutual_prob)
    gdm_i = sum_{j != i} sum_ab (D_i - D_j)_ab^2 / ((K - 1) N^2)   (loss.mutual_global)
    ldm_i = the same on the DMLI matrices L_i                      (loss.mutual_local)

with p the softmax of the ID logits (the KL summed over the batch, then divided by N), D the N x N
euclidean distances of the ``global`` output (the triplet loss's feature) and L the N x N DMLI
distances of the ``local`` stripes (:func:`dmli_matrix`). The reference computes L only when its
local loss mines with the local distance; here it is computed for the term, whichever mining.

One model and one optimizer stand for the reference's K models and K optimizers. The objective
is sum_i loss_i, loss_i being member i's own losses plus its weighted mutual terms. Member i's
parameters enter loss_i alone, every other loss_j seeing member i's outputs only as detached
constants, so d(sum_k loss_k) / d theta_i = d loss_i / d theta_i: each member receives the
gradient its own optimizer receives in the reference, where all members also run forward on the
same batch before any of them steps. Adam and SGD update each parameter from its own gradient and
state, so one optimizer over all the members with one setting takes the reference's K steps (the
exception: ``engine.grad_clip`` clips the norm over all members together). The terms' values and
this equality are checked against direct computations in tests/methods/test_mutual.py.

Under DDP the distance matrices are those of each rank's batch (N = the rank's images), like the
triplet loss without ``cross_rank``; on one rank they are the reference's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.losses import ReidLoss, pairwise_euclidean, register_loss
from hpc_reid.methods.alignedreid.dmli import dmli_matrix


def _check_members(name: str, values: Sequence[torch.Tensor]) -> tuple[int, int]:
    if len(values) < 2:
        raise ValueError(f"{name}: mutual learning needs 2 members or more, got {len(values)}")
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"{name}: the members' inputs differ in shape: {sorted(shapes)}")
    return len(values), values[0].shape[0]


def mutual_probability_loss(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i pm_i for the members' (N, classes) ID logits (module docstring)."""
    k, n = _check_members("mutual_probability_loss", logits)
    log_p = [F.log_softmax(x, dim=1) for x in logits]
    total = sum(
        F.kl_div(log_p[i], log_p[j].detach(), reduction="sum", log_target=True)
        for i in range(k)
        for j in range(k)
        if j != i
    )
    return total / ((k - 1) * n)


def mutual_distance_loss(distances: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i gdm_i (or ldm_i) for the members' (N, N) distance matrices of one batch."""
    k, n = _check_members("mutual_distance_loss", distances)
    total = sum(
        (distances[i] - distances[j].detach()).pow(2).sum()
        for i in range(k)
        for j in range(k)
        if j != i
    )
    return total / ((k - 1) * n * n)


class _MutualTerm:
    """A loss term reading every member's outputs: :class:`ReidLoss` calls it once with the list
    of the members' outputs dicts (``reads_members``) instead of once per member."""

    reads_members = True

    def __init__(self, key: str, loss: Callable[[list[torch.Tensor]], torch.Tensor]):
        self.key, self.loss = key, loss

    def __call__(self, members: Sequence[dict[str, torch.Tensor]], pids: torch.Tensor):
        return self.loss([m[self.key] for m in members])


@register_loss("mutual_prob", inputs=("logits",))
def _mutual_prob(section, num_classes: int, feature_dim: int) -> _MutualTerm:
    return _MutualTerm("logits", mutual_probability_loss)


@register_loss("mutual_global", inputs=("global",))
def _mutual_global(section, num_classes: int, feature_dim: int) -> _MutualTerm:
    return _MutualTerm(
        "global", lambda feats: mutual_distance_loss([pairwise_euclidean(f, f) for f in feats])
    )


@register_loss("mutual_local", inputs=("local",))
def _mutual_local(section, num_classes: int, feature_dim: int) -> _MutualTerm:
    return _MutualTerm(
        "local", lambda stripes: mutual_distance_loss([dmli_matrix(s, s) for s in stripes])
    )


class _MembersHead:
    """Member 0's head as the trainer reads it (``model.head.meta``, ...), its ``meta`` gaining
    ``members``: a checkpoint of another member count is refused as another model."""

    def __init__(self, head: nn.Module, members: int):
        self._head = head
        self.meta: dict[str, Any] = {**getattr(head, "meta", {}), "members": members}

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_head":  # copy/pickle probes, before __init__
            raise AttributeError(name)
        return getattr(self._head, name)


class MutualModel(nn.Module):
    """``model.members`` models of one architecture (:func:`hpc_reid.models.build_model` builds
    them one after another from the seeded generator, so each has its own initial weights; with
    ``model.pretrained`` the backbones start equal, as in the reference, and the heads differ).

    Training mode: every member runs on the batch, and the outputs are one flat dict of tensors,
    member 0's under their own keys and member i's under ``members.<i>.<key>``
    (:meth:`ReidLoss.member_key`; :class:`ReidLoss` splits them back). Flat, because the trainer
    casts ``{k: v.float() for k, v in outputs.items()}``, which needs a tensor under every key,
    and because DDP (searching the outputs for tensors with ``find_unused_parameters``, or
    routing them through its sink under ``static_graph``) and torch.compile see into plain dicts
    of tensors, not into a container class of ours. ``output_keys`` names every one of them; the
    loss terms' inputs are checked against member 0's (every member has the same).

    Eval mode: member 0's outputs alone, so member 0 is the model evaluated, extracted and
    exported (at one model's cost); ``retrieval_parts``, ``feature_dim`` and ``head`` are member
    0's, ``head.meta`` gaining ``members``. (The reference evaluates every member; with one
    recipe and different initial weights they are alike, and one of them is what a user deploys.)
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a MutualModel needs 2 members or more, got {len(members)}")
        first = members[0]
        for i, m in enumerate(members[1:], 1):
            if m.output_keys != first.output_keys or m.retrieval_parts != first.retrieval_parts:
                raise ValueError(f"member {i} differs from member 0 in its outputs or parts")
        self.members = nn.ModuleList(members)

    @property
    def output_keys(self) -> frozenset[str]:
        keys = self.members[0].output_keys
        return frozenset(ReidLoss.member_key(i, k) for i in range(len(self.members)) for k in keys)

    @property
    def retrieval_parts(self):
        return self.members[0].retrieval_parts

    @property
    def feature_dim(self) -> int:
        return self.members[0].feature_dim

    @property
    def head(self) -> _MembersHead:
        return _MembersHead(self.members[0].head, len(self.members))

    def retrieval_feature(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.members[0].retrieval_feature(outputs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.training:
            return self.members[0](x)
        outputs: dict[str, torch.Tensor] = {}
        for i, member in enumerate(self.members):
            outputs.update({ReidLoss.member_key(i, k): v for k, v in member(x).items()})
        return outputs
