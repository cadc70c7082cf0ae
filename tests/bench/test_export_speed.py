"""bench/export_speed.py on a tiny model: both runtimes time the same graph on the same batch (their
outputs agree), the ratio is onnxruntime's img/s over torch's, and the command prints its table and
JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--set", "model.backbone=osnet_x0_25", "--set", "model.pretrained=null"]


@pytest.fixture
def es(bench_script):
    return bench_script("export_speed")


def test_both_runtimes_time_the_same_graph_and_the_ratio_is_theirs(es, capsys):
    args = ["--config", str(REPO / "configs/market/bot_r50.yaml"), *TINY]
    args += ["--sizes", "64x32", "32x16", "--batch", "3", "--reps", "3", "--warmup", "1"]
    assert es.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    info = json.loads(lines[-1])
    assert info["backbone"] == "osnet_x0_25"
    assert [r["input"] for r in info["rows"]] == ["64x32", "32x16"]
    for row in info["rows"]:
        assert row["batch"] == 3 and row["timed_reps"] == 3 and row["threads"] == 1
        assert row["ratio"] == pytest.approx(
            row["onnxruntime_img_s"] / row["torch_img_s"], rel=0.02, abs=0.01
        )
        assert row["max_abs_diff"] < 1e-4  # the same graph: float32 reordering only
        table_row = f"| {row['input']} | {row['torch_img_s']} | {row['onnxruntime_img_s']} |"
        assert any(line.startswith(table_row) for line in lines)
    assert lines[1].startswith("| input | torch eager img/s | onnxruntime img/s")


def test_a_size_is_height_x_width(es):
    assert es.parse_size("256x128") == (256, 128)
    with pytest.raises(argparse.ArgumentTypeError, match="expected HEIGHTxWIDTH"):
        es.parse_size("256")
