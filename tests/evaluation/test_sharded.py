"""Sharded exact evaluation on 1, 2 and 3 gloo processes equals a plain full-sort reference and the
single-process evaluate_features, with uneven and empty shards and many exact distance ties."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_reid.evaluation import evaluate_features, ranking_cuda, sharded, sharded_fused
from hpc_reid.evaluation.ranking import combine
from hpc_reid.evaluation.sharded import evaluate_sharded, ranked_candidates, shard_range
from hpc_reid.evaluation.sharded_fused import evaluate_sharded_fused
from tests.evaluation.dense_kernel import ClaimsCuda, DenseKernel
from tests.evaluation.reference import reference_metrics

TOL = 1e-6
MAX_RANK = 20
TOPK = 5


def make_case(seed: int, metric: str, num_q: int = 40, num_g: int = 150):
    """Features whose distances are exact in float32 in any summation order, so that ties are
    real: cosine on {-1, 1}^4 and scaled one-hot vectors (normalised entries 0, 1/2, 1),
    euclidean on integers in [-2, 2]^4. Gallery pid 0 is a distractor; pid 11 is seen by one
    camera only (its queries keep no positive); query pids 12, 13 are absent from the gallery."""
    rng = np.random.default_rng(seed)
    if metric == "cosine":
        signs = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))
        pool = np.concatenate([signs, *(s * np.eye(4) for s in (1, -1, 2, -2, 4))])
        qf = pool[rng.integers(0, len(pool), num_q)]
        gf = pool[rng.integers(0, len(pool), num_g)]
    else:
        qf = rng.integers(-2, 3, size=(num_q, 4)).astype(np.float64)
        gf = rng.integers(-2, 3, size=(num_g, 4)).astype(np.float64)
    g_pids = rng.integers(0, 12, num_g)
    g_cams = rng.integers(0, 3, num_g)
    g_cams[g_pids == 11] = 1
    q_pids = rng.integers(1, 14, num_q)
    q_cams = rng.integers(0, 3, num_q)
    q_pids[:3], q_cams[:3] = [11, 12, 1], [1, 0, 0]
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def reference_distances(qf: np.ndarray, gf: np.ndarray, metric: str) -> np.ndarray:
    """float64 distances (exact for make_case's features, up to the square root) in float32."""
    if metric == "cosine":
        qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
        return (1.0 - qn @ gn.T).astype(np.float32)
    return np.sqrt(((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)).astype(np.float32)


def cuts(n: int, world: int, layout: str) -> list[int]:
    """Shard boundaries: "even" (shard_range), "first-empty" or "last-heavy" (uneven)."""
    if layout == "even":
        return [shard_range(n, r, world).start for r in range(world)] + [n]
    if layout == "first-empty":  # rank 0 holds nothing (when there is another rank)
        return [0, n] if world == 1 else [0] + [n * r // (world - 1) for r in range(world)]
    # last-heavy: every rank but the last holds 3 items (or fewer), the last the rest
    return [min(3 * r, n) for r in range(world)] + [n]


CASES = [
    (seed, metric, q_layout, g_layout, tile)
    for seed, metric in itertools.product(range(3), ("cosine", "euclidean"))
    for q_layout, g_layout, tile in (
        ("even", "first-empty", 1024),
        ("last-heavy", "even", 7),
        ("first-empty", "last-heavy", 16),
    )
]


def _join_gloo(rank: int, world: int, store: str) -> None:
    """A spawned worker's gloo group, one thread (the 2 ranks share the machine's cores)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    _join_gloo(rank, world, store)
    try:
        results = []
        for seed, metric, q_layout, g_layout, tile in CASES:
            qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed, metric)
            qc, gc = cuts(len(qf), world, q_layout), cuts(len(gf), world, g_layout)
            qs, gs = slice(qc[rank], qc[rank + 1]), slice(gc[rank], gc[rank + 1])
            local = (
                torch.from_numpy(qf[qs]).float(),
                torch.from_numpy(gf[gs]).float(),
                q_pids[qs],
                g_pids[gs],
                q_cams[qs],
                g_cams[gs],
            )
            r = evaluate_sharded(*local, metric=metric, max_rank=MAX_RANK, query_tile=tile)
            columns, distmat = ranked_candidates(*local, num_queries=6, topk=TOPK, metric=metric)
            results.append((r, columns, distmat))
        # An input error on one rank is raised on every rank, none waits in a collective.
        bad_pids = np.zeros(5) if rank == world - 1 else np.zeros(0)
        try:
            evaluate_sharded(torch.zeros(0, 4), torch.ones(0, 4), [], bad_pids, [], np.zeros(0))
            error = None
        except ValueError as exc:
            error = str(exc)
        torch.save({"results": results, "error": error}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["world1", "world2", "world3"])
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    tmp = tmp_path_factory.mktemp(f"gloo{world}")
    mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_same_result(r, cmc, mAP, mINP, ap, inp, valid):
    np.testing.assert_array_equal(r.valid, valid)
    np.testing.assert_allclose(r.cmc, cmc, rtol=0, atol=TOL)
    np.testing.assert_allclose(r.ap, ap, rtol=0, atol=TOL)
    np.testing.assert_allclose(r.inp, inp, rtol=0, atol=TOL)
    assert r.mAP == pytest.approx(mAP, abs=TOL) and r.mINP == pytest.approx(mINP, abs=TOL)


def test_sharded_equals_full_sort_reference_and_evaluate_features_on_every_rank(ranks):
    for i, (seed, metric, *_) in enumerate(CASES):
        qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed, metric)
        d = reference_distances(qf, gf, metric)
        expected = reference_metrics(d, q_pids, g_pids, q_cams, g_cams, MAX_RANK)
        assert not expected[-1].all() and expected[-1].any()  # invalid queries, and valid ones
        single = evaluate_features(
            torch.from_numpy(qf).float(),
            torch.from_numpy(gf).float(),
            q_pids,
            g_pids,
            q_cams,
            g_cams,
            metric=metric,
            max_rank=MAX_RANK,
        )
        assert_same_result(single, *expected)
        for rank in ranks:
            r = rank["results"][i][0]
            assert_same_result(r, *expected)
            np.testing.assert_array_equal(r.cmc, single.cmc)  # bit-identical
            np.testing.assert_array_equal(r.ap, single.ap)


def test_ranked_candidates_give_the_true_top_k_of_each_query(ranks):
    for i, (seed, metric, *_) in enumerate(CASES):
        qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed, metric)
        d = reference_distances(qf, gf, metric)
        for rank in ranks:
            columns, distmat = rank["results"][i][1:]
            np.testing.assert_allclose(distmat, d[:6, columns], rtol=0, atol=TOL)
            for q in range(6):
                kept = np.flatnonzero(~((g_pids == q_pids[q]) & (g_cams == q_cams[q])))
                want = kept[np.argsort(d[q, kept], kind="stable")[:TOPK]]
                sub = np.flatnonzero(
                    ~((g_pids[columns] == q_pids[q]) & (g_cams[columns] == q_cams[q]))
                )
                got = columns[sub[np.argsort(distmat[q, sub], kind="stable")[:TOPK]]]
                np.testing.assert_array_equal(got, want)


def test_an_input_error_on_one_rank_is_raised_on_every_rank(ranks):
    if len(ranks) == 1:
        assert "g_pids_local" in ranks[0]["error"]
        return
    errors = [rank["error"] for rank in ranks]
    assert "g_pids_local" in errors[-1]
    assert all(e is not None and "rank(s) [" in e for e in errors[:-1])


def test_single_process_without_process_group_equals_evaluate_features():
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(5, "euclidean", num_q=30, num_g=90)
    qf, gf = torch.from_numpy(qf).float(), torch.from_numpy(gf).float()
    args = (qf, gf, q_pids, g_pids, q_cams, g_cams)
    r = evaluate_sharded(*args, metric="euclidean", max_rank=10, query_tile=4)
    single = evaluate_features(*args, metric="euclidean", max_rank=10)
    np.testing.assert_array_equal(r.cmc, single.cmc)
    np.testing.assert_array_equal(r.ap, single.ap)
    np.testing.assert_array_equal(r.inp, single.inp)


def test_random_continuous_features_equal_evaluate_features():
    rng = np.random.default_rng(0)
    qf = torch.from_numpy(rng.standard_normal((50, 32))).float()
    gf = torch.from_numpy(rng.standard_normal((400, 32))).float()
    q_pids, g_pids = rng.integers(0, 20, 50), rng.integers(0, 20, 400)
    q_cams, g_cams = rng.integers(0, 4, 50), rng.integers(0, 4, 400)
    args = (qf, gf, q_pids, g_pids, q_cams, g_cams)
    for metric in ("cosine", "euclidean"):
        r = evaluate_sharded(*args, metric=metric)
        single = evaluate_features(*args, metric=metric)
        np.testing.assert_allclose(r.ap, single.ap, rtol=0, atol=TOL)
        np.testing.assert_allclose(r.cmc, single.cmc, rtol=0, atol=TOL)


def test_cuhk03_old_protocol_is_refused_with_the_alternative():
    with pytest.raises(NotImplementedError, match="evaluate_features"):
        evaluate_sharded(
            torch.ones(1, 2), torch.ones(1, 2), [1], [1], [0], [1], cuhk03_old_protocol=True
        )


def test_nan_features_are_an_error():
    qf = torch.tensor([[float("nan"), 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_sharded(qf, torch.ones(3, 2), [1], [1, 1, 2], [0], [1, 2, 0])


@pytest.mark.parametrize("direct_max", [0, 10**9], ids=["binary-search", "comparison"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_both_negative_counting_methods_equal_the_reference(monkeypatch, direct_max, metric):
    monkeypatch.setattr(sharded, "DIRECT_MAX_POSITIVES", direct_max)
    for seed in range(3):
        qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(seed, metric, num_g=400)
        d = reference_distances(qf, gf, metric)
        expected = reference_metrics(d, q_pids, g_pids, q_cams, g_cams, MAX_RANK)
        args = (torch.from_numpy(qf).float(), torch.from_numpy(gf).float())
        r = evaluate_sharded(*args, q_pids, g_pids, q_cams, g_cams, metric, MAX_RANK, 9)
        assert_same_result(r, *expected)


# --- the fused kernel's sharded path, with the CPU stand-in kernel ---------------------------


def continuous_case(seed: int, num_q: int = 37, num_g: int = 170):
    """Gaussian features (no exact ties) with make_case's awkward labels."""
    _, _, q_pids, g_pids, q_cams, g_cams = make_case(seed, "euclidean", num_q, num_g)
    rng = np.random.default_rng(seed + 100)
    qf = rng.standard_normal((num_q, 13)).astype(np.float32)
    gf = rng.standard_normal((num_g, 13)).astype(np.float32)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


FUSED_CASES = [*((*c, "exact") for c in CASES), (7, "cosine", "even", "last-heavy", 5, "normal")]
FUSED_CASES += [(8, "euclidean", "first-empty", "even", 1024, "normal")]


def fused_case(seed, metric, kind):
    return make_case(seed, metric) if kind == "exact" else continuous_case(seed)


def _fused_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    _join_gloo(rank, world, store)
    try:
        results = []
        for seed, metric, q_layout, g_layout, tile, kind in FUSED_CASES:
            qf, gf, q_pids, g_pids, q_cams, g_cams = fused_case(seed, metric, kind)
            qc, gc = cuts(len(qf), world, q_layout), cuts(len(gf), world, g_layout)
            qs, gs = slice(qc[rank], qc[rank + 1]), slice(gc[rank], gc[rank + 1])
            local = (torch.from_numpy(qf[qs]).float(), torch.from_numpy(gf[gs]).float())
            local += (q_pids[qs], g_pids[gs], q_cams[qs], g_cams[gs])
            # An empty shard arrives as (0, 0), as engine.evaluate.shard_features makes it.
            local = tuple(
                torch.empty(0, 0) if torch.is_tensor(x) and not len(x) else x for x in local
            )
            results.append(
                evaluate_sharded_fused(
                    DenseKernel, *local, metric=metric, max_rank=MAX_RANK, query_tile=tile
                )
            )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fused_ranks(tmp_path_factory) -> list[list]:
    tmp = tmp_path_factory.mktemp("fused_gloo2")
    mp.spawn(_fused_worker, args=(2, str(tmp / "store"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def stand_in_single_process(qf, gf, q_pids, g_pids, q_cams, g_cams, metric, tile):
    """The single-process fused path (ranking_cuda._query_ranks) with the same stand-in kernel."""
    qx, q_sq = ranking_cuda._prepare(torch.from_numpy(qf).float(), metric)
    gx, g_sq = ranking_cuda._prepare(torch.from_numpy(gf).float(), metric)
    ids = [torch.from_numpy(np.asarray(a)).long() for a in (q_pids, g_pids, q_cams, g_cams)]
    ranks = ranking_cuda._query_ranks(
        DenseKernel, qx, q_sq, gx, g_sq, *ids, metric == "euclidean", tile
    )
    return combine(ranks, MAX_RANK), DenseKernel.distmat(qx, gx, q_sq, g_sq, metric == "euclidean")


def test_fused_sharded_path_on_two_gloo_ranks_equals_the_single_process_kernel_path(fused_ranks):
    # Every rank's result equals, bit for bit, the single-process fused path with the same kernel
    # and the numpy backend on the kernel's distances; on features whose distances are exact it
    # also equals the CPU evaluate_features and the full-sort reference.
    for i, (seed, metric, _, _, tile, kind) in enumerate(FUSED_CASES):
        qf, gf, q_pids, g_pids, q_cams, g_cams = fused_case(seed, metric, kind)
        ids = (q_pids, g_pids, q_cams, g_cams)
        single, distmat = stand_in_single_process(qf, gf, *ids, metric, tile)
        numpy = evaluate_features_on(distmat, ids)
        exact = kind == "exact"
        if exact:
            d = reference_distances(qf, gf, metric)
            expected = reference_metrics(d, *ids, MAX_RANK)
            assert not expected[-1].all() and expected[-1].any()  # invalid queries, and valid ones
            cpu = evaluate_features(
                torch.from_numpy(qf).float(),
                torch.from_numpy(gf).float(),
                *ids,
                metric=metric,
                max_rank=MAX_RANK,
            )
        for rank in fused_ranks:
            r = rank[i]
            for field in ("cmc", "ap", "inp", "valid"):
                np.testing.assert_array_equal(getattr(r, field), getattr(single, field))
                np.testing.assert_array_equal(getattr(r, field), getattr(numpy, field))
                if exact:
                    np.testing.assert_array_equal(getattr(r, field), getattr(cpu, field))
            if exact:
                assert_same_result(r, *expected)


def evaluate_features_on(distmat, ids):
    from hpc_reid.evaluation.ranking import rank_metrics

    return rank_metrics(distmat, *ids, max_rank=MAX_RANK, backend="numpy")


def test_fused_sharded_path_without_process_group_and_nan_features():
    qf, gf, q_pids, g_pids, q_cams, g_cams = continuous_case(3)
    args = (torch.from_numpy(qf), torch.from_numpy(gf), q_pids, g_pids, q_cams, g_cams)
    single, _ = stand_in_single_process(qf, gf, q_pids, g_pids, q_cams, g_cams, "cosine", 8)
    r = evaluate_sharded_fused(DenseKernel, *args, max_rank=MAX_RANK, query_tile=8)
    np.testing.assert_array_equal(r.ap, single.ap)
    np.testing.assert_array_equal(r.cmc, single.cmc)
    bad = args[0].clone()
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf .* rank\(s\) \[0\]"):
        evaluate_sharded_fused(DenseKernel, bad, *args[1:])


def test_cuda_features_go_to_the_fused_sharded_path_equal_to_the_fused_single_process_path(
    monkeypatch,
):
    # The dispatch of evaluate_sharded and evaluate_features for CUDA features, with the stand-in
    # kernel as the built extension and tensors that claim CUDA: both reach the fused paths and
    # agree bit for bit (what the gpu test does with the real kernel on a 1-rank NCCL group).
    monkeypatch.setattr(ranking_cuda, "kernel_for", lambda backend: DenseKernel)
    monkeypatch.setattr(ranking_cuda, "require_kernel", lambda: DenseKernel)
    calls = []
    real = sharded_fused.fused_tile_ranks

    def spy(kernel, *args):
        calls.append(kernel)
        return real(kernel, *args)

    monkeypatch.setattr(sharded_fused, "fused_tile_ranks", spy)
    qf, gf, *ids = continuous_case(9)
    qf, gf = (torch.from_numpy(f).as_subclass(ClaimsCuda) for f in (qf, gf))
    for metric, tile in (("cosine", 1024), ("euclidean", 6)):
        got = evaluate_sharded(qf, gf, *ids, metric=metric, query_tile=tile, backend="cuda")
        want = evaluate_features(qf, gf, *ids, metric=metric, query_tile=tile, backend="cuda")
        for field in ("cmc", "ap", "inp", "valid"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert calls == [DenseKernel, DenseKernel]
