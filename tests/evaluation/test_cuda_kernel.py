"""The fused CUDA ranker (kernels/rank_fused.cu, hpc_reid/evaluation/ranking_cuda.py).

Without a GPU: the kernel source compiles with nvcc (device code for sm_90 included); the host-side
index math (positives, offsets, histogram to ranks, AP) is exact when the kernel is replaced by a
dense CPU stand-in with the same contract; a kernel that cannot be built gives one warning.
With a GPU (marked ``gpu``): the fused kernel equals a plain stable full sort of its own distances
and the numpy and Cython backends bit for bit, on exact ties, queries without positives, galleries
smaller than max_rank, distractors, more positives than a block's shared histogram, both metrics.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_reid.evaluation import ranking_cuda
from hpc_reid.evaluation.ranking import BACKENDS, QueryRanks, _ranks_numpy
from tests.evaluation.dense_kernel import ClaimsCuda, DenseKernel
from tests.evaluation.reference import (
    assert_within_rank_bounds,
    float32_tolerance,
    float64_distances,
    make_case,
    rank_bounds,
    reference_metrics,
    reference_query,
)

SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "rank_fused.cu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def full_sort_ranks(distmat, q_pids, g_pids, q_cams, g_cams):
    """(first rank, AP, INP) per query from the plain stable full sort of tests/.../reference.py."""
    num_q = distmat.shape[0]
    first, ap, inp = np.zeros(num_q, np.int64), np.full(num_q, np.nan), np.full(num_q, np.nan)
    for q in range(num_q):
        res = reference_query(distmat[q], q_pids[q], q_cams[q], g_pids, g_cams)
        if res is not None:
            matches, ap[q], inp[q] = res
            first[q] = np.flatnonzero(matches)[0] + 1
    return first, ap, inp


def assert_equals_full_sort(ranks: QueryRanks, problem):
    first, ap, inp = full_sort_ranks(*problem)
    assert ranks.first_rank.shape == (len(first), 1) and ranks.first_rank.dtype == np.int64
    np.testing.assert_array_equal(ranks.first_rank[:, 0], first)
    np.testing.assert_array_equal(ranks.valid, first > 0)
    np.testing.assert_allclose(ranks.ap, ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ranks.inp, inp, rtol=0, atol=1e-12)


def assert_bit_identical(a: QueryRanks, b: QueryRanks):
    for field in ("first_rank", "ap", "inp", "valid"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def tied_features(rng, n, dim, levels=3, prototypes=None):
    """Integer-valued features with few distinct values, so that many distances tie exactly; with
    ``prototypes``, every row is a copy of one of them (exact ties for cosine too)."""
    if prototypes is None:
        return torch.from_numpy(rng.integers(0, levels, size=(n, dim)).astype(np.float32))
    return prototypes[torch.from_numpy(rng.integers(0, len(prototypes), size=n))]


def ids_problem(seed, num_q, num_g, num_pids, num_cams=3):
    """Ids from reference.make_case: distractor pid 0, identities seen by one camera only (queries
    without positives), query pids absent from the gallery."""
    _, q_pids, g_pids, q_cams, g_cams = make_case(seed, num_q, num_g, num_pids, num_cams)
    return q_pids, g_pids, q_cams, g_cams


# --- without a GPU ----------------------------------------------------------------------------


def test_rank_fused_cu_compiles_with_nvcc_for_sm90(tmp_path):
    # A real compile of host and device code (ptxas included), with the flags torch's JIT build
    # uses, so that a syntax or type error in the kernel fails CI on machines without a GPU.
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH; the CUDA kernel's compile check needs the CUDA toolkit")
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cmd = [
        nvcc,
        "-c",
        str(SOURCE),
        "-o",
        str(tmp_path / "rank_fused.o"),
        "-std=c++20",  # torch >= 2.10 headers require C++20
        "-arch=sm_90",
        "-Xcompiler",
        "-fPIC",
        "-DTORCH_EXTENSION_NAME=rank_fused_check",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *(f"-I{path}" for path in includes),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "rank_fused.o").stat().st_size > 0
    print(f"nvcc compiled {SOURCE.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("query_tile", [1, 7, 1024])
def test_host_side_with_a_dense_stand_in_kernel_equals_full_sort_and_numpy(metric, query_tile):
    rng = np.random.default_rng(3)
    prototypes = torch.from_numpy(rng.integers(-2, 3, size=(6, 5)).astype(np.float32))
    for seed, (num_q, num_g, num_pids) in enumerate([(30, 200, 10), (9, 4, 3), (20, 150, 3)]):
        qf = tied_features(rng, num_q, 5, prototypes=prototypes)
        gf = tied_features(rng, num_g, 5, prototypes=prototypes)
        ids = ids_problem(seed, num_q, num_g, num_pids)
        qx, q_sq = ranking_cuda._prepare(qf, metric)
        gx, g_sq = ranking_cuda._prepare(gf, metric)
        assert qx.shape[1] == 8 and not qx[:, 5:].any()  # zero-padded to a multiple of BK
        euclidean = metric == "euclidean"
        id_t = [torch.from_numpy(a).long() for a in ids]
        ranks = ranking_cuda._query_ranks(
            DenseKernel, qx, q_sq, gx, g_sq, *id_t, euclidean, query_tile
        )
        problem = (DenseKernel.distmat(qx, gx, q_sq, g_sq, euclidean), *ids)
        assert_equals_full_sort(ranks, problem)
        assert_bit_identical(ranks, _ranks_numpy(*problem))


def test_ap_along_rows_of_equal_length_is_bit_identical_to_the_numpy_backend():
    # ranks_from_sorted averages precisions along rows of a 2-D array; the numpy backend, one row
    # at a time. Both must be NumPy's pairwise sum, for short rows and rows past its 8-way unroll.
    rng = np.random.default_rng(0)
    npos = rng.choice([0, 1, 2, 7, 8, 9, 33, 130, 257], size=400)
    ranks = np.concatenate([np.sort(rng.choice(10**6, p, replace=False)) + 1 for p in npos])
    got = ranking_cuda.ranks_from_sorted(ranks.astype(np.int64), npos)
    starts = np.concatenate(([0], np.cumsum(npos)))
    for q, p in enumerate(npos):
        r = ranks[starts[q] : starts[q + 1]]
        if p == 0:
            assert not got.valid[q] and np.isnan(got.ap[q]) and got.first_rank[q, 0] == 0
            continue
        assert got.ap[q] == np.mean(np.arange(1, p + 1) / r)
        assert got.inp[q] == p / r[-1] and got.first_rank[q, 0] == r[0]


def test_kernel_that_cannot_be_built_warns_once_and_is_none(monkeypatch):
    def fail():
        raise RuntimeError("Error building extension 'hpc_reid_rank_fused'")

    monkeypatch.setattr(ranking_cuda, "_kernel", None)
    monkeypatch.setattr(ranking_cuda, "_load_error", None)
    monkeypatch.setattr(ranking_cuda, "_warned", False)
    monkeypatch.setattr(ranking_cuda, "load_kernel", fail)
    with pytest.warns(RuntimeWarning, match="torch ranker"):
        assert ranking_cuda.fused_kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ranking_cuda.fused_kernel() is None


def test_extension_cache_follows_hpc_reid_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HPC_REID_CACHE", str(tmp_path))
    assert ranking_cuda.extension_dir().parent == tmp_path / "torch_extensions"


# --- with a GPU -------------------------------------------------------------------------------


def kernel_distmat(qf, gf, metric):
    """The fused kernel's own (Q, G) distances, from its pair routine over every pair."""
    qi = torch.arange(len(qf)).repeat_interleave(len(gf))
    gi = torch.arange(len(gf)).repeat(len(qf))
    d = ranking_cuda.pair_distances(qf, gf, qi, gi, metric)
    return d.view(len(qf), len(gf)).cpu().numpy()


