"""The synthetic tracklet generator (MARS layout): files and .mat rows against what it says it
made, the protocol's invariants, determinism, motion within a tracklet, the cache, the MARS
parser, the config path and the command line."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from hpc_reid.cli import main as cli_main
from hpc_reid.config import DataConfig, load_config
from hpc_reid.data.build import dataset_from_config, dataset_root, tracklet_spec
from hpc_reid.data.datasets import DatasetError, build_dataset
from hpc_reid.data.synthetic import SynthSpec, TrackletSpec, ensure_tracklets, generate_tracklets
from hpc_reid.data.synthetic import writer as gen
from hpc_reid.data.synthetic.render import SIDE, draw
from hpc_reid.data.synthetic.walking import OCCLUSION_PROB, walk

REPO = Path(__file__).resolve().parents[2]
SMALL = TrackletSpec(
    ids=6, cams=3, tracklets_per_camera=2, min_frames=3, max_frames=6, distractors=3, junk=2, seed=5
)
# one tracklet per camera: the identity's last camera keeps its tracklet in the gallery
ONE = replace(SMALL, ids=8, cams=2, tracklets_per_camera=1, min_frames=2, max_frames=3, seed=6)
NAME = re.compile(r"(\d{4}|00-1)C([1-6])T(\d{4})F(\d{3})\.jpg")


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracklets") / "mars_synth"
    generate_tracklets(out, SMALL)
    return out


def read_split(root: Path, split: str) -> tuple[list[str], np.ndarray]:
    names = (root / "info" / f"{split}_name.txt").read_text().splitlines()
    rows = loadmat(root / "info" / f"tracks_{split}_info.mat")[f"track_{split}_info"]
    return names, rows


def check_layout(root: Path, spec: TrackletSpec) -> None:
    """Every file and row against the spec and meta.json, read with scipy and plain Python."""
    counts = json.loads((root / "meta.json").read_text())["counts"]
    assert sorted(p.name for p in root.iterdir()) == [
        "bbox_test",
        "bbox_train",
        "info",
        "meta.json",
        "textures",
    ]
    num_train = (spec.ids + 1) // 2
    tracks = {}  # split -> [(pid, cam, frames)], in row order
    for split, folder in (("train", "bbox_train"), ("test", "bbox_test")):
        names, rows = read_split(root, split)
        assert rows.ndim == 2 and rows.shape[1] == 4 and rows.dtype.kind == "i"
        assert len(set(names)) == len(names)
        # rows cover the name list in order, without gaps or overlaps
        assert rows[0, 0] == 1 and rows[-1, 1] == len(names)
        assert np.array_equal(rows[1:, 0], rows[:-1, 1] + 1)
        tracks[split] = []
        for start, end, pid, cam in rows.tolist():
            assert spec.min_frames <= end - start + 1 <= spec.max_frames
            parsed = [NAME.fullmatch(n) for n in names[start - 1 : end]]
            assert all(parsed)
            person = {m.group(1) for m in parsed}
            assert person == {"00-1" if pid == -1 else f"{pid:04d}"}
            assert {int(m.group(2)) for m in parsed} == {cam} and 1 <= cam <= spec.cams
            assert len({m.group(3) for m in parsed}) == 1  # one tracklet number
            assert [int(m.group(4)) for m in parsed] == list(range(1, end - start + 2))
            tracks[split].append((pid, cam, end - start + 1))
        on_disk = {p.relative_to(root / folder).as_posix() for p in (root / folder).rglob("*.jpg")}
        assert on_disk == {f"{n[:4]}/{n}" for n in names}
    with Image.open(next((root / "bbox_train").rglob("*.jpg"))) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (spec.width, spec.height))

    train, test = tracks["train"], tracks["test"]
    assert {p for p, _, _ in train} == set(range(1, num_train + 1))
    assert {p for p, _, _ in test} == {-1, 0} | set(range(num_train + 1, spec.ids + 1))
    assert sum(p == -1 for p, _, _ in test) == spec.junk == counts["junk_tracklets"]
    assert sum(p == 0 for p, _, _ in test) == spec.distractors == counts["distractor_tracklets"]
    per_cam = defaultdict(int)
    for pid, cam, _ in train + test:
        if pid > 0:
            per_cam[pid, cam] += 1
    assert set(per_cam.values()) == {spec.tracklets_per_camera}
    cams_of = defaultdict(set)
    for pid, cam in per_cam:
        cams_of[pid].add(cam)
    assert min(len(c) for c in cams_of.values()) >= 2

    query_rows = loadmat(root / "info" / "query_IDX.mat")["query_IDX"].ravel()
    assert len(set(query_rows.tolist())) == len(query_rows)
    assert query_rows.min() >= 1 and query_rows.max() <= len(test)  # rows of the test info
    query = [test[i - 1] for i in query_rows]
    gallery = [t for i, t in enumerate(test, 1) if i not in set(query_rows.tolist())]
    assert all(pid > 0 for pid, _, _ in query)
    # one query per (test id, camera), but for the last camera of a single-tracklet identity
    expected = {(pid, cam) for pid, cam in per_cam if pid > num_train}
    if spec.tracklets_per_camera == 1:
        expected -= {(pid, max(cams_of[pid])) for pid in cams_of if pid > num_train}
    assert sorted((pid, cam) for pid, cam, _ in query) == sorted(expected)
    for pid, cam, _ in query:  # every query has a positive in another camera
        assert any(g_pid == pid and g_cam != cam for g_pid, g_cam, _ in gallery)

    kept = [t for t in gallery if t[0] != -1]
    assert counts["train_ids"] == num_train and counts["train_tracklets"] == len(train)
    assert counts["train_frames"] == sum(n for _, _, n in train)
    assert counts["test_tracklets"] == len(test) and counts["query_tracklets"] == len(query)
    assert counts["query_ids"] == len({p for p, _, _ in query})
    assert counts["gallery_tracklets"] == len(kept)
    assert counts["gallery_ids"] == len({p for p, _, _ in kept})
    assert counts["frames"] == sum(n for _, _, n in train + test)
    for pid in range(1, spec.ids + 1):
        assert (root / "textures" / f"{pid:04d}.png").is_file()


def test_layout_names_and_track_info_match_the_spec_and_meta(small_set):
    check_layout(small_set, SMALL)


def test_one_tracklet_per_camera_keeps_a_cross_camera_positive_for_every_query(tmp_path):
    generate_tracklets(tmp_path / "one", ONE)
    check_layout(tmp_path / "one", ONE)


def test_mars_parser_reads_the_set_with_the_counts_the_generator_reports(small_set):
    ds = build_dataset("mars", small_set)
    counts = json.loads((small_set / "meta.json").read_text())["counts"]
    assert ds.is_video and ds.skipped == {"junk tracklets": SMALL.junk}
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (
        counts["train_tracklets"],
        counts["query_tracklets"],
        counts["gallery_tracklets"],
    )
    assert ds.num_train_pids == counts["train_ids"]
    assert sum(r.num_frames for r in ds.train) == counts["train_frames"]
    names, rows = read_split(small_set, "test")
    for record in ds.query + ds.gallery:
        start, end, pid, cam = rows[record.tid]
        assert (record.pid, record.camid) == (pid, cam - 1)
        assert [Path(f).name for f in record.frames] == names[start - 1 : end]


def test_same_spec_gives_identical_bytes_with_one_or_two_workers(small_set, tmp_path):
    summary = generate_tracklets(tmp_path / "two", SMALL, workers=2)
    assert summary["counts"]["frames"] == len(list(small_set.rglob("*.jpg")))
    first, second = all_files(small_set), all_files(tmp_path / "two")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    generate_tracklets(tmp_path / "other_seed", replace(SMALL, seed=9))
    other = all_files(tmp_path / "other_seed")
    assert other["textures/0001.png"] != first["textures/0001.png"]


def test_frames_of_a_tracklet_change_over_time_yet_stay_closer_than_other_people(small_set):
    names, rows = read_split(small_set, "train")

    def frames(start: int, end: int) -> np.ndarray:
        return np.stack(
            [
                np.asarray(Image.open(small_set / "bbox_train" / n[:4] / n), np.float32)
                for n in names[start - 1 : end]
            ]
        )

    steps, firsts = [], {}
    for start, end, pid, cam in rows.tolist():
        x = frames(start, end)
        steps.append(np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3)))
        firsts.setdefault(cam, []).append((pid, x[0]))
    step = np.concatenate(steps)
    assert step.min() > 2.0  # no frame repeats the previous one: JPEG noise alone is ~1
    across = [
        np.abs(a - b).mean()
        for group in firsts.values()
        for i, (pa, a) in enumerate(group)
        for pb, b in group[i + 1 :]
        if pa != pb
    ]
    assert np.median(step) < np.median(across)


def test_walk_cycles_the_gait_scrolls_the_scene_and_occluders_enter_and_leave():
    spec = replace(SMALL, seed=2)
    renderer = gen.Renderer(spec)
    ident, cam = renderer.person(gen.IDENTITY, 1), max(renderer.cameras, key=lambda c: c.sensor)
    side, occluded, crossing = 0, 0, 0
    for seed in range(60):
        shots = walk(np.random.default_rng(seed), ident, cam, 24, spec.height, spec.width)
        assert len({s.view for s in shots}) == len({s.flip for s in shots}) == 1
        bg_x = np.array([s.bg_x for s in shots])
        steps = np.diff(bg_x)
        assert (np.all(steps >= 0) or np.all(steps <= 0)) and bg_x[0] != bg_x[-1]
        phases = np.array([s.phase for s in shots])
        assert phases.min() < -0.5 and phases.max() > 0.5  # 24 frames hold a whole stride
        if shots[0].view == SIDE:  # the feet pass each other: their order in x flips
            side += 1
            feet = []
            for s in shots:
                _, kp = draw(ident, cam, replace(s, noise=False), spec.height, spec.width)
                feet.append(kp["left_foot"][0] - kp["right_foot"][0])
            assert np.min(feet) < 0 < np.max(feet)
        boxes = [s.occluder for s in shots]
        seen = [i for i, b in enumerate(boxes) if b is not None]
        if seen:
            occluded += 1
            assert seen == list(range(seen[0], seen[-1] + 1))  # one pass, no gaps
            x0 = np.array([boxes[i][0] for i in seen])
            assert np.all(np.diff(x0) > 0) or np.all(np.diff(x0) < 0)
            crossing += seen[0] > 0 and seen[-1] < len(shots) - 1  # enters and leaves in view
    assert side > 0 and crossing > 0
    assert abs(occluded / 60 - OCCLUSION_PROB) < 0.2


def test_every_option_changes_the_cache_key_and_ensure_tracklets_reuses_the_folder(tmp_path):
    keys = {SMALL.key()}
    for f in fields(TrackletSpec):
        value = getattr(SMALL, f.name)
        changed = value - 1 if f.name == "max_frames" else value + 1
        keys.add(replace(SMALL, **{f.name: changed}).key())
    assert len(keys) == 1 + len(fields(TrackletSpec))
    assert SMALL.key() != SynthSpec(ids=6, cams=3, distractors=3, junk=2, seed=5).key()

    folder = ensure_tracklets(SMALL, tmp_path)
    assert folder == tmp_path / f"mars_synth_{SMALL.key()}"
    stamp = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert ensure_tracklets(SMALL, tmp_path) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamp
    other = ensure_tracklets(replace(ONE, seed=7), tmp_path)
    assert other != folder and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [folder.name, other.name]
    )  # no temporary folder left behind


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("ids", 3, "4..9999"),
        ("cams", 7, "2..6"),
        ("tracklets_per_camera", 0, "1..99"),
        ("max_frames", 1000, "1..999"),
        ("junk", -1, "0..10000"),
        ("ids", 2.5, "4..9999"),
    ],
)
def test_invalid_spec_names_field_value_and_range(field, value, allowed):
    with pytest.raises(DatasetError, match=rf"TrackletSpec\.{field}={value!r}.*{allowed}"):
        TrackletSpec(**{field: value})
    with pytest.raises(DatasetError, match=r"min_frames=9 exceeds max_frames=8"):
        TrackletSpec(min_frames=9, max_frames=8)


def test_config_with_synthetic_tracklets_reads_the_generated_set_as_mars(tmp_path):
    data = DataConfig.model_validate(
        {
            "dataset": "synthetic",
            "synthetic": {
                "ids": 6,
                "cams": 3,
                "tracklets": True,
                "tracklets_per_camera": 2,
                "frames_per_tracklet": [3, 6],
                "distractors": 3,
                "junk": 2,
                "seed": 5,
                "cache_dir": str(tmp_path),
            },
        }
    )
    assert tracklet_spec(data) == SMALL
    said = []
    assert dataset_root(data, announce=said.append) == (
        "mars",
        tmp_path / f"mars_synth_{SMALL.key()}",
    )
    assert str(tmp_path) in said[0]
    ds = dataset_from_config(data, announce=lambda _: None)
    assert (
        ds.is_video
        and len(ds.query)
        == json.loads((tmp_path / f"mars_synth_{SMALL.key()}" / "meta.json").read_text())["counts"][
            "query_tracklets"
        ]
    )


def test_cli_data_synth_tracklets_writes_the_spec_it_is_given(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "synth", "--tracklets", "--out", str(out), "--ids", "4", "--cams", "2"]
    args += ["--frames-per-tracklet", "2", "3", "--distractors", "1", "--junk", "1"]
    assert cli_main(args) == 0
    spec = json.loads((out / "meta.json").read_text())["spec"]
    assert (
        spec
        == TrackletSpec(ids=4, cams=2, min_frames=2, max_frames=3, distractors=1, junk=1).to_dict()
    )
    assert "MARS-format" in capsys.readouterr().out
    assert cli_main([*args[:3], "--out", str(tmp_path / "x"), "--images-per-id", "3"]) == 2
    assert (
        cli_main(["data", "synth", "--out", str(tmp_path / "y"), "--tracklets-per-camera", "3"])
        == 2
    )
    assert "is for tracklets" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_video_config_loads_with_tracklets_t4_and_4_by_4_batches():
    config = load_config(REPO / "configs/synthetic/video.yaml")
    assert config.data.dataset == "synthetic" and config.data.synthetic.tracklets
    assert config.data.video.seq_len == 4 and config.model.head == "temporal_avg"
    assert (config.sampler.num_identities, config.sampler.num_instances) == (4, 4)
