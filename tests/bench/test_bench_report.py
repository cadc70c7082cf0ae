"""Scaling summaries of bench.json runs (efficiency against the fewest nodes, checked against
numbers computed by hand), the per-run aggregate, and atomic writes of every output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpc_reid.bench import report
from hpc_reid.bench.report import aggregate, load_runs, scaling_rows, write_scaling
from hpc_reid.cli import main
from hpc_reid.config import ConfigError


def fake_run(nodes: int, compute: float, e2e: float, scaling: str = "weak", batch: int = 64):
    per_rank = batch if scaling == "weak" else batch // nodes
    return {
        "schema": 1,
        "environment": {"nodes": nodes, "world_size": nodes},
        "settings": {
            "scaling": scaling,
            "per_rank_batch": per_rank,
            "global_batch": per_rank * nodes,
            "loaders": ["torch"],
        },
        "aggregate": {
            "compute": {"img_per_s": compute},
            "loaders": {"torch": {"end_to_end": {"img_per_s": e2e}}},
            "eval": {"seconds": {"max": 1.5}},
        },
    }


RUNS = [
    fake_run(2, 180.0, 120.0),
    fake_run(1, 100.0, 80.0),
    fake_run(4, 300.0, 200.0),
    fake_run(1, 100.0, 80.0, "strong"),
    fake_run(2, 150.0, 100.0, "strong"),
]


def write_runs(tmp_path: Path) -> list[Path]:
    paths = []
    for i, run in enumerate(RUNS):
        folder = tmp_path / f"run-{i}"
        folder.mkdir()
        (folder / "bench.json").write_text(json.dumps(run))
        paths.append(folder)
    return paths


def test_efficiency_is_throughput_growth_over_node_growth_per_mode(tmp_path):
    rows = scaling_rows(load_runs(write_runs(tmp_path)))
    got = [
        (r["mode"], r["nodes"], r["compute_efficiency"], r["end_to_end_efficiency"]) for r in rows
    ]
    # weak: 180 / (2 x 100) = 0.9, 300 / (4 x 100) = 0.75; end-to-end 120 / 160, 200 / 320;
    # strong: 150 / (2 x 100) = 0.75, 100 / (2 x 80) = 0.625
    expected = [
        ("strong", 1, 1.0, 1.0),
        ("strong", 2, 0.75, 0.625),
        ("weak", 1, 1.0, 1.0),
        ("weak", 2, 0.9, 0.75),
        ("weak", 4, 0.75, 0.625),
    ]
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g[2:] == pytest.approx(e[2:])
    assert [r["global_batch"] for r in rows[:2]] == [64, 64]  # strong: the global batch is kept


def test_summarize_writes_json_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "summary"
    assert main(["bench", "summarize", *map(str, write_runs(tmp_path)), "--out", str(out)]) == 0
    data = json.loads((out / "scaling.json").read_text())
    assert len(data["rows"]) == 5
    table = (out / "scaling.md").read_text().splitlines()
    assert len(table) == 2 + 5 and table[0].startswith("| scaling | nodes |")
    assert "| weak | 2 | 2 | 64 | 128 | 180 | 0.90 | 120 (torch) | 0.75 |" in table[5]
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["scaling.json", "scaling.md", "scaling.png"]
    assert "scaling.png" in capsys.readouterr().out


def test_a_failed_write_keeps_the_previous_files_and_leaves_no_temporary(tmp_path, monkeypatch):
    runs = load_runs(write_runs(tmp_path))
    out = tmp_path / "summary"
    write_scaling(runs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)  # both write_atomic and the PNG writer rename
    for name in ("json", "md", "png"):
        with pytest.raises(OSError, match="disk full"):
            if name == "png":
                report.plot_scaling(scaling_rows(runs), out / "scaling.png")
            elif name == "md":
                report.write_atomic(out / "scaling.md", "partial")
            else:
                report.write_json_atomic(out / "scaling.json", {"rows": []})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_summarize_names_a_missing_or_foreign_file(tmp_path, capsys):
    assert main(["bench", "summarize", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'} not found" in err
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not a bench\.json"):
        load_runs([tmp_path / "other.json"])


def rank_result(rank: int, compute: float, step: float, allreduce: float) -> dict:
    return {
        "rank": rank,
        "compute": {"img_per_s": compute, "step_s": step},
        "comm": {
            "allreduce_s": allreduce,
            "exposed_s": 0.001,
            "fit_sizes_bytes": [4096, 4194304],
            # made with latency 100 us and 1e9 B/s on 2 ranks: t = 1e-4 + n / 1e9
            "fit_seconds": [1e-4 + 4096 / 1e9, 1e-4 + 4194304 / 1e9],
        },
        "peak_memory_gib": 1.0 + rank,
    }


def test_aggregate_sums_throughput_and_spans_times_and_predicts_comm():
    settings = {"params": 1_000_000, "bucket_cap_mb": 25.0}
    agg = aggregate(settings, [rank_result(0, 100.0, 0.5, 0.004), rank_result(1, 80.0, 0.7, 0.006)])
    assert agg["compute"]["img_per_s"] == pytest.approx(180.0)
    assert agg["compute"]["step_s"] == pytest.approx({"min": 0.5, "max": 0.7, "mean": 0.6})
    assert agg["comm"]["allreduce_s"]["mean"] == pytest.approx(0.005)
    model = agg["comm"]["model"]
    assert model["latency_us"] == pytest.approx(100.0)
    assert model["bandwidth_gbps"] == pytest.approx(8.0)
    # one 4 MB bucket on 2 ranks: 1e-4 + 4e6 / 1e9
    assert model["predicted_allreduce_s"] == pytest.approx(1e-4 + 4e6 / 1e9)
    assert agg["peak_memory_gib"] == {"min": 1.0, "max": 2.0}
