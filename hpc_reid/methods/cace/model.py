"""CACE-Net's head, ``model.head: cace`` (Jiang et al., arXiv 2009.05250; the released PyTorch
``models/cacenet.py`` and TF ``nets/cacenet/cacenet.py``, /work/shared/methods/cace-net.md).

One embedding head with shared weights for the single map X and the two conditioned halves P0, P1
of every ordered pair (:mod:`hpc_reid.methods.cace.pair_graph`): pooling (``model.cace.pooling``:
concat, [GAP, GMP] -> 2C, the TF release and its yaml; gem, GeM with a learnable exponent starting
at ``model.gem_p`` = 3, the PyTorch yaml), a 1x1 conv to ``model.cace.embedding_dim`` without bias
(a Linear on the pooled vector: the same map) and BN, giving f, f0 and f1. Two classifiers, each
ReLU -> Dropout -> Linear without bias (N(0, 0.001^2)): ``fc`` on f and ``pair_fc``, shared by f0
and f1.

BN runs three times a training step, on f (B), f0 (B^2) and f1 (B^2) with each batch's own
statistics, in that order, as the release's three ``head`` calls (its running statistics are
updated by all three). The triplet reads f before the ReLU (the TF release's ``triplet_logits``,
the one with the paper's numbers; the PyTorch release's in-place ReLU makes its triplet read
ReLU(f), a side effect not followed here). ``model.pooling`` and ``model.neck`` are the ``bnneck``
head's and are not read.

Pairs are formed from the batch the head is given: under DDP, each rank's own (16 images, 256 pairs
on each of 2 GPUs in the paper's recipe), as the authors do per GPU. In eval mode no pair is built:
the retrieval feature is f alone, the released single-image inference with which the authors
report their numbers; :meth:`CaceHead.pair_features` conditions given (query, candidate) maps for
the paper's re-scoring of a top-K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.config import ModelConfig
from hpc_reid.methods.cace.pair_graph import PairGraph, mirrored_pairs
from hpc_reid.models.heads import GeM, RetrievalPart, register_head

#: the training outputs of the pairs, k = i * B + j (pair_graph.pair_index): logits (B^2, #ids) and
#: BN features (B^2, D) of image j conditioned on i (0) and of image i conditioned on j (1)
PAIR_KEYS = ("pair_logits0", "pair_logits1", "pair_feat0", "pair_feat1")


class ConcatPool(nn.Module):
    """[GAP, GMP] of a map, (N, 2C): the TF release's ``pooling_types: [avg, max]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # max pooling's backward, not amax's: a tie's gradient goes to one cell, as the release's
        return torch.cat(
            [F.adaptive_avg_pool2d(x, 1).flatten(1), F.adaptive_max_pool2d(x, 1).flatten(1)], dim=1
        )


