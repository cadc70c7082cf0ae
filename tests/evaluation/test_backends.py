"""Every ranking backend (numpy, torch, cython, cuda) equals a plain stable full sort, bit for bit
equal to each other, on the protocol's awkward cases: exact ties, queries without a positive,
galleries smaller than max_rank, distractors (pid 0, -1), identities seen by one camera only,
queries with more positives than the Cython kernel's linear-count threshold, float32 and float64."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_reid.evaluation.ranking import BACKENDS, QueryRanks, rank_metrics
from hpc_reid.evaluation.ranking_torch import query_ranks_torch
from tests.evaluation.reference import reference_metrics

TOL = 1e-9
# Declared, not discovered: a backend that is not built (the Cython kernel without
# `pip install -e .`) fails every test named after it instead of dropping out of the list.
CPU_BACKENDS = ["cython", "numpy", "torch"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def full_sort_query_ranks(distmat, q_pids, g_pids, q_cams, g_cams):
    """(first rank, AP, INP) per query from a stable argsort of its whole row (0/NaN: invalid)."""
    num_q = distmat.shape[0]
    first, ap, inp = np.zeros(num_q, np.int64), np.full(num_q, np.nan), np.full(num_q, np.nan)
    for q in range(num_q):
        order = np.argsort(distmat[q], kind="stable")
        kept = order[~((g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q]))]
        hit_ranks = np.flatnonzero(g_pids[kept] == q_pids[q]) + 1  # 1-based, ascending
        if hit_ranks.size == 0:
            continue
        first[q] = hit_ranks[0]
        ap[q] = np.mean(np.arange(1, hit_ranks.size + 1) / hit_ranks)
        inp[q] = hit_ranks.size / hit_ranks[-1]
    return first, ap, inp


def make_problem(seed, num_q, num_g, num_pids, num_cams, ties, dtype):
    """Gallery pids -1..num_pids-1 (-1 and 0: distractors and junk images, never query pids);
    identities with pid % 3 == 1 are seen by camera 0 only, so their camera-0 queries have no
    positive; some query pids are absent from the gallery. ``ties``: distances from {0, .., 3}."""
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(-1, num_pids, size=num_g)
    g_cams = rng.integers(0, num_cams, size=num_g)
    g_cams[g_pids % 3 == 1] = 0
    q_pids = rng.integers(1, num_pids + 2, size=num_q)
    q_cams = rng.integers(0, num_cams, size=num_q)
    if ties:
        distmat = rng.integers(0, 4, size=(num_q, num_g)).astype(dtype)
    else:
        distmat = rng.random((num_q, num_g)).astype(dtype)
    return distmat, q_pids, g_pids, q_cams, g_cams


def assert_equals_full_sort(ranks: QueryRanks, problem):
    first, ap, inp = full_sort_query_ranks(*problem)
    assert ranks.first_rank.shape == (len(first), 1) and ranks.first_rank.dtype == np.int64
    np.testing.assert_array_equal(ranks.first_rank[:, 0], first)
    np.testing.assert_array_equal(ranks.valid, first > 0)
    np.testing.assert_allclose(ranks.ap, ap, rtol=0, atol=TOL)  # NaN where invalid, both sides
    np.testing.assert_allclose(ranks.inp, inp, rtol=0, atol=TOL)


def assert_bit_identical(a: QueryRanks, b: QueryRanks):
    for field in ("first_rank", "ap", "inp", "valid"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


PROBLEMS = [
    # (num_q, num_g, num_pids, num_cams): tiny galleries, Market-like, 16-64 and > 64 positives
    # per query (the Cython kernel counts up to 64 in SIMD lanes, more with binary searches).
    (9, 1, 3, 2),
    (9, 4, 3, 2),
    (30, 40, 8, 3),
    (30, 300, 15, 6),
    (12, 500, 3, 2),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("shape", PROBLEMS, ids=lambda s: "x".join(map(str, s)))
def test_backend_equals_full_stable_sort_and_numpy_bit_for_bit(backend, dtype, ties, shape):
    for seed in range(3):
        problem = make_problem(seed, *shape, ties=ties, dtype=dtype)
        ranks = BACKENDS[backend](*problem)
        assert_equals_full_sort(ranks, problem)
        assert_bit_identical(ranks, BACKENDS["numpy"](*problem))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_cases_include_invalid_queries_and_tiny_galleries_through_rank_metrics(backend):
    # Galleries of 4 items with max_rank 50: CMC past the gallery's end stays at its last value.
    problem = make_problem(0, 40, 4, 3, 2, ties=True, dtype=np.float32)
    result = rank_metrics(*problem, max_rank=50, backend=backend)
    cmc, mAP, mINP, _, _, valid = reference_metrics(*problem, max_rank=50)
    assert valid.any() and not valid.all()
    np.testing.assert_allclose(result.cmc, cmc, rtol=0, atol=TOL)
    assert result.mAP == pytest.approx(mAP, abs=TOL) and result.mINP == pytest.approx(mINP, abs=TOL)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_q=st.integers(1, 10),
    num_g=st.integers(1, 80),
    num_pids=st.integers(1, 5),
    num_cams=st.integers(1, 3),
    levels=st.integers(1, 6),
    use_f32=st.booleans(),
)
def test_every_backend_equals_full_sort_on_small_random_tied_problems(
    seed, num_q, num_g, num_pids, num_cams, levels, use_f32
):
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(0, num_pids, size=num_g)
    g_cams = rng.integers(0, num_cams, size=num_g)
    q_pids = rng.integers(0, num_pids + 1, size=num_q)
    q_cams = rng.integers(0, num_cams + 1, size=num_q)
    distmat = (rng.integers(0, levels, size=(num_q, num_g)) / levels).astype(
        np.float32 if use_f32 else np.float64
    )
    problem = (distmat, q_pids, g_pids, q_cams, g_cams)
    for backend in CPU_BACKENDS:
        assert_equals_full_sort(BACKENDS[backend](*problem), problem)


def test_every_declared_cpu_backend_is_registered():
    assert sorted(name for name in BACKENDS if name != "cuda") == CPU_BACKENDS


def test_cython_kernel_is_built_and_registered():
    # `pip install -e .` compiles it (setup.py); without it "auto" would silently use numpy.
    assert importlib.util.find_spec("hpc_reid.evaluation._rank_cy") is not None
    assert "cython" in BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_reads_strided_and_read_only_matrices(backend):
    problem = make_problem(4, 20, 200, 10, 3, ties=True, dtype=np.float64)
    distmat, *ids = problem
    wide = np.zeros((20, 400))
    wide[:, ::2] = distmat
    read_only = distmat.copy()
    read_only.flags.writeable = False
    for view in (wide[:, ::2], np.asfortranarray(distmat), read_only, distmat.astype(np.float16)):
        expected = full_sort_query_ranks(view.astype(np.float64), *ids)
        ranks = BACKENDS[backend](view, *ids)
        np.testing.assert_array_equal(ranks.first_rank[:, 0], expected[0])


def test_torch_ranker_is_exact_across_row_chunks_and_with_tensor_ids():
    problem = make_problem(5, 25, 300, 6, 3, ties=True, dtype=np.float32)
    distmat, q_pids, g_pids, q_cams, g_cams = problem
    tensor_ids = [torch.from_numpy(a) for a in (q_pids, g_pids, q_cams, g_cams)]
    for chunk in (1, 700, 1 << 24):  # a row at a time, 2 rows, everything
        ranks = query_ranks_torch(torch.from_numpy(distmat), *tensor_ids, chunk_elements=chunk)
        assert_equals_full_sort(ranks, problem)
    with pytest.raises(ValueError, match="g_pids has shape"):
        query_ranks_torch(torch.from_numpy(distmat), q_pids, g_pids[:-1], q_cams, g_cams)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_cuda_backend_equals_full_sort_and_numpy_bit_for_bit(ties):
    assert "cuda" in BACKENDS
    for dtype in (np.float32, np.float64):
        for shape in PROBLEMS:
            problem = make_problem(7, *shape, ties=ties, dtype=dtype)
            ranks = BACKENDS["cuda"](*problem)
            assert_equals_full_sort(ranks, problem)
            assert_bit_identical(ranks, BACKENDS["numpy"](*problem))
            on_gpu = query_ranks_torch(torch.from_numpy(problem[0]).cuda(), *problem[1:])
            assert_bit_identical(on_gpu, ranks)
