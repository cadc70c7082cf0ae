"""bench/cace_rescore.py on the tiny synthetic set: one row per K with the re-scoring time per
query and the evaluation's total against the single-image one."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_reid.config import load_config
from tests.tiny import TINY_BATCH, TINY_DATA

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_tiny_cace_model_times_rescoring_per_query_for_each_k(bench_script, tmp_path):
    cr = bench_script("cace_rescore")
    sets = [*TINY_DATA, *TINY_BATCH, f"data.synthetic.cache_dir={tmp_path}"]
    config = load_config(REPO / "configs/synthetic/cace.yaml", sets)
    out = cr.measure(config, ks=[2, 4], queries=6)
    assert out["queries"] == 6 and [r["k"] for r in out["rows"]] == [2, 4]
    for row in out["rows"]:
        assert row["s_per_query"] == pytest.approx(row["rescore_s"] / 6, abs=1e-3)
        assert row["evaluation_s"] == pytest.approx(
            out["single_image_s"] + row["rescore_s"], abs=0.02
        )
        assert row["vs_single"] > 1


def test_a_head_without_a_rescorer_is_refused(bench_script, tmp_path):
    cr = bench_script("cace_rescore")
    sets = [*TINY_DATA, *TINY_BATCH, f"data.synthetic.cache_dir={tmp_path}"]
    config = load_config(REPO / "configs/synthetic/bot.yaml", sets)
    with pytest.raises(SystemExit, match="does not re-score"):
        cr.measure(config, ks=[2], queries=6)
