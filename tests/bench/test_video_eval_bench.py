"""bench/video_eval.py: MARS's query/gallery layout (checked here against its definition), the
ranking section at a small scale agreeing with the argsort evaluation, and the extraction section
on the tiny synthetic tracklets counting the dense clips written out here."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from hpc_reid.data.build import dataset_on_ranks
from tests.tiny import TINY_TRACKLETS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("distractors", [0, 7])
def test_mars_layout_has_one_query_per_identity_camera_and_a_cross_camera_positive(
    bench_script, distractors
):
    ve = bench_script("video_eval")
    rng = np.random.default_rng(1)
    q_pids, g_pids, q_cams, g_cams = ve.mars_layout(rng, 200, 900, 62, 6, distractors)
    assert (len(q_pids), len(g_pids)) == (200, 900)
    pairs = list(zip(q_pids.tolist(), q_cams.tolist(), strict=True))
    assert len(set(pairs)) == 200 and set(q_pids.tolist()) == set(range(1, 63))
    cams_of = defaultdict(set)
    for pid, cam in pairs:
        cams_of[pid].add(cam)
    assert all(2 <= len(c) <= 6 for c in cams_of.values())
    gallery = set(zip(g_pids.tolist(), g_cams.tolist(), strict=True))
    assert set(pairs) <= gallery  # a gallery tracklet in each of a query identity's cameras
    assert {p for p, _ in gallery} - {0} == set(range(1, 63))
    assert int((g_pids == 0).sum()) == distractors
    assert all(0 <= c < 6 for c in g_cams.tolist())
    with pytest.raises(ValueError, match="cannot be one per"):
        ve.mars_layout(rng, 100, 900, 62, 6)  # fewer queries than 2 cameras per identity


def test_ranking_section_times_the_evaluation_against_the_argsort_one(bench_script):
    ve = bench_script("video_eval")
    out = ve.ranking(scale=0.05, dim=32, distractors=5, backend="numpy", seed=0, repeats=1)
    assert (out["queries"], out["gallery"], out["ids"]) == (99, 466, 31)
    assert out["speedup"] == pytest.approx(out["argsort_s"] / out["evaluate_s"], rel=0.01)
    assert out["distances_s"] < out["evaluate_s"]  # the distances are a part of it
    assert 0 < out["mAP"] <= 1 and 0 <= out["rank-1"] <= 1


def test_extraction_section_counts_the_dense_clips_of_the_tracklets(bench_script, tmp_path):
    ve = bench_script("video_eval")
    config = tiny_config(
        tmp_path,
        "configs/synthetic/video.yaml",
        *TINY_TRACKLETS,
        "model.backbone=osnet_x0_25",
    )
    out = ve.extraction(config, tracklets=5, repeats=1)
    records = dataset_on_ranks(config.data, True).gallery[:5]
    clips = sum(min(math.ceil(r.num_frames / 3), 2) for r in records)
    assert (out["tracklets"], out["clips"], out["frames"]) == (5, clips, 3 * clips)
    assert out["clips_per_s"] == pytest.approx(clips / out["clips_s"], rel=0.01)
    assert out["vs_images"] == pytest.approx(out["images_s"] / out["clips_s"], rel=0.01)
    assert out["frames_per_s"] == pytest.approx(3 * out["clips_per_s"], rel=0.01)
    image = tiny_config(tmp_path, "configs/synthetic/bot.yaml")
    with pytest.raises(SystemExit, match="holds images, not tracklets"):
        ve.extraction(image, tracklets=2, repeats=1)


def test_main_prints_the_row_and_writes_the_json(bench_script, tmp_path, capsys):
    ve = bench_script("video_eval")
    path = tmp_path / "out.json"
    args = ["--section", "ranking", "--scale", "0.05", "--dim", "16", "--repeats", "1"]
    assert ve.main([*args, "--threads", "1", "--json", str(path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("ranking: 99 query x 466 gallery x 16-d tracklet features")
    assert json.loads(printed[-1]) == json.loads(Path(path).read_text())
