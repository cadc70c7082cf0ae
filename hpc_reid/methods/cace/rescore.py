"""CACE-Net's conditional re-scoring at test time, ``evaluation.rescore_k`` (Jiang et al., arXiv
2009.05250, Sec. 3.5 "Model Inference"; /work/shared/methods/cace-net.md, "Test-time procedure").

For each query, its top-K gallery items by the single-image distance (``evaluation.distance`` on the
retrieval rows, ties by gallery index as :mod:`~hpc_reid.evaluation.ranking` breaks them) are
re-ordered by the distance of the conditioned pair, ||n(f0) - n(f1)|| of
:meth:`~hpc_reid.methods.cace.model.CaceHead.pair_features` on the (query, candidate) backbone maps;
positions beyond K keep their order. The top-K is taken over the whole gallery, junk included: which
items are junk needs the query's identity, which a deployed system does not have (the protocol then
drops them from the re-scored list as from any other). The released code does not re-score (its
authors report their numbers with single-image features; issues 2 and 4 of PersonReID-YouReID).

The metrics are exact on the re-scored ranking and come from the same protocol code as every other
path: each query's row holds the final position of every gallery item, which
:func:`~hpc_reid.evaluation.ranking.query_ranks` ranks as it ranks distances.

Scale: no feature map is stored beyond the block at hand. Each rank re-scores its contiguous share
of the queries (:func:`~hpc_reid.evaluation.sharded.shard_range`, the share whose rows it extracted)
against all single-image gallery rows (N x D, gathered as re-ranking does); queries go
``evaluation.rescore_batch`` at a time: their maps once, then the union of their candidates read
from the data set (the test transform, ``loader.backend``), ``rescore_batch`` images a batch, each
batch's maps used for every pair it serves and dropped. A candidate shared by queries of one block
is read once. The per-query results are gathered in rank order and combined on every rank, so the
result does not depend on the number of ranks.

Flip: with ``evaluation.flip_average`` the top-K comes from the flip-averaged rows as the single
image metrics do; the pair distance uses the un-flipped maps (the paper does not say; one pair
graph per pair instead of four).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hpc_reid.config import Config
from hpc_reid.data.datasets import ImageRecord, ReidDataset
from hpc_reid.data.loaders import build_backend_test_loader
from hpc_reid.evaluation import RowDistance
from hpc_reid.evaluation.ranking import QueryRanks, RankResult, combine, query_ranks
from hpc_reid.evaluation.sharded import all_gather_rows, shard_range
from hpc_reid.methods.cace.model import normalized_pair_distance
from hpc_reid.models import inferring


def _maps(model, records: Sequence[ImageRecord], config: Config, device) -> Iterator[torch.Tensor]:
    """Backbone maps (n, C, H, W) of ``records`` in order, ``evaluation.rescore_batch`` images a
    batch, read through the configured test loader (un-flipped)."""
    batch = config.evaluation.rescore_batch
    loader_cfg = config.loader.model_copy(update={"test_batch_size": batch})
    h, w = config.data.height, config.data.width
    for images in build_backend_test_loader(list(records), loader_cfg, h, w, device):
        yield model.backbone(images["images"].to(device, non_blocking=True))


def rescored_positions(order: np.ndarray, pair_distance: np.ndarray) -> np.ndarray:
    """(b, G) float64: the final position of every gallery item of each query, from ``order``
    (b, G), the single-image ranking, and ``pair_distance`` (b, K), the pair distances of its first
    K: those K re-ordered by it (ties keep their single-image order), the rest after them in their
    order. Positions are distinct, so ranking them as distances gives exactly this list."""
    b, num_g = order.shape
    k = pair_distance.shape[1]
    rows = np.arange(b)[:, None]
    final = order.copy()
    final[:, :k] = order[rows, np.argsort(pair_distance, axis=1, kind="stable")]
    positions = np.empty((b, num_g), dtype=np.float64)
    positions[rows, final] = np.arange(num_g, dtype=np.float64)
    return positions


def _pair_distances(
    model,
    queries: Sequence[ImageRecord],
    gallery: Sequence[ImageRecord],
    top: np.ndarray,
    config: Config,
    device,
) -> np.ndarray:
    """(b, K) float64 ||n(f0) - n(f1)|| of each query of the block and its candidates ``top``
    (b, K gallery indices), the candidates' maps computed a batch at a time."""
    head = model.head
    out = np.empty(top.shape, dtype=np.float64)
    if top.size == 0:
        return out
    (query_maps,) = list(_maps(model, queries, config, device))  # one batch: b <= rescore_batch
    needed = np.unique(top)  # sorted, so a batch of maps is a range of slots
    slot = np.searchsorted(needed, top)
    start = 0
    for maps in _maps(model, [gallery[i] for i in needed], config, device):
        stop = start + len(maps)
        for q in range(len(queries)):
            (cols,) = np.nonzero((slot[q] >= start) & (slot[q] < stop))
            if cols.size:
                cand = torch.as_tensor(slot[q, cols] - start, device=device)
                f0, f1 = head.pair_features(query_maps[q : q + 1], maps[cand])
                out[q, cols] = normalized_pair_distance(f0, f1).double().cpu().numpy()
        start = stop
    return out


