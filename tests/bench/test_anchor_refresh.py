"""bench/anchor_refresh.py on the tiny synthetic set: the refresh runs over the requested number of
images (records repeated with their labels); the ratio is the refresh time over the epoch time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hpc_reid.config import load_config
from tests.tiny import TINY_BATCH, TINY_DATA

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ar(bench_script):
    return bench_script("anchor_refresh")


def test_records_are_repeated_in_order_with_their_labels(ar):
    Rec = dataclasses.make_dataclass("Rec", ["path", "pid"])
    records = [Rec(f"{i}.jpg", i % 3) for i in range(5)]
    out = ar.repeated(records, 12)
    assert [r.path for r in out] == [f"{i % 5}.jpg" for i in range(12)]
    assert [r.pid for r in out] == [i % 5 % 3 for i in range(12)]
    assert ar.repeated(records, None) == records
    assert [r.path for r in ar.repeated(records, 2)] == ["0.jpg", "2.jpg"]  # evenly spaced


def test_the_tiny_stage_2_measures_a_refresh_and_an_epoch(ar, tmp_path):
    sets = [*TINY_DATA, *TINY_BATCH, "sampler.batch_size=8", f"data.synthetic.cache_dir={tmp_path}"]
    config = load_config(REPO / "configs/synthetic/anchor_stage2.yaml", sets)
    row = ar.measure(config, images=120, steps=2, warmup=1)
    assert row["training_images"] == 120 and row["classes"] == 8
    assert row["batches_per_epoch"] == 120 // 8 and row["timed_steps"] == 2
    assert row["refresh_per_epoch"] == pytest.approx(row["refresh_s"] / row["epoch_s"], rel=0.05)
