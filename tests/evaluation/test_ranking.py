import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_reid.evaluation.ranking import (
    BACKENDS,
    QueryRanks,
    combine,
    query_ranks,
    rank_metrics,
)
from tests.evaluation.reference import (
    make_case,
    reference_cuhk03_cmc,
    reference_metrics,
)

TOL = 1e-9


def assert_matches_reference(result, case, max_rank):
    cmc, mAP, mINP, ap, inp, valid = reference_metrics(*case, max_rank)
    assert result.cmc.dtype == np.float64 and result.cmc.shape == (max_rank,)
    np.testing.assert_array_equal(result.valid, valid)
    np.testing.assert_allclose(result.cmc, cmc, rtol=0, atol=TOL)
    np.testing.assert_allclose(result.ap, ap, rtol=0, atol=TOL)  # NaN where invalid, both sides
    np.testing.assert_allclose(result.inp, inp, rtol=0, atol=TOL)
    assert result.mAP == pytest.approx(mAP, abs=TOL)
    assert result.mINP == pytest.approx(mINP, abs=TOL)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("num_g", [7, 40, 300], ids=["g7", "g40", "g300"])
def test_rank_metrics_equal_full_stable_sort_reference(seed, ties, num_g):
    case = make_case(seed, num_g=num_g, ties=ties)
    result = rank_metrics(*case, max_rank=50)
    assert_matches_reference(result, case, 50)
    assert not result.valid.all(), "the cases should include queries without a positive"


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_q=st.integers(1, 12),
    num_g=st.integers(1, 60),
    num_pids=st.integers(1, 6),
    num_cams=st.integers(1, 3),
    levels=st.integers(1, 5),
    max_rank=st.integers(1, 70),
)
def test_rank_metrics_equal_reference_on_small_random_tied_problems(
    seed, num_q, num_g, num_pids, num_cams, levels, max_rank
):
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(0, num_pids, size=num_g)
    g_cams = rng.integers(0, num_cams, size=num_g)
    q_pids = rng.integers(0, num_pids, size=num_q)
    q_cams = rng.integers(0, num_cams + 1, size=num_q)
    q_pids[0], q_cams[0] = g_pids[0], num_cams  # a camera absent from the gallery: valid
    distmat = rng.integers(0, levels, size=(num_q, num_g)).astype(np.float64) / levels
    case = (distmat, q_pids, g_pids, q_cams, g_cams)
    assert_matches_reference(rank_metrics(*case, max_rank=max_rank), case, max_rank)


def test_rank_metrics_hand_computed_example():
    # Gallery 0..5; query pid 1 camera 0. Item 2 is junk (pid 1, camera 0). Items 1 and 4 are
    # positives; item 3 ties with positive 1 at 0.2 but has a larger index, so it ranks after.
    distmat = np.array([[0.1, 0.2, 0.0, 0.2, 0.2, 0.9]])
    g_pids = np.array([5, 1, 1, 7, 1, 8])
    g_cams = np.array([1, 1, 0, 1, 2, 1])
    r = rank_metrics(distmat, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=6)
    # Kept order: 0 (neg), 1 (pos, rank 2), 3 (neg), 4 (pos, rank 4), 5 (neg).
    np.testing.assert_array_equal(r.cmc, [0, 1, 1, 1, 1, 1])
    assert r.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert r.mINP == pytest.approx(2 / 4)


def test_invalid_queries_get_nan_and_are_left_out_of_the_means():
    distmat = np.array([[0.5, 0.1], [0.3, 0.4]])
    g_pids, g_cams = np.array([1, 2]), np.array([0, 0])
    r = rank_metrics(distmat, np.array([1, 2]), g_pids, np.array([1, 0]), g_cams, max_rank=3)
    np.testing.assert_array_equal(r.valid, [True, False])
    assert np.isnan(r.ap[1]) and np.isnan(r.inp[1])
    assert r.mAP == pytest.approx(0.5) and r.mINP == pytest.approx(0.5)
    np.testing.assert_array_equal(r.cmc, [0, 1, 1])


def test_summary_reports_ranks_within_max_rank_only():
    case = make_case(0)
    assert list(rank_metrics(*case, max_rank=7).summary()) == ["rank-1", "rank-5", "mAP", "mINP"]
    summary = rank_metrics(*case, max_rank=50).summary()
    assert list(summary) == ["rank-1", "rank-5", "rank-10", "rank-20", "mAP", "mINP"]
    assert all(isinstance(v, float) for v in summary.values())


