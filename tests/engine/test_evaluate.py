"""The trainer's evaluation sharded over two gloo ranks (features never gathered) writes the results
and ranked-list plot of one process."""

from __future__ import annotations

import json

import pytest

from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.trainer import evaluate_checkpoint, train
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