def _classifier(dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """ReLU -> Dropout -> Linear(dim, classes, no bias), weights N(0, 0.001^2) (both releases)."""
    linear = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(linear.weight, std=0.001)
    return nn.Sequential(nn.ReLU(), nn.Dropout(dropout), linear)


@register_head("cace")
class CaceHead(nn.Module):
    """Outputs: ``"global"`` and ``"bn"``, both f (B, D) (the triplet and center losses read
    ``global``; evaluation ranks ``bn``); in training also ``"logits"`` = fc(f) and the pairs'
    :data:`PAIR_KEYS`. Retrieval part: ``global``, f (cosine, ``evaluation.metric``)."""

    output_keys = frozenset({"global", "bn", "logits", *PAIR_KEYS})

    def __init__(self, in_channels: int, num_classes: int, cfg: ModelConfig):
        super().__init__()
        cace = cfg.cace
        self.pair_graph = PairGraph(in_channels, cace.attention_dim, cace.pair_chunk)
        if cace.pooling == "concat":
            self.pool: nn.Module = ConcatPool()
            pooled = 2 * in_channels
        else:
            self.pool = GeM(cfg.gem_p)
            pooled = in_channels
        dim = cace.embedding_dim
        self.embedding = nn.Linear(pooled, dim, bias=False)
        nn.init.kaiming_normal_(self.embedding.weight, mode="fan_out")  # the release's conv init
        self.bn = nn.BatchNorm1d(dim)
        self.fc = _classifier(dim, num_classes, cace.dropout)
        self.pair_fc = _classifier(dim, num_classes, cace.dropout)
        self.feature_dim: int = dim
        if cfg.retrieval_feature not in ("bn", "global"):
            raise ValueError(
                f"model.retrieval_feature: {cfg.retrieval_feature!r} is not an output the cace "
                "head ranks with; expected 'bn' or 'global' (both are f)"
            )
        self.retrieval_parts = {"global": RetrievalPart(cfg.retrieval_feature)}
        # what a checkpoint must match beside the backbone's keys (engine.trainer.model_meta)
        self.meta = {
            "head": "cace",
            "embedding_dim": dim,
            "cace_pooling": cace.pooling,
            "attention_dim": self.pair_graph.attention_dim,
        }

    def embed(self, maps: torch.Tensor) -> torch.Tensor:
        """f of (N, C, H, W) maps: pooling, the 1x1 embedding and BN (the shared head)."""
        return self.bn(self.embedding(self.pool(maps)))

    def forward(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.embed(fmap)
        out = {"global": f, "bn": f}
        if not self.training:
            return out
        # pair k = (i, j): X[j] | X[i]; the pairs j < i are the pairs i < j mirrored, so only
        # the i <= j ones go through the graph
        left, right, take0, take1 = mirrored_pairs(fmap.shape[0], fmap.device)
        halves = torch.cat(self.pair_graph(fmap, left, right, reduce=self.pool))
        pooled0, pooled1 = halves[take0], halves[take1]
        f0 = self.bn(self.embedding(pooled0))
        f1 = self.bn(self.embedding(pooled1))
        out.update(
            logits=self.fc(f),
            pair_feat0=f0,
            pair_feat1=f1,
            pair_logits0=self.pair_fc(f0),
            pair_logits1=self.pair_fc(f1),
        )
        return out

    def pair_features(
        self, maps_a: torch.Tensor, maps_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f0, f1), each (M, D): a conditioned on b and b conditioned on a, for the pairs
        (``maps_a[m]``, ``maps_b[m]``) of backbone maps (M or 1, C, H, W) each, one row
        broadcast against M (a query against its candidates). ``a`` takes the left place, as
        image j of a training pair (i, j). The paper's re-scoring distance is
        ||n(f0) - n(f1)||. BN as the head's mode says: eval mode for test-time use."""
        if maps_a.dim() != 4 or maps_a.shape[1:] != maps_b.shape[1:]:
            raise ValueError(
                f"pair_features: expected two stacks of maps (M, C, H, W) of one map shape, got "
                f"{tuple(maps_a.shape)} and {tuple(maps_b.shape)}"
            )
        na, nb = maps_a.shape[0], maps_b.shape[0]
        m = max(na, nb)
        if min(na, nb) != m and min(na, nb) != 1:
            raise ValueError(f"pair_features: {na} and {nb} maps; expected equal counts or one")
        index = torch.arange(m, device=maps_a.device)
        left = index if na == m else torch.zeros_like(index)
        right = na + (index if nb == m else torch.zeros_like(index))
        maps = torch.cat([maps_a, maps_b])
        pooled0, pooled1 = self.pair_graph(maps, left, right, reduce=self.pool)
        return self.bn(self.embedding(pooled0)), self.bn(self.embedding(pooled1))

    def rescore_ranking(self, model, dataset, config, query_rows, gallery_rows, distance, device):
        """The test-time re-scorer evaluation calls when ``evaluation.rescore_k`` > 0 on a head
        that declares one (:mod:`hpc_reid.engine.evaluate`): the paper's conditional re-scoring of
        each query's top-K, :func:`hpc_reid.methods.cace.rescore.rescore_ranking`."""
        from hpc_reid.methods.cace.rescore import rescore_ranking  # it imports this module

        return rescore_ranking(model, dataset, config, query_rows, gallery_rows, distance, device)


def normalized_pair_distance(f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
    """||n(f0) - n(f1)|| row by row (n: L2 normalisation), the distance of a conditioned pair (the
    pair triplet's and the paper's re-scoring); the square is clamped at 1e-12 before the root, as
    :func:`hpc_reid.losses.pairwise_euclidean`, so a pair of equal features has a finite
    gradient."""
    diff = F.normalize(f0, dim=1) - F.normalize(f1, dim=1)
    return diff.pow(2).sum(dim=1).clamp(min=1e-12).sqrt()
