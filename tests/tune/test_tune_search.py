"""`hpc-reid tune` end to end on a real local Ray cluster (started in the CLI's process, 2 CPUs):
4-trial searches of tiny synthetic trainings (4 epochs, an evaluation after each, ASHA), their
outputs, Ax's suggestions inside the space, the best config retraining to the reported objective,
a search killed with SIGKILL that resumes without re-running finished trials, and the errors
that come before Ray starts."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpc_reid.config import Config, load_config
from hpc_reid.tune.space import load_space
from tests.tiny import TINY_BATCH, TINY_DATA

REPO = Path(__file__).resolve().parents[2]
TINY = [
    *TINY_DATA,
    *TINY_BATCH,
    "schedule.epochs=4",
    "schedule.milestones=[3]",
    "schedule.warmup_epochs=1",
    "evaluation.every_epochs=1",
    "evaluation.at_start=false",
    "evaluation.plots=false",
    "logging.tensorboard=false",
    "logging.log_every=1",
    "engine.device=cpu",
]
SPACE = """\
parameters:
  optimizer.lr: {type: range, bounds: [1.0e-3, 1.0e-2], log: true}
  loss.triplet.margin: {type: range, bounds: [0.1, 0.5]}
  sampler.num_identities: {type: choice, values: [2, 3]}
  schedule.warmup_epochs: {type: range, bounds: [0, 2], int: true}
  loss.ce.label_smoothing: 0.05
constraints:
  - "optimizer.lr * sampler.num_identities <= 0.025"