def test_auto_backend_is_the_fastest_registered_and_unknown_backend_names_the_choices():
    case = make_case(1, ties=True)
    auto, numpy_ = rank_metrics(*case, backend="auto"), rank_metrics(*case, backend="numpy")
    np.testing.assert_array_equal(auto.cmc, numpy_.cmc)
    np.testing.assert_array_equal(auto.ap, numpy_.ap)
    assert {"numpy", "torch"} <= set(BACKENDS) <= {"numpy", "torch", "cython", "cuda"}
    with pytest.raises(ValueError, match=r"'fortran'.*available: auto, numpy, torch"):
        rank_metrics(*case, backend="fortran")


def test_auto_without_the_built_kernel_warns_once_and_uses_numpy(monkeypatch):
    from hpc_reid.evaluation import ranking

    monkeypatch.setattr(ranking, "_warned_no_kernel", False)
    monkeypatch.setattr(ranking, "BACKENDS", {"numpy": BACKENDS["numpy"]})
    case = make_case(3)
    with pytest.warns(RuntimeWarning, match="Cython ranking kernel .* is not built"):
        result = rank_metrics(*case, backend="auto")
    np.testing.assert_array_equal(result.ap, rank_metrics(*case, backend="numpy").ap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rank_metrics(*case, backend="auto")  # only once per process


def test_bad_inputs_raise_specific_errors():
    distmat, q_pids, g_pids, q_cams, g_cams = make_case(2)
    with pytest.raises(ValueError, match="g_pids has shape"):
        rank_metrics(distmat, q_pids, g_pids[:-1], q_cams, g_cams)
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(np.full_like(distmat, np.nan), q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="no valid query"):
        rank_metrics(distmat, np.full_like(q_pids, 99), g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="max_rank"):
        rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_query_blocks_combine_to_the_whole(seed, ties):
    distmat, q_pids, g_pids, q_cams, g_cams = case = make_case(seed, ties=ties)
    whole = rank_metrics(*case, max_rank=30, cuhk03_old_protocol=True, repeats=3, seed=seed)
    parts = [
        query_ranks(
            distmat[s : s + 5],
            q_pids[s : s + 5],
            g_pids,
            q_cams[s : s + 5],
            g_cams,
            cuhk03_old_protocol=True,
            repeats=3,
            seed=seed,
            query_start=s,
        )
        for s in range(0, len(q_pids), 5)
    ]
    tiled = combine(parts, max_rank=30)
    np.testing.assert_array_equal(tiled.cmc, whole.cmc)
    np.testing.assert_array_equal(tiled.ap, whole.ap)
    assert QueryRanks.concatenate(parts).first_rank.shape == (len(q_pids), 3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("num_g", [15, 200], ids=["g15", "g200"])
def test_cuhk03_old_protocol_equals_reference_with_the_same_draws(seed, ties, num_g):
    case = make_case(seed, num_g=num_g, ties=ties)
    r = rank_metrics(*case, max_rank=20, cuhk03_old_protocol=True, repeats=5, seed=seed + 7)
    cmc = reference_cuhk03_cmc(*case, max_rank=20, repeats=5, seed=seed + 7)
    np.testing.assert_allclose(r.cmc, cmc, rtol=0, atol=TOL)
    # As torchreid's eval_cuhk03, AP (and INP) are those of the full kept gallery.
    _, mAP, mINP, *_ = reference_metrics(*case, max_rank=20)
    assert r.mAP == pytest.approx(mAP, abs=TOL) and r.mINP == pytest.approx(mINP, abs=TOL)


def test_cuhk03_old_protocol_depends_on_the_seed_only_through_the_draws():
    case = make_case(3, num_g=200)
    a = rank_metrics(*case, cuhk03_old_protocol=True, seed=1)
    b = rank_metrics(*case, cuhk03_old_protocol=True, seed=1)
    c = rank_metrics(*case, cuhk03_old_protocol=True, seed=2)
    np.testing.assert_array_equal(a.cmc, b.cmc)
    assert not np.array_equal(a.cmc, c.cmc)
