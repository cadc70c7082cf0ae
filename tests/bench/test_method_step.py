"""bench/method_step.py on the tiny synthetic set: both configs step on the same batches (SAN with
its texture field), and the ratio is the method's median step over the baseline's."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_reid.config import load_config
from tests.tiny import TINY_BATCH, TINY_DATA

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ms(bench_script):
    return bench_script("method_step")


def test_san_against_the_baseline_on_the_same_batches(ms, tmp_path):
    sets = [*TINY_DATA, *TINY_BATCH, f"data.synthetic.cache_dir={tmp_path}"]
    sets += ["sampler.num_instances=4", "model.san.texture_size=[16,8]"]
    baseline = load_config(REPO / "configs/synthetic/bot.yaml", sets)
    method = load_config(REPO / "configs/synthetic/san.yaml", sets)
    row = ms.measure(baseline, method, steps=3, warmup=1)
    assert row["timed_steps"] == 3 and row["method"] == "san_synthetic"
    assert row["ratio"] == pytest.approx(row["method_step_s"] / row["baseline_step_s"], rel=0.02)
    other = load_config(REPO / "configs/synthetic/san.yaml", [*sets, "data.synthetic.ids=20"])
    with pytest.raises(SystemExit, match="different training sets"):
        ms.measure(baseline, other, steps=1, warmup=0)
