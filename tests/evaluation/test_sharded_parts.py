"""Sharded evaluation of rows of two retrieval parts (a global feature and stripes ranked by a
stand-in part distance) over 2 and 3 gloo processes: identical to one process for global+local,
local and global alone, with uneven and empty shards (the (0, 0) rows an empty shard extracts) and
many exact distance ties; ranks given different distances all raise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_reid.evaluation import RowDistance, evaluate_features
from hpc_reid.evaluation.sharded import evaluate_sharded, ranked_candidates
from tests.evaluation import stripes
from tests.evaluation.stripes import tied_case
from tests.evaluation.test_sharded import _join_gloo, cuts

MAX_RANK = 20
TOPK = 5
DISTANCES = [("global+local", {"local": 0.5}), ("local", None), ("global", None)]
CASES = [
    (seed, metric, q_layout, g_layout, tile)
    for seed, metric in ((0, "cosine"), (1, "euclidean"))
    for q_layout, g_layout, tile in (
        ("even", "first-empty", 1024),
        ("last-heavy", "even", 7),
        ("first-empty", "last-heavy", 16),
    )
]


def _shard(rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    # An empty shard arrives as (0, 0), as engine.evaluate.shard_features makes it.
    return rows[lo:hi] if hi > lo else torch.empty(0, 0)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    _join_gloo(rank, world, store)
    try:
        results = []
        for seed, metric, q_layout, g_layout, tile in CASES:
            q, g, (q_pids, g_pids, q_cams, g_cams) = tied_case(seed, metric)
            qc, gc = cuts(len(q), world, q_layout), cuts(len(g), world, g_layout)
            qs, gs = slice(qc[rank], qc[rank + 1]), slice(gc[rank], gc[rank + 1])
            local = (
                _shard(q, qs.start, qs.stop),
                _shard(g, gs.start, gs.stop),
                q_pids[qs],
                g_pids[gs],
                q_cams[qs],
                g_cams[gs],
            )
            for name, weights in DISTANCES:
                distance = RowDistance(stripes.layout(), name, weights, metric)
                r = evaluate_sharded(*local, metric=distance, max_rank=MAX_RANK, query_tile=tile)
                top = ranked_candidates(*local, num_queries=6, topk=TOPK, metric=distance)
                results.append((r, *top))
        # Ranks given different distances raise together instead of taking different paths.
        name = "global+local" if rank == 0 else "local"
        try:
            evaluate_sharded(*local, metric=RowDistance(stripes.layout(), name))
            error = None
        except ValueError as exc:
            error = str(exc)
        torch.save({"results": results, "error": error}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    tmp = tmp_path_factory.mktemp(f"gloo_parts{world}")
    mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_sharded_rows_of_two_parts_rank_as_one_process_on_every_rank(ranks):
    i = 0
    for seed, metric, *_ in CASES:
        q, g, ids = tied_case(seed, metric)
        for name, weights in DISTANCES:
            distance = RowDistance(stripes.layout(), name, weights, metric)
            single = evaluate_features(q, g, *ids, metric=distance, max_rank=MAX_RANK)
            assert single.valid.any() and not single.valid.all()
            d = distance(q, g).numpy()
            # many exact ties within a query's row: their order is decided by gallery index
            assert np.mean([1 - np.unique(row).size / row.size for row in d]) > 0.1
            for rank in ranks:
                r, columns, distmat = rank["results"][i]
                for field in ("cmc", "ap", "inp", "valid"):
                    np.testing.assert_array_equal(getattr(r, field), getattr(single, field))
                # the candidates of the ranked-list plot hold each query's true top-k
                np.testing.assert_array_equal(distmat, d[:6, columns])
                q_pids, g_pids, q_cams, g_cams = ids
                for t in range(6):
                    kept = np.flatnonzero(~((g_pids == q_pids[t]) & (g_cams == q_cams[t])))
                    want = kept[np.argsort(d[t, kept], kind="stable")[:TOPK]]
                    assert set(want) <= set(columns)
            i += 1


def test_ranks_given_different_distances_all_raise(ranks):
    assert all("different distances" in rank["error"] for rank in ranks)