"""
FINISHED = {"completed", "early-stopped"}


def tune_cmd(tmp: Path, *extra: str) -> list[str]:
    sets = [*TINY, f"data.synthetic.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp}"]
    cmd = [sys.executable, "-m", "hpc_reid.cli", "tune", "--config"]
    cmd += [str(REPO / "configs/synthetic/bot.yaml"), "--space", str(tmp / "space.yaml")]
    return cmd + [f"--set={s}" for s in sets] + list(extra)


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


def ax_statuses(folder: Path) -> dict[int, str]:
    path = folder / "ax_experiment.json"
    if not path.is_file():
        return {}
    trials = json.loads(path.read_text())["experiment"]["trials"]
    return {int(i): t["status"]["name"] for i, t in trials.items()}


def space_of(tmp: Path):
    base = load_config(REPO / "configs/synthetic/bot.yaml", TINY)
    return load_space(tmp / "space.yaml", base)


def assert_params_inside(tmp: Path, table: list[dict[str, str]]) -> None:
    space = space_of(tmp)
    for row in table:
        params = {k: yaml.safe_load(row[k]) for k in space.params}
        assert space.outside(params) == [] and space.violated(params) == [], row
    # and every arm Ax suggested, run or not (abandoned ones broke the product constraint)
    snapshot = json.loads((tmp / "tune/bot_synthetic/ax_experiment.json").read_text())
    for trial in snapshot["experiment"]["trials"].values():
        params = trial["generator_run"]["arms"][0]["parameters"]
        assert space.outside(params) == [], params


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("search")
    (tmp / "space.yaml").write_text(SPACE)
    done = run(tune_cmd(tmp, "--trials", "4", "--concurrent", "2", "--seed", "1"))
    return tmp, done


@pytest.mark.slow
def test_a_four_trial_search_finishes_with_every_output(search):
    tmp, done = search
    folder = tmp / "tune/bot_synthetic"
    table = rows(folder)
    assert len(table) == 4 and len({r["trial_id"] for r in table}) == 4
    assert {r["status"] for r in table} <= FINISHED, table
    assert any(r["status"] == "completed" for r in table)
    for name in ("results.csv", "best.yaml", "progress.png", "params.png", "ax_experiment.json"):
        assert (folder / name).stat().st_size > 0, name
    # the printed table and summary
    assert "4 trial(s)" in done.stdout and "best: trial" in done.stdout, done.stdout
    for row in table:
        assert row["trial_id"] in done.stdout
    # Ax knows every run trial with its outcome
    statuses = ax_statuses(folder)
    ran = {int(r["trial"]): r["status"] for r in table}
    for index, status in ran.items():
        assert (
            statuses[index] == {"completed": "COMPLETED", "early-stopped": "EARLY_STOPPED"}[status]
        )
    # each trial trained in its own run folder, with the fixed value applied
    for row in table:
        run_config = load_config(folder / "trials" / row["trial_id"] / "config.yaml")
        assert run_config.loss.ce.label_smoothing == 0.05
        assert run_config.optimizer.lr == pytest.approx(float(row["optimizer.lr"]))


@pytest.mark.slow
def test_every_suggestion_lies_inside_the_space(search):
    tmp, _ = search
    assert_params_inside(tmp, rows(tmp / "tune/bot_synthetic"))


@pytest.mark.slow
def test_the_best_yaml_retrains_to_the_reported_objective(search, tmp_path):
    tmp, _ = search
    folder = tmp / "tune/bot_synthetic"
    table = rows(folder)
    best = max(
        (r for r in table if r["status"] == "completed"), key=lambda r: float(r["objective"])
    )
    text = (folder / "best.yaml").read_text()
    assert f"Ray trial {best['trial_id']}" in text
    config = load_config(folder / "best.yaml")
    assert isinstance(config, Config)
    assert config.optimizer.lr == float(best["optimizer.lr"])
    cmd = [sys.executable, "-m", "hpc_reid.cli", "train", "--config", str(folder / "best.yaml")]
    cmd += [f"--set=logging.output_dir={tmp_path}", "--set=logging.run_name=retrain"]
    env = {**os.environ, "OMP_NUM_THREADS": best["threads"]}  # as the trial ran (best.yaml says)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "retrain/results.json").read_text())
    assert results["mAP"] == pytest.approx(float(best["mAP"]), abs=1e-9)
    assert results["mAP"] == pytest.approx(float(best["objective"]), abs=1e-9)  # --objective map


@pytest.mark.slow
def test_a_killed_search_resumes_and_runs_only_the_remaining_trials(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    folder = tmp_path / "tune/bot_synthetic"
    cmd = tune_cmd(tmp_path, "--trials", "4", "--concurrent", "1", "--no-early-stopping")
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    # its own session: SIGKILL to the group takes the CLI and the Ray it started, as a node
    # failure or `kill -9` of the job would
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while sum(s == "COMPLETED" for s in ax_statuses(folder).values()) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-4000:]
            time.sleep(0.2)
        time.sleep(3.0)  # > TUNE_GLOBAL_CHECKPOINT_S: Tune's state has caught up; trial 3 runs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    done_before = {
        p.parent.name: p.stat().st_mtime_ns for p in (folder / "trials").glob("*/results.json")
    }
    assert len(done_before) == 2, (tmp_path / "first.log").read_text()[-4000:]
    assert not (folder / "results.csv").exists()  # it really was interrupted

    done = run(tune_cmd(tmp_path, "--resume"))
    table = rows(folder)
    assert len(table) == 4 and len({r["trial_id"] for r in table}) == 4, done.stdout
    assert all(r["status"] == "completed" for r in table), table
    # the two finished trials were not trained again: same results files, untouched
    after = {
        p.parent.name: p.stat().st_mtime_ns for p in (folder / "trials").glob("*/results.json")
    }
    assert len(after) == 4
    assert {k: after[k] for k in done_before} == done_before
    assert len(list(folder.glob("run_trial_*"))) == 4
    assert_params_inside(tmp_path, table)
    statuses = ax_statuses(folder)
    assert sorted(statuses[int(r["trial"])] for r in table) == ["COMPLETED"] * 4


@pytest.mark.slow
def test_errors_before_ray_starts_exit_2(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "parameters:\n  optimizer.lrr: {type: range, bounds: [1, 2]}\n"
    )
    base = [sys.executable, "-m", "hpc_reid.cli", "tune", "--config"]
    base += [str(REPO / "configs/synthetic/bot.yaml"), f"--set=logging.output_dir={tmp_path}"]
    cases = [
        (["--space", str(tmp_path / "space.yaml"), "--trials", "2"], "did you mean 'optimizer.lr'"),
        (["--space", str(tmp_path / "none.yaml"), "--trials", "2"], "none.yaml not found"),
        (["--trials", "2"], "give --space FILE and --trials N"),
        (["--resume"], "no search to resume"),
    ]
    for args, message in cases:
        done = subprocess.run(base + args, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_trial_can_train_on_two_ray_train_workers(tmp_path):
    """--workers-per-trial 2: the trial's training runs on 2 gloo Ray Train workers (TorchTrainer
    inside the Tune trial), and its evaluations still reach Tune, Ax and the results table."""
    (tmp_path / "space.yaml").write_text(SPACE)
    extra = ["--trials", "1", "--workers-per-trial", "2", "--cpus-per-trial", "0.5"]
    done = run(tune_cmd(tmp_path, *extra, "--no-early-stopping"), timeout=400)
    folder = tmp_path / "tune/bot_synthetic"
    (row,) = rows(folder)
    assert row["status"] == "completed" and row["epoch"] == "4", done.stdout[-3000:]
    assert float(row["objective"]) == pytest.approx(float(row["mAP"]))
    # the trial's run folder holds a checkpoint written by a 2-rank job
    import torch

    (ckpt,) = sorted((folder / "trials" / row["trial_id"] / "checkpoints").glob("epoch_*.pt"))[-1:]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["world_size"] == 2
    assert list(ax_statuses(folder).values()) == ["COMPLETED"]