def rescore_ranking(
    model: torch.nn.Module,
    dataset: ReidDataset,
    config: Config,
    query_rows: torch.Tensor,
    gallery_rows: torch.Tensor,
    distance: RowDistance,
    device: torch.device,
) -> RankResult:
    """The metrics of the conditionally re-scored ranking, the same on every rank.

    ``query_rows``: this rank's contiguous share of the query's single-image rows (its
    :func:`~hpc_reid.evaluation.sharded.shard_range`; (0, 0) when empty); ``gallery_rows``: every
    gallery row (G, W). ``model`` is a backbone and a head with ``pair_features`` (``model.head:
    cace``); ``evaluation.rescore_k`` items are re-scored per query (the whole gallery when it is
    larger), ``evaluation.rescore_batch`` queries and candidate images at a time. The model runs in
    eval mode under ``torch.inference_mode``; its previous mode is restored."""
    ev = config.evaluation
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    share = shard_range(len(dataset.query), rank, world)
    if len(query_rows) != len(share):
        raise ValueError(
            f"rescore_ranking: {len(query_rows)} query rows on rank {rank}, expected its share "
            f"of {len(dataset.query)} queries ({len(share)}: {share.start}..{share.stop})"
        )
    g_pids = np.array([r.pid for r in dataset.gallery])
    g_cams = np.array([r.camid for r in dataset.gallery])
    k = min(ev.rescore_k, len(dataset.gallery))
    parts: list[QueryRanks] = []
    with inferring(model):
        for s in range(share.start, share.stop, ev.rescore_batch):
            e = min(s + ev.rescore_batch, share.stop)
            d = distance(query_rows[s - share.start : e - share.start], gallery_rows)
            order = np.argsort(d.cpu().numpy(), axis=1, kind="stable")  # ties by index
            queries = dataset.query[s:e]
            top = order[:, :k]
            pair = _pair_distances(model, queries, dataset.gallery, top, config, device)
            positions = rescored_positions(order, pair)
            q_pids = np.array([r.pid for r in queries])
            q_cams = np.array([r.camid for r in queries])
            ids = (q_pids, g_pids, q_cams, g_cams)
            parts.append(query_ranks(positions, *ids, backend=ev.backend, query_start=s))
    return combine(_gather(parts), ev.max_rank)


def _gather(parts: list[QueryRanks]) -> QueryRanks:
    """Every rank's per-query results in rank order (query order: the shares are contiguous)."""
    local = (
        QueryRanks.concatenate(parts)
        if parts
        else QueryRanks(np.zeros((0, 1), np.int64), np.zeros(0), np.zeros(0), np.zeros(0, bool))
    )
    table = np.stack(
        [local.first_rank[:, 0].astype(np.float64), local.ap, local.inp, local.valid], axis=1
    )
    rows = torch.cat(all_gather_rows(torch.from_numpy(table))).numpy()
    return QueryRanks(
        first_rank=rows[:, :1].astype(np.int64), ap=rows[:, 1], inp=rows[:, 2], valid=rows[:, 3] > 0
    )
