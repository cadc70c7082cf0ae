"""bench/seed_spread.py: the mean ± std over seeds against a direct numpy computation (a missing
seed listed, never averaged in), and two seeds of the tiny synthetic job end to end (the seed
reaches each run, a finished seed is skipped on a second call)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.tiny import TINY_BATCH, TINY_DATA

REPO = Path(__file__).resolve().parents[2]
METRICS = ("rank-1", "rank-5", "rank-10", "mAP", "mINP")


@pytest.fixture
def ss(bench_script):
    return bench_script("seed_spread")


def test_aggregate_equals_a_direct_numpy_mean_and_sample_std_over_seeds(ss):
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2, 3, 4, 5]
    results = {
        s: {**{m: float(rng.uniform(0.2, 0.9)) for m in METRICS}, "seconds": rng.uniform(60, 600)}
        for s in seeds
        if s != 3
    }
    summary = ss.aggregate(results, seeds)

    have = [0, 1, 2, 4, 5]
    assert summary["missing"] == [3]
    assert list(summary["per_seed"]) == [str(s) for s in have]
    for m in [*METRICS, "seconds"]:
        x = np.array([results[s][m] for s in have])
        got = summary["seconds"] if m == "seconds" else summary["stats"][m]
        assert got["n"] == len(have)
        assert got["mean"] == pytest.approx(x.sum() / len(x), abs=1e-12)
        var = ((x - x.mean()) ** 2).sum() / (len(x) - 1)
        assert got["std"] == pytest.approx(np.sqrt(var), abs=1e-12)
    table = ss.markdown(summary)
    r1 = summary["stats"]["rank-1"]
    assert f"{100 * r1['mean']:.1f} ± {100 * r1['std']:.1f}" in table
    assert "Missing seeds: 3" in table


def test_two_seeds_of_the_tiny_job_run_with_their_seed_and_resume(ss, tmp_path, capsys):
    sets = [
        *TINY_DATA,
        *TINY_BATCH,
        "schedule.epochs=1",
        "schedule.milestones=[1]",
        "schedule.warmup_epochs=0",
        "evaluation.at_start=false",
        "evaluation.every_epochs=0",
        "logging.checkpoint_every=0",
        "data.synthetic.cache_dir=" + str(tmp_path / "cache"),
    ]
    argv = ["--config", str(REPO / "configs/synthetic/bot.yaml"), "--seeds", "0", "1"]
    argv += [f"--set={s}" for s in sets] + ["--out", str(tmp_path / "out"), "--parallel", "2"]
    assert ss.main(argv) == 0

    for s in (0, 1):
        folder = tmp_path / "out" / f"seed{s}"
        resolved = yaml.safe_load((folder / "config.yaml").read_text())
        assert resolved["engine"]["seed"] == s
        assert resolved["data"]["synthetic"]["seed"] == 0  # the data set stays the same
        assert json.loads((folder / "run.json").read_text())["threads"] == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    r1 = [summary["per_seed"][s]["rank-1"] for s in ("0", "1")]
    assert summary["stats"]["rank-1"]["mean"] == pytest.approx(np.mean(r1))
    for s in ("0", "1"):  # flip-averaged by default, the image-only protocol beside it
        results = json.loads((tmp_path / "out" / f"seed{s}" / "results.json").read_text())
        assert summary["per_seed"][s]["without_flip/mAP"] == results["without_flip/mAP"]
    assert "without_flip/rank-1" in summary["metrics"]
    assert summary["missing"] == []

    capsys.readouterr()
    assert ss.main(argv) == 0  # resumed: nothing left to run
    assert "0 to run" in capsys.readouterr().out


def test_seed_placeholder_in_an_override_names_each_seeds_own_stage_1(ss, tmp_path):
    """A stage-2 config over seeds: ``{seed}`` in an override becomes the run's seed, so each
    stage 2 starts from the stage 1 of the same seed."""
    config = REPO / "configs/synthetic/anchor_stage2.yaml"
    for seed in (0, 3):
        argv = ss.run_argv(config, seed, tmp_path, ["model.init_from=stage1/seed{seed}"])
        assert f"--set=model.init_from=stage1/seed{seed}" in argv
        assert f"--set=engine.seed={seed}" in argv


def test_each_seed_resumes_its_own_run_folder(ss, tmp_path):
    argv = ss.run_argv(REPO / "configs/synthetic/bot.yaml", 2, tmp_path)
    assert argv[argv.index("--resume") + 1] == "auto"
    assert "--set=logging.run_name=seed2" in argv and f"--set=logging.output_dir={tmp_path}" in argv
