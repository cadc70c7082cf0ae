"""The search's objective and outputs from Tune results: the objective formula, the best trial
(only a completed one), the results table and CSV, best.yaml's retrain command and the plots."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpc_reid.config import Config, load_config
from hpc_reid.tune import report
from hpc_reid.tune.runner import objective_value
from hpc_reid.tune.space import parse_space

SPACE = parse_space(
    {
        "parameters": {
            "optimizer.lr": {"type": "range", "bounds": [1e-4, 1e-2], "log": True},
            "optimizer.name": {"type": "choice", "values": ["adam", "sgd"]},
        }
    },
    Config(),
    "space",
)


def result(trial_id, objective, final, lr, error=None, epoch=4):
    metrics = {"trial_id": trial_id, "objective": objective, "mAP": objective, "rank-1": 0.5}
    metrics.update(final=final, epoch=epoch, step=10 * epoch, threads=1)
    config = {"optimizer.lr": lr, "optimizer.name": "sgd"}
    return SimpleNamespace(metrics=metrics, config=config, error=error, path=f"/x/{trial_id}")


def test_the_objective_is_map_or_the_mean_of_rank1_and_map():
    metrics = {"mAP": 0.4, "rank-1": 0.7}
    assert objective_value(metrics, "map") == 0.4
    assert objective_value(metrics, "mean") == pytest.approx(0.55)


def test_only_a_completed_trial_can_be_best_and_outputs_are_written(tmp_path: Path):
    results = [
        result("b", 0.30, True, 1e-3),
        result("a", 0.90, False, 2e-3, epoch=1),  # stopped by ASHA: not retrainable to 0.9
        result("c", 0.35, True, 3e-3),
        SimpleNamespace(metrics={"trial_id": "d"}, config={}, error=RuntimeError(), path="/x/d"),
    ]
    rows = report.results_rows(results, {"a": 0, "b": 1, "c": 3, "d": 4}, SPACE)
    assert [(r["trial"], r["status"]) for r in rows] == [
        (0, "early-stopped"),
        (1, "completed"),
        (3, "completed"),
        (4, "failed"),
    ]
    best = report.best_row(rows)
    assert best["trial_id"] == "c"
    table = report.format_table(rows, best)
    assert [line.startswith("*") for line in table.splitlines()] == [False] * 3 + [True, False]
    with open(report.write_csv(rows, tmp_path / "results.csv")) as f:
        assert [r["trial_id"] for r in csv.DictReader(f)] == ["a", "b", "c", "d"]
    path = report.write_best_yaml(Config().to_dict(), SPACE, best, tmp_path / "best.yaml", tmp_path)
    text = path.read_text()
    assert "#   OMP_NUM_THREADS=1 hpc-reid train --config best.yaml" in text
    config = load_config(path)
    assert (config.optimizer.lr, config.optimizer.name) == (3e-3, "sgd")
    for plot in (
        report.plot_progress(rows, tmp_path / "progress.png", "mAP"),
        report.plot_params(rows, SPACE, tmp_path / "params.png", "mAP"),
    ):
        assert plot.read_bytes()[:4] == b"\x89PNG"