# (num_q, num_g, num_pids, dim): tiny galleries; blocks cut at 128 queries / gallery items; more
# than HIST_SMEM = 8192 positives in a block of 128 queries (global-memory histogram, asserted
# below); a deep feature; a ResNet-50 feature (2048).
GPU_PROBLEMS = [
    (9, 4, 3, 3),
    (150, 300, 12, 5),
    (200, 3000, 3, 4),
    (40, 500, 20, 96),
    (60, 700, 20, 2048),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("ties", [True, False], ids=["ties", "continuous"])
@pytest.mark.parametrize("shape", GPU_PROBLEMS, ids=lambda s: "x".join(map(str, s)))
def test_fused_kernel_equals_full_sort_and_cpu_backends_on_its_distances(metric, ties, shape):
    num_q, num_g, num_pids, dim = shape
    rng = np.random.default_rng(num_q + num_g)
    if ties:
        prototypes = torch.from_numpy(rng.integers(-2, 3, size=(8, dim)).astype(np.float32))
        qf = tied_features(rng, num_q, dim, prototypes=prototypes).cuda()
        gf = tied_features(rng, num_g, dim, prototypes=prototypes).cuda()
    else:
        qf = torch.from_numpy(rng.standard_normal((num_q, dim), dtype=np.float32)).cuda()
        gf = torch.from_numpy(rng.standard_normal((num_g, dim), dtype=np.float32)).cuda()
    ids = ids_problem(num_q, num_q, num_g, num_pids)
    if shape == GPU_PROBLEMS[2]:
        q_pids, g_pids, q_cams, g_cams = ids
        kept = (q_pids[:128, None] == g_pids) & (q_cams[:128, None] != g_cams)
        assert kept.sum() > 8192
    problem = (kernel_distmat(qf, gf, metric), *ids)
    for query_tile in (1024, 33):
        ranks = ranking_cuda.query_ranks_cuda(qf, gf, *ids, metric=metric, query_tile=query_tile)
        assert_equals_full_sort(ranks, problem)
        for backend in ("numpy", "cython"):  # declared: an unbuilt Cython kernel fails here
            assert backend in BACKENDS, f"ranking backend {backend!r} is not built"
            assert_bit_identical(ranks, BACKENDS[backend](*problem))


@pytest.mark.gpu
@needs_cuda
def test_fused_kernel_equals_cpu_evaluation_on_exact_integer_euclidean_distances():
    # Integer features: every dot product is exact, so the kernel's distances are the CPU's too.
    from hpc_reid.evaluation import evaluate_features

    rng = np.random.default_rng(1)
    qf, gf = tied_features(rng, 130, 6), tied_features(rng, 260, 6)
    ids = ids_problem(1, 130, 260, 15)
    cpu = evaluate_features(qf, gf, *ids, metric="euclidean", max_rank=50)
    assert ranking_cuda.fused_kernel() is not None, ranking_cuda._load_error  # built (or cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path, not the fallback's warning
        gpu = evaluate_features(qf.cuda(), gf.cuda(), *ids, metric="euclidean", max_rank=50)
    np.testing.assert_array_equal(gpu.cmc, cpu.cmc)
    assert (gpu.mAP, gpu.mINP) == (cpu.mAP, cpu.mINP)
    for field in ("ap", "inp", "valid"):
        np.testing.assert_array_equal(getattr(gpu, field), getattr(cpu, field))


@pytest.mark.gpu
@needs_cuda
def test_gallery_smaller_than_max_rank_through_evaluate_features_cuda():
    rng = np.random.default_rng(2)
    qf, gf = tied_features(rng, 40, 3).cuda(), tied_features(rng, 4, 3).cuda()
    ids = ids_problem(2, 40, 4, 3, num_cams=2)
    result = ranking_cuda.evaluate_features_cuda(qf, gf, *ids, metric="euclidean", max_rank=50)
    cmc, mAP, mINP, _, _, valid = reference_metrics(
        kernel_distmat(qf, gf, "euclidean"), *ids, max_rank=50
    )
    assert valid.any() and not valid.all()
    np.testing.assert_array_equal(result.valid, valid)
    np.testing.assert_allclose(result.cmc, cmc, rtol=0, atol=1e-12)
    assert result.mAP == pytest.approx(mAP, abs=1e-12)
    assert result.mINP == pytest.approx(mINP, abs=1e-12)


@pytest.mark.gpu
@needs_cuda
def test_fused_kernel_rejects_non_finite_features_and_mixed_devices():
    qf, gf = torch.ones(3, 4, device="cuda"), torch.ones(5, 4, device="cuda")
    ids = (np.ones(3), np.ones(5), np.zeros(3), np.ones(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        ranking_cuda.query_ranks_cuda(qf * float("nan"), gf, *ids)
    with pytest.raises(ValueError, match="one device"):
        ranking_cuda.query_ranks_cuda(qf, gf.cpu(), *ids)


# --- float64 reference ------------------------------------------------------------------------

# Stated tolerance of a float32 distance against the float64 one (reference.float32_tolerance):
# the kernel accumulates D products in order with fma; at D = 2048 its error, emulated on the CPU,
# stays under 2 ulps of the distances' scale, and torch.mm's too. 16 leaves room for a GPU's
# normalisation and norm reductions rounding otherwise.
ULPS = 16


def clustered_features(seed, ids, dim, noise=4.0):
    """float32 features of a half-trained model: a random prototype per pid plus Gaussian noise,
    so that positives and negatives overlap (mAP about 0.5-0.65 at D = 2048) without exact ties."""
    q_pids, g_pids, _, _ = ids
    rng = np.random.default_rng(seed)
    proto = rng.standard_normal((int(max(q_pids.max(), g_pids.max())) + 1, dim), dtype=np.float32)
    qf = proto[q_pids] + noise * rng.standard_normal((len(q_pids), dim), dtype=np.float32)
    gf = proto[g_pids] + noise * rng.standard_normal((len(g_pids), dim), dtype=np.float32)
    return torch.from_numpy(qf), torch.from_numpy(gf)


def test_float64_rank_bounds_at_zero_tolerance_are_the_full_sort_reference():
    # The bounds collapse to the exact ranks of the float64 distances when nothing is near a tie.
    ids = ids_problem(4, 30, 200, 8)
    qf, gf = clustered_features(4, ids, 16)
    d64 = float64_distances(qf, gf, "cosine")
    bounds = rank_bounds(d64, 0.0, *ids)
    _, mAP, mINP, ap, inp, valid = reference_metrics(d64, *ids, max_rank=20)
    first = full_sort_ranks(d64, *ids)[0]
    np.testing.assert_array_equal(bounds["valid"], valid)
    np.testing.assert_array_equal(bounds["first_lo"][valid], first[valid])
    np.testing.assert_array_equal(bounds["first_hi"][valid], first[valid])
    np.testing.assert_allclose(bounds["ap_lo"][valid], ap[valid], rtol=1e-12)
    np.testing.assert_allclose(bounds["ap_hi"][valid], ap[valid], rtol=1e-12)
    np.testing.assert_allclose(bounds["inp_hi"][valid], inp[valid], rtol=1e-12)
    assert np.mean(bounds["ap_lo"][valid]) == pytest.approx(mAP, rel=1e-12)
    assert np.mean(bounds["inp_lo"][valid]) == pytest.approx(mINP, rel=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_cpu_float32_evaluation_at_2048_dims_lies_within_the_float64_bounds(metric):
    # The reference the GPU tests below hold the kernel to, checked here on the CPU's float32
    # evaluation (torch.mm distances): it holds, and it is not vacuous (most bounds are tight).
    from hpc_reid.evaluation import evaluate_features

    ids = ids_problem(11, 150, 1200, 40)
    qf, gf = clustered_features(11, ids, 2048)
    d64 = float64_distances(qf, gf, metric)
    bounds = rank_bounds(d64, float32_tolerance(qf, gf, metric, ULPS), *ids)
    result = evaluate_features(qf, gf, *ids, metric=metric, max_rank=50)
    assert assert_within_rank_bounds(result, bounds) > 0.2
    width = np.mean(bounds["ap_hi"] - bounds["ap_lo"], where=bounds["valid"])
    assert 0.2 < result.mAP < 0.9 and width < 0.005


# --- which kernel, if any: the dispatch --------------------------------------------------------


@pytest.fixture
def unbuildable_kernel(monkeypatch):
    def fail():
        raise RuntimeError("Error building extension 'hpc_reid_rank_fused': nvcc exited 1")

    monkeypatch.setattr(ranking_cuda, "_kernel", None)
    monkeypatch.setattr(ranking_cuda, "_load_error", None)
    monkeypatch.setattr(ranking_cuda, "_load_exception", None)
    monkeypatch.setattr(ranking_cuda, "_warned", False)
    monkeypatch.setattr(ranking_cuda, "load_kernel", fail)


def test_kernel_for_cuda_raises_the_build_error_auto_warns_once_cpu_backends_build_nothing(
    unbuildable_kernel, monkeypatch
):
    with pytest.raises(RuntimeError, match=r"could not be built.*nvcc exited 1"):
        ranking_cuda.kernel_for("cuda")
    with pytest.warns(RuntimeWarning, match="torch ranker"):
        assert ranking_cuda.kernel_for("auto") is None
    with pytest.raises(RuntimeError, match="nvcc exited 1"):  # "cuda" stays loud afterwards
        ranking_cuda.kernel_for("cuda")

    def must_not_build():
        raise AssertionError("a CPU backend built the CUDA kernel")

    monkeypatch.setattr(ranking_cuda, "load_kernel", must_not_build)
    monkeypatch.setattr(ranking_cuda, "_load_error", None)
    for backend in ("numpy", "cython", "torch"):
        assert ranking_cuda.kernel_for(backend) is None


def _claims_cuda_problem():
    ids = ids_problem(6, 20, 90, 6)
    qf, gf = clustered_features(6, ids, 12)
    return qf, gf, ids


@pytest.mark.parametrize("where", ["evaluate_features", "evaluate_sharded"])
def test_explicit_cuda_backend_with_an_unbuildable_kernel_raises_instead_of_falling_back(
    unbuildable_kernel, where
):
    from hpc_reid.evaluation import evaluate_features, evaluate_sharded

    qf, gf, ids = _claims_cuda_problem()
    fn = evaluate_features if where == "evaluate_features" else evaluate_sharded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(RuntimeError, match="nvcc exited 1"):
            fn(qf.as_subclass(ClaimsCuda), gf.as_subclass(ClaimsCuda), *ids, backend="cuda")


@pytest.mark.parametrize("where", ["evaluate_features", "evaluate_sharded"])
def test_auto_backend_with_an_unbuildable_kernel_warns_once_and_ranks_exactly(
    unbuildable_kernel, where
):
    from hpc_reid.evaluation import evaluate_features, evaluate_sharded

    qf, gf, ids = _claims_cuda_problem()
    fn = evaluate_features if where == "evaluate_features" else evaluate_sharded
    expected = evaluate_features(qf, gf, *ids, backend="numpy")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        got = fn(qf.as_subclass(ClaimsCuda), gf.as_subclass(ClaimsCuda), *ids, backend="auto")
    for field in ("cmc", "ap", "inp", "valid"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("dim", [96, 2048])
def test_fused_kernel_distances_within_stated_ulps_of_float64_and_metrics_within_its_bounds(
    metric, dim
):
    # Truth independent of the kernel: float64 distances of the same float32 features. Each of
    # the kernel's distances is within ULPS of them, so its ranks can differ from float64's only
    # among items that close; its metrics lie within the bounds that allows (mostly tight).
    from hpc_reid.evaluation import evaluate_features

    ids = ids_problem(11, 150, 1200, 40)
    qf, gf = clustered_features(11, ids, dim)
    delta = float32_tolerance(qf, gf, metric, ULPS)
    d64 = float64_distances(qf, gf, metric)
    err = np.abs(kernel_distmat(qf.cuda(), gf.cuda(), metric) - d64)
    assert err.max() <= delta, f"kernel distance error {err.max():.3g} > {ULPS} ulps ({delta:.3g})"
    bounds = rank_bounds(d64, delta, *ids)
    assert ranking_cuda.fused_kernel() is not None, ranking_cuda._load_error  # so no fallback
    for query_tile in (1024, 64):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*fused CUDA ranking kernel")
            result = evaluate_features(
                qf.cuda(), gf.cuda(), *ids, metric=metric, max_rank=50, query_tile=query_tile
            )
        tight = assert_within_rank_bounds(result, bounds)
        if dim == 2048:  # calibrated on the CPU's float32 evaluation (0.31 euclidean, 0.65 cosine)
            assert tight > 0.2
