"""The trainer's evaluation sharded over two gloo ranks (features never gathered) writes the results
and ranked-list plot of one process; the features are ranked on the device that computed them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpc_reid.data.datasets.base import ImageRecord
from hpc_reid.engine import evaluate
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import train
from hpc_reid.evaluation.ranking import QueryRanks, combine
from tests.engine.test_trainer import _torchrun, tiny_config


@pytest.mark.slow
def test_two_ranks_evaluate_a_checkpoint_as_one_process(tmp_path):
    train(tiny_config(tmp_path, "logging.run_name=x"), max_steps=1)
    checkpoint = CheckpointManager(tmp_path / "runs/x").latest()
    one, two = tmp_path / "one", tmp_path / "two"
    expected = evaluate_checkpoint(checkpoint, out_dir=one)
    proc = _torchrun(2, ["eval", "--checkpoint", str(checkpoint), "--out", str(two)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert b.pop("cmc") == pytest.approx(a.pop("cmc"), abs=1e-6)
    assert b == pytest.approx(a, abs=1e-6)
    assert {k: b[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert (two / "cmc.png").stat().st_size > 0
    # the same top-10 gallery images of the same queries, found without gathering features
    assert (two / "ranked.png").read_bytes() == (one / "ranked.png").read_bytes()


@pytest.mark.slow
def test_rerank_in_evaluation_matches_between_one_and_two_ranks(tmp_path):
    """evaluation.rerank.enabled: re-ranked metrics (each rank gathers features, N x D) plus the
    plain ones under without_rerank/, the same on 2 ranks as on 1 process."""
    from tests.engine.test_trainer import REPO, TINY

    rerank = ["evaluation.rerank.enabled=true", "evaluation.rerank.k1=6", "evaluation.rerank.k2=3"]
    train(tiny_config(tmp_path, "logging.run_name=x"), max_steps=1)
    config = tiny_config(tmp_path, "logging.run_name=x", *rerank)
    checkpoint = CheckpointManager(tmp_path / "runs/x").latest()
    one, two = tmp_path / "one", tmp_path / "two"
    summary = evaluate_checkpoint(checkpoint, config, out_dir=one)
    plain = evaluate_checkpoint(checkpoint, out_dir=tmp_path / "plain")  # its own config: no rerank
    assert {k.removeprefix("without_rerank/"): v for k, v in summary.items() if "/" in k} == (
        pytest.approx(plain)
    )
    assert summary["mAP"] != plain["mAP"]
    sets = [
        f"--set={s}" for s in (*TINY, *rerank, f"data.synthetic.cache_dir={tmp_path / 'cache'}")
    ]
    config_args = ["--config", str(REPO / "configs/synthetic/bot.yaml"), *sets]
    args = ["eval", "--checkpoint", str(checkpoint), "--out", str(two), *config_args]
    proc = _torchrun(2, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert b.pop("cmc") == pytest.approx(a.pop("cmc"), abs=1e-6)
    assert b == pytest.approx(a, abs=1e-6) and a["mAP"] == pytest.approx(summary["mAP"])


def test_flip_averaged_evaluation_reports_the_plain_protocol_beside_it(tmp_path):
    """evaluation.flip_average: the metrics of the flip-averaged features, and under without_flip/
    those of the image-only features from the same pass, equal to evaluating without flip."""
    train(tiny_config(tmp_path, "logging.run_name=x"), max_steps=1)
    checkpoint = CheckpointManager(tmp_path / "runs/x").latest()
    flip = tiny_config(tmp_path, "logging.run_name=x", "evaluation.flip_average=true")
    summary = evaluate_checkpoint(checkpoint, flip, out_dir=tmp_path / "flip")
    plain = evaluate_checkpoint(checkpoint, out_dir=tmp_path / "plain")  # its own config: no flip
    assert {k.removeprefix("without_flip/"): v for k, v in summary.items() if "/" in k} == (
        pytest.approx(plain)
    )
    assert summary["mAP"] != plain["mAP"]
    quiet = tiny_config(
        tmp_path,
        "logging.run_name=x",
        "evaluation.flip_average=true",
        "evaluation.report_without_flip=false",
    )
    alone = evaluate_checkpoint(checkpoint, quiet, out_dir=tmp_path / "alone")
    assert alone == pytest.approx({k: v for k, v in summary.items() if "/" not in k})


@pytest.mark.slow
def test_flip_and_plain_protocols_match_between_one_and_two_ranks(tmp_path):
    from tests.engine.test_trainer import REPO, TINY

    train(tiny_config(tmp_path, "logging.run_name=x"), max_steps=1)
    checkpoint = CheckpointManager(tmp_path / "runs/x").latest()
    flip = tiny_config(tmp_path, "logging.run_name=x", "evaluation.flip_average=true")
    one, two = tmp_path / "one", tmp_path / "two"
    evaluate_checkpoint(checkpoint, flip, out_dir=one)
    sets = [
        f"--set={s}"
        for s in (
            *TINY,
            "evaluation.flip_average=true",
            f"data.synthetic.cache_dir={tmp_path / 'cache'}",
        )
    ]
    args = ["eval", "--checkpoint", str(checkpoint), "--out", str(two)]
    args += ["--config", str(REPO / "configs/synthetic/bot.yaml"), *sets]
    proc = _torchrun(2, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert "without_flip/mAP" in a
    assert b.pop("cmc") == pytest.approx(a.pop("cmc"), abs=1e-6)
    assert b == pytest.approx(a, abs=1e-6)


# --- features stay on their device ("meta" stands in for a GPU: copying it to the host fails) ---


def records(n: int) -> list[ImageRecord]:
    return [ImageRecord(f"{i}.jpg", pid=i % 3, camid=i % 2) for i in range(n)]


@pytest.fixture
def meta_extraction(monkeypatch):
    """The loader and extraction of engine.evaluate replaced: features (n, 4) on the device asked
    for, one row per record, as extract_features now returns them."""
    monkeypatch.setattr(evaluate, "build_backend_test_loader", lambda recs, *args: recs)

    def extract(model, loader, device, flip=False):
        n = len(loader)
        return torch.empty(n, 4, device=device), np.zeros(n), np.zeros(n)

    monkeypatch.setattr(evaluate, "extract_features", extract)


def test_shard_features_keeps_the_features_on_the_device_that_computed_them(
    tmp_path, meta_extraction
):
    config = tiny_config(tmp_path)
    feats = evaluate.shard_features(None, records(5), config, "meta")
    assert feats.device.type == "meta" and feats.dtype == torch.float32 and feats.shape == (5, 4)
    empty = evaluate.shard_features(None, [], config, "meta")
    assert empty.device.type == "meta" and empty.shape == (0, 0)


@pytest.mark.parametrize("world", [1, 2])
def test_evaluate_model_ranks_device_features_with_the_configured_backend(
    tmp_path, meta_extraction, monkeypatch, world
):
    # One process hands its features to evaluate_features, several to evaluate_sharded (world 2
    # faked for rank 0, the collectives replaced by the spy), on the model's device, with
    # evaluation.backend, so that CUDA features reach the fused kernel.
    config = tiny_config(tmp_path, "evaluation.backend=numpy")
    dataset = SimpleNamespace(query=records(6), gallery=records(10))
    seen = {}

    def spy(qf, gf, q_pids, g_pids, q_cams, g_cams, *, metric, max_rank, backend):
        seen.update(devices={qf.device.type, gf.device.type}, backend=backend, sizes=len(qf))
        n = len(q_pids)
        ones = np.ones(n)
        return combine(QueryRanks(np.ones((n, 1), np.int64), ones, ones, ones > 0), max_rank)

    if world == 2:
        monkeypatch.setattr(evaluate.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(evaluate.dist, "get_rank", lambda: 0)
        monkeypatch.setattr(evaluate.dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(evaluate, "evaluate_sharded", spy)
    else:
        monkeypatch.setattr(evaluate, "evaluate_features", spy)
    summary = evaluate.evaluate_model(None, dataset, config, torch.device("meta"))
    assert seen == {"devices": {"meta"}, "backend": "numpy", "sizes": 6 // world}
    assert summary["mAP"] == 1.0
