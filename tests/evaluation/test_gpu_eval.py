"""Evaluation on a GPU, end to end (all ``gpu``-marked; skipped without CUDA).

- The test loader (DALI's when nvidia.dali imports, else torch's) -> ``extract_features`` on CUDA
  -> the features stay on CUDA -> the fused kernel, and its metrics lie within the float64 bounds
  (tests/evaluation/reference.py) that the CPU's Cython result also lies within.
- Re-ranking on CUDA equals re-ranking on the CPU: exactly in float64, within a tolerance in
  float32 (the GPU's matrix products round otherwise, which can move a near-tied neighbour).
- ``evaluate_sharded`` on a 1-rank NCCL group equals ``evaluate_features`` bit for bit, through the
  fused kernel's sharded passes, its gathers staying on the GPU.

The first two go through the engine, whose config needs pydantic; they import it inside (and skip
where it is not installed, as on a GPU machine it was not carried to), so that the evaluation
tests, which need no config, still run there.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hpc_reid.evaluation import evaluate_features, evaluate_sharded, ranking_cuda, sharded_fused
from hpc_reid.evaluation.rerank import rerank_blocks
from hpc_reid.evaluation.sharded import all_gather_rows
from tests.evaluation.reference import (
    assert_within_rank_bounds,
    float32_tolerance,
    float64_distances,
    rank_bounds,
)
from tests.evaluation.test_cuda_kernel import ULPS, clustered_features, ids_problem
from tests.ports import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FIELDS = ("cmc", "ap", "inp", "valid")


def _engine():
    """(hpc_reid.engine.evaluate, tests' tiny_config); skips the calling test without pydantic."""
    pytest.importorskip("pydantic", reason="hpc_reid.config needs pydantic (not installed here)")
    from hpc_reid.engine import evaluate
    from tests.engine.test_trainer import tiny_config

    return evaluate, tiny_config


def assert_same_bits(a, b):
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert (a.mAP, a.mINP) == (b.mAP, b.mINP)


@pytest.fixture
def fused_calls(monkeypatch):
    """The single-process fused kernel's evaluations: (query features, gallery features, result);
    the spy calls the real one."""
    calls = []
    real = ranking_cuda.evaluate_features_cuda

    def spy(qf, gf, *args, **kwargs):
        result = real(qf, gf, *args, **kwargs)
        calls.append((qf, gf, result))
        return result

    monkeypatch.setattr(ranking_cuda, "evaluate_features_cuda", spy)
    return calls


def test_loader_to_fused_kernel_on_cuda_features_within_float64_bounds(tmp_path, fused_calls):
    evaluate, tiny_config = _engine()
    from hpc_reid.data.build import dataset_on_ranks
    from hpc_reid.models import build_model

    loader = "dali" if importlib.util.find_spec("nvidia.dali") else "torch"
    config = tiny_config(tmp_path, f"loader.backend={loader}", "engine.device=cuda")
    dataset = dataset_on_ranks(config.data, True)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = build_model(config.model, dataset.num_train_pids).to(device)
    assert ranking_cuda.fused_kernel() is not None, ranking_cuda._load_error
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fused CUDA ranking kernel")  # no fallback
        summary = evaluate.evaluate_model(model, dataset, config, device)
    # The features evaluate_model extracted reached the fused kernel on the GPU, float32.
    assert len(fused_calls) == 1
    qf, gf, gpu = fused_calls[0]
    assert qf.is_cuda and gf.is_cuda and qf.dtype == gf.dtype == torch.float32
    assert (len(qf), len(gf)) == (len(dataset.query), len(dataset.gallery))
    assert summary["mAP"] == gpu.mAP and summary["rank-1"] == gpu.cmc[0]
    ids = [
        np.array([r.pid for r in dataset.query]),
        np.array([r.pid for r in dataset.gallery]),
        np.array([r.camid for r in dataset.query]),
        np.array([r.camid for r in dataset.gallery]),
    ]
    metric, max_rank = config.evaluation.metric, config.evaluation.max_rank
    qh, gh = qf.cpu(), gf.cpu()
    cpu = evaluate_features(qh, gh, *ids, metric=metric, max_rank=max_rank, backend="cython")
    # Both are float32 rankings of the same features (the kernel's distances and torch.mm's):
    # each lies within the bounds of the float64 distances at the stated tolerance.
    delta = float32_tolerance(qh.numpy(), gh.numpy(), metric, ULPS)
    bounds = rank_bounds(float64_distances(qh.numpy(), gh.numpy(), metric), delta, *ids)
    assert bounds["valid"].any()
    assert_within_rank_bounds(gpu, bounds)
    assert_within_rank_bounds(cpu, bounds)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reranking_on_cuda_equals_reranking_on_the_cpu(tmp_path, dtype, metric):
    evaluate, tiny_config = _engine()
    ids = ids_problem(21, 60, 400, 25)
    qf, gf = clustered_features(21, ids, 64, noise=2.0)
    qf, gf = qf.to(dtype), gf.to(dtype)
    k1, k2, lam = 12, 4, 0.3
    config = tiny_config(
        tmp_path,
        "evaluation.rerank.enabled=true",
        f"evaluation.rerank.k1={k1}",
        f"evaluation.rerank.k2={k2}",
        f"evaluation.rerank.lambda_value={lam}",
        f"evaluation.metric={metric}",
    )
    cpu_blocks = dict(rerank_blocks(qf, gf, k1, k2, lam, metric=metric, tile=16))
    gpu_blocks = dict(rerank_blocks(qf.cuda(), gf.cuda(), k1, k2, lam, metric=metric, tile=16))
    assert all(b.is_cuda for b in gpu_blocks.values()) and cpu_blocks.keys() == gpu_blocks.keys()
    diff = max(float((gpu_blocks[s].cpu() - cpu_blocks[s]).abs().max()) for s in cpu_blocks)
    cpu = evaluate._reranked(qf, gf, *ids, config, torch.device("cpu"))
    gpu = evaluate._reranked(qf.cuda(), gf.cuda(), *ids, config, torch.device("cuda"))
    np.testing.assert_array_equal(gpu.valid, cpu.valid)
    if dtype == torch.float64:  # rounding at 1e-16 decides no neighbour and no rank here
        assert diff < 1e-9
        for field in ("cmc", "ap", "inp"):
            np.testing.assert_allclose(getattr(gpu, field), getattr(cpu, field), rtol=0, atol=1e-9)
    else:  # a near-tied neighbour may change one row's sets: the metrics move little
        assert abs(gpu.mAP - cpu.mAP) < 0.01 and abs(gpu.mINP - cpu.mINP) < 0.01
        assert np.abs(gpu.cmc - cpu.cmc).max() <= 2 / cpu.valid.sum() + 1e-12


@pytest.fixture
def nccl_group():
    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_nccl_evaluate_sharded_equals_evaluate_features_through_the_fused_kernel(
    nccl_group, monkeypatch
):
    calls = []
    real = sharded_fused.fused_tile_ranks

    def spy(kernel, shards, qf, gf, *args):
        calls.append((shards.comm.device.type, qf.device.type, gf.device.type))
        return real(kernel, shards, qf, gf, *args)

    monkeypatch.setattr(sharded_fused, "fused_tile_ranks", spy)
    ids = ids_problem(31, 300, 2000, 60)
    qf, gf = clustered_features(31, ids, 256)
    qf, gf = qf.cuda(), gf.cuda()
    x = torch.arange(6, device="cuda").view(3, 2)
    assert all_gather_rows(x, device=x.device)[0].is_cuda  # NCCL gathers stay on the GPU
    for metric in ("cosine", "euclidean"):
        for query_tile in (1024, 70):
            got = evaluate_sharded(
                qf, gf, *ids, metric=metric, query_tile=query_tile, backend="cuda"
            )
            want = evaluate_features(qf, gf, *ids, metric=metric, query_tile=query_tile)
            assert_same_bits(got, want)
    assert calls == [("cuda", "cuda", "cuda")] * 4
