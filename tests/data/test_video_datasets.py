"""The video set parsers (MARS, iLIDS-VID, PRID 2011 multi-shot) against miniature layouts written
here: the records equal the tracklets each test wrote (frames sorted by name, pids, cameras,
tracklet ids), the protocol's splits and skips, and clear errors for a wrong layout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from hpc_reid.config import ConfigError
from hpc_reid.data.build import check_options
from hpc_reid.data.datasets import DatasetError, TrackletRecord, build_dataset

SPLITS = ("train", "query", "gallery")
Expected = tuple[tuple[str, ...], int, int, int]  # frames, pid, camid, tid


def write_frame(path: Path, rng: np.random.Generator) -> None:
    """A tiny 8x4 image of random pixels, JPEG or PNG by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)).save(path)


def as_tuples(records) -> list[Expected]:
    return [(r.frames, r.pid, r.camid, r.tid) for r in records]


def relabelled(train: list[Expected]) -> list[Expected]:
    label = {pid: i for i, pid in enumerate(sorted({t[1] for t in train}))}
    return [(f, label[p], c, t) for f, p, c, t in train]


@dataclass
class Layout:
    """What a miniature layout holds: its root and, per split, the tracklets the parser must give
    (train with its original pids), plus what the protocol skips."""

    root: Path
    splits: dict[str, list[Expected]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- MARS


def mars_rows(rng, pids, junk):
    """(pid, camera 1..6, frame count) rows: each pid in 1-2 cameras, 1-2 tracklets a camera,
    plus ``junk`` rows of pid -1, in random order."""
    rows = []
    for pid in pids:
        for cam in rng.choice(np.arange(1, 7), size=rng.integers(1, 3), replace=False):
            rows += [(pid, int(cam), int(rng.integers(1, 6))) for _ in range(rng.integers(1, 3))]
    rows += [(-1, int(rng.integers(1, 7)), int(rng.integers(1, 4))) for _ in range(junk)]
    return [rows[i] for i in rng.permutation(len(rows))]


def write_mars_part(root, rng, part, rows):
    """Frames, name list and track info of one part (train or test); returns each row's frame
    names as the parser must give them (sorted, i.e. by frame number)."""
    names, info, frames_of_row, tracklet_no = [], [], [], {}
    # The name list's blocks are not in row order: rows point anywhere into it.
    blocks = []
    for pid, cam, n in rows:
        tracklet_no[pid, cam] = tracklet_no.get((pid, cam), 0) + 1
        prefix = "00-1" if pid == -1 else f"{pid:04d}"
        first = int(rng.integers(1, 50))
        block = [
            f"{prefix}C{cam}T{tracklet_no[pid, cam]:04d}F{first + k:03d}.jpg" for k in range(n)
        ]
        frames_of_row.append(tuple(block))
        # Within the block the list is shuffled: the parser sorts frames by name.
        blocks.append([block[i] for i in rng.permutation(n)])
    order = rng.permutation(len(rows))
    start = {}
    for i in order:
        start[i] = len(names) + 1
        names += blocks[i]
    for i, (pid, cam, n) in enumerate(rows):
        info.append([start[i], start[i] + n - 1, pid, cam])
        for name in frames_of_row[i]:
            write_frame(root / f"bbox_{part}" / name[:4] / name, rng)
    (root / "info").mkdir(exist_ok=True)
    (root / "info" / f"{part}_name.txt").write_text("\n".join(names) + "\n")
    scipy.io.savemat(
        root / "info" / f"tracks_{part}_info.mat",
        {f"track_{part}_info": np.array(info, dtype=np.float64)},
    )
    return [
        tuple(str(root / f"bbox_{part}" / n[:4] / n) for n in frames) for frames in frames_of_row
    ]


def make_mars(root: Path, seed: int = 0) -> Layout:
    rng = np.random.default_rng(seed)
    train_rows = mars_rows(rng, [2, 5, 11, 40], junk=1)
    test_rows = mars_rows(rng, [0, 1, 3, 7, 9], junk=2)
    train_frames = write_mars_part(root, rng, "train", train_rows)
    test_frames = write_mars_part(root, rng, "test", test_rows)
    # Queries: a random subset of the test rows of real people, in a random order.
    candidates = [i for i, (pid, _, _) in enumerate(test_rows) if pid > 0]
    query = [int(i) for i in rng.choice(candidates, size=4, replace=False)]
    scipy.io.savemat(
        root / "info" / "query_IDX.mat", {"query_IDX": np.array(query, dtype=np.float64) + 1}
    )
    layout = Layout(root, skipped={"junk tracklets": 3})
    layout.splits["train"] = [
        (f, pid, cam - 1, i)
        for i, (f, (pid, cam, _)) in enumerate(zip(train_frames, train_rows, strict=True))
        if pid != -1
    ]
    test = [
        (f, pid, cam - 1, i)
        for i, (f, (pid, cam, _)) in enumerate(zip(test_frames, test_rows, strict=True))
    ]
    layout.splits["query"] = [test[i] for i in query]
    layout.splits["gallery"] = [t for t in test if t[3] not in query and t[1] != -1]
    return layout


def test_mars_records_are_the_track_info_rows_with_frames_sorted_and_junk_left_out(tmp_path):
    layout = make_mars(tmp_path / "mars")
    dataset = build_dataset("mars", layout.root)
    assert dataset.is_video
    assert as_tuples(dataset.train) == relabelled(layout.splits["train"])
    assert as_tuples(dataset.query) == layout.splits["query"]
    assert as_tuples(dataset.gallery) == layout.splits["gallery"]
    assert dataset.skipped == layout.skipped
    assert any(t[1] == 0 for t in layout.splits["gallery"])  # distractors kept
    for record in dataset.train + dataset.query + dataset.gallery:
        assert all(Path(f).is_file() for f in record.frames)


def test_mars_parent_folder_is_accepted_and_statistics_count_tracklets_and_frames(tmp_path):
    layout = make_mars(tmp_path / "MARS", seed=1)
    dataset = build_dataset("mars", tmp_path)
    assert dataset.root == layout.root
    table = dataset.statistics()
    for split in SPLITS:
        tracklets = layout.splits[split]
        ids, frames = len({t[1] for t in tracklets}), sum(len(t[0]) for t in tracklets)
        cams = len({t[2] for t in tracklets})
        row = f"{split:<8} | {ids:>6} | {len(tracklets):>11} | {frames:>9} | {cams:>9}"
        assert row in table
    assert "skipped by protocol: 3 junk tracklets" in table


def rewrite_mat(path: Path, key: str, edit) -> None:
    mat = scipy.io.loadmat(path)
    scipy.io.savemat(path, {key: edit(mat[key])})


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_bbox_test", r"folder .*bbox_test not found; expected layout"),
        ("no_query_file", r"file .*query_IDX.mat not found; expected layout"),
        ("short_name_list", r"row \d+ \[.*\] spans names \d+\.\.\d+, but .*test_name.txt has"),
        ("wrong_key", r"tracks_train_info.mat lacks the key 'track_train_info' \(found: tracks\)"),
        ("query_out_of_range", r"query_IDX.mat key 'query_IDX' holds 99, outside 1\.\.\d+"),
        (
            "pid_mismatch",
            r"train_name.txt is of person .*\(the name list and track info disagree\)",
        ),
        ("camera_7", r"camera 7 is outside 1\.\.6"),
        ("not_a_mat", r"cannot read .*tracks_test_info.mat as a MATLAB file"),
    ],
)
def test_a_wrong_mars_layout_is_named(tmp_path, breakage, message):
    layout = make_mars(tmp_path / "mars", seed=2)
    info = layout.root / "info"
    if breakage == "no_bbox_test":
        (layout.root / "bbox_test").rename(tmp_path / "moved")
    elif breakage == "no_query_file":
        (info / "query_IDX.mat").unlink()
    elif breakage == "short_name_list":
        names = (info / "test_name.txt").read_text().split()
        last = int(scipy.io.loadmat(info / "tracks_test_info.mat")["track_test_info"][:, 1].max())
        (info / "test_name.txt").write_text("\n".join(names[: last - 1]))
    elif breakage == "wrong_key":
        rewrite = scipy.io.loadmat(info / "tracks_train_info.mat")["track_train_info"]
        scipy.io.savemat(info / "tracks_train_info.mat", {"tracks": rewrite})
    elif breakage == "query_out_of_range":
        rewrite_mat(info / "query_IDX.mat", "query_IDX", lambda q: np.append(q, 99))
    elif breakage == "pid_mismatch":
        rewrite_mat(
            info / "tracks_train_info.mat",
            "track_train_info",
            lambda t: t + np.array([0, 0, 1000, 0]) * (t[:, 2:3] > 0),
        )
    elif breakage == "camera_7":

        def camera_7(t):
            t[t[:, 2] > 0, 3] = 7
            return t

        rewrite_mat(info / "tracks_train_info.mat", "track_train_info", camera_7)
    elif breakage == "not_a_mat":
        (info / "tracks_test_info.mat").write_bytes(b"not a MATLAB file at all")
    with pytest.raises(DatasetError, match=message):
        build_dataset("mars", layout.root)


# ----------------------------------------------------------------------------------- iLIDS-VID


ILIDS_PERSONS = [1, 2, 4, 7, 10, 12, 15, 19]  # gaps, as the release's 300 of 319


def write_sequences(cam_dirs, persons, folder_name, frame_name, rng, suffix=".png"):
    """A sequence folder per person and camera with 1-6 frames whose numbers are not in
    creation order; returns {(folder, camera index): sorted frame paths}."""
    written = {}
    for c, cam_dir in enumerate(cam_dirs):
        for pid in persons[c]:
            folder = cam_dir / folder_name(pid)
            numbers = rng.choice(np.arange(1, 400), size=rng.integers(1, 7), replace=False)
            paths = [folder / (frame_name(c, pid, int(k)) + suffix) for k in numbers]
            for path in paths:
                write_frame(path, rng)
            written[folder.name, c] = tuple(sorted(str(p) for p in paths))
    return written


def make_ilidsvid(root: Path, seed: int = 0, num_splits: int = 10) -> tuple[Path, dict, np.ndarray]:
    """An iLIDS-VID layout: (root, sequences written, ls_set)."""
    rng = np.random.default_rng(seed)
    cams = [root / "i-LIDS-VID" / "sequences" / c for c in ("cam1", "cam2")]
    written = write_sequences(
        cams,
        (ILIDS_PERSONS, ILIDS_PERSONS),
        lambda pid: f"person{pid:03d}",
        lambda c, pid, k: f"cam{c + 1}_person{pid:03d}_{k:05d}",
        rng,
    )
    n = len(ILIDS_PERSONS)
    ls_set = np.stack([rng.permutation(n) + 1 for _ in range(num_splits)]).astype(np.float64)
    (root / "train-test people splits").mkdir(parents=True)
    scipy.io.savemat(
        root / "train-test people splits" / "train_test_splits_ilidsvid.mat", {"ls_set": ls_set}
    )
    return root, written, ls_set


def two_camera_expected(written, persons, train, test, folder_name):
    """Train: both cameras of each train person; query camera 0, gallery camera 1 of each test
    person; persons in increasing order, tid = camera * (camera 0 folders) + folder rank."""
    folders = [sorted(folder_name(p) for p in cam) for cam in persons]

    def tid(pid, c):
        return c * len(folders[0]) + folders[c].index(folder_name(pid))

    def tracklets(pids, cams):
        return [(written[folder_name(p), c], p, c, tid(p, c)) for p in sorted(pids) for c in cams]

    return {
        "train": tracklets(train, (0, 1)),
        "query": tracklets(test, (0,)),
        "gallery": tracklets(test, (1,)),
    }


def test_ilidsvid_each_split_tests_the_first_half_of_its_ls_set_row(tmp_path):
    root, written, ls_set = make_ilidsvid(tmp_path)
    persons = sorted(ILIDS_PERSONS)  # ls_set indexes the sorted folders: numbers sort alike here
    half = len(persons) // 2
    for split_id in range(10):
        row = ls_set[split_id].astype(int) - 1
        test = [persons[i] for i in row[:half]]
        train = [persons[i] for i in row[half:]]
        expected = two_camera_expected(
            written, (persons, persons), train, test, lambda p: f"person{p:03d}"
        )
        dataset = build_dataset("ilidsvid", root, split_id=split_id)
        assert as_tuples(dataset.train) == relabelled(expected["train"])
        assert as_tuples(dataset.query) == expected["query"]
        assert as_tuples(dataset.gallery) == expected["gallery"]
        assert dataset.skipped == {}


def test_ilidsvid_parent_folder_is_accepted_and_options_are_checked(tmp_path):
    root, _, _ = make_ilidsvid(tmp_path / "ilids-vid", seed=1)
    assert build_dataset("ilidsvid", tmp_path, split_id=3).root == root
    check_options("ilidsvid", {"split_id": 3})
    with pytest.raises(ConfigError, match=r"data.options.split: unknown option.*split_id"):
        check_options("ilidsvid", {"split": 3})
    with pytest.raises(ConfigError, match=r"data.options.split_id: unknown option.*mars"):
        check_options("mars", {"split_id": 0})


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("split_id_10", r"split_id=10 is outside 0\.\.9"),
        (
            "nine_splits",
            r"split_id=9, but .*train_test_splits_ilidsvid.mat key 'ls_set' has 9 split",
        ),
        ("index_0", r"'ls_set' row 10 holds index 0, outside 1\.\.8"),
        ("index_twice", r"'ls_set' row 10 names a person twice"),
        ("wrong_shape", r"'ls_set' has shape \(10, 7\); expected \(splits, 8\)"),
        ("wrong_key", r"train_test_splits_ilidsvid.mat lacks the key 'ls_set' \(found: splits\)"),
        ("no_cam2", r"folder .*sequences/cam2 not found; expected layout"),
        ("cam1_only", r"person folder person015 is in .*cam1 only"),
        ("empty_sequence", r"sequence folder .*cam2/person004 holds no .png frame"),
        ("bad_folder", r"sequence folder .*cam1/someone does not match"),
    ],
)
def test_a_wrong_ilidsvid_layout_is_named(tmp_path, breakage, message):
    root, _, ls_set = make_ilidsvid(
        tmp_path, seed=2, num_splits=9 if breakage == "nine_splits" else 10
    )
    mat = root / "train-test people splits" / "train_test_splits_ilidsvid.mat"
    cams = root / "i-LIDS-VID" / "sequences"
    if breakage == "index_0":
        ls_set[9, 2] = 0
        scipy.io.savemat(mat, {"ls_set": ls_set})
    elif breakage == "index_twice":
        ls_set[9, 2] = ls_set[9, 3]
        scipy.io.savemat(mat, {"ls_set": ls_set})
    elif breakage == "wrong_shape":
        scipy.io.savemat(mat, {"ls_set": ls_set[:, :7]})
    elif breakage == "wrong_key":
        scipy.io.savemat(mat, {"splits": ls_set})
    elif breakage == "no_cam2":
        (cams / "cam2").rename(tmp_path / "moved")
    elif breakage == "cam1_only":
        (cams / "cam2" / "person015").rename(tmp_path / "moved")
    elif breakage == "empty_sequence":
        for frame in (cams / "cam2" / "person004").iterdir():
            frame.unlink()
    elif breakage == "bad_folder":
        (cams / "cam1" / "someone").mkdir()
    split_id = 10 if breakage == "split_id_10" else 9
    with pytest.raises(DatasetError, match=message):
        build_dataset("ilidsvid", root, split_id=split_id)


# ---------------------------------------------------------------------------- PRID 2011 video


PRID_A = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # 9, 10: camera a only
PRID_B = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13]  # 11..13: camera b only; 7, 8 outside the splits
PRID_SPLIT_PERSONS = [1, 2, 3, 4, 5, 6]


def prid_folder(pid: int) -> str:
    return f"person_{pid:04d}"


def make_prid(root: Path, seed: int = 0, num_splits: int = 10) -> tuple[Path, dict, list]:
    """A PRID 2011 multi-shot layout under ROOT/prid_2011/: (ROOT, sequences, splits)."""
    rng = np.random.default_rng(seed)
    cams = [root / "prid_2011" / "multi_shot" / c for c in ("cam_a", "cam_b")]
    written = write_sequences(cams, (PRID_A, PRID_B), prid_folder, lambda c, p, k: f"{k:04d}", rng)
    splits = []
    for _ in range(num_splits):
        persons = [PRID_SPLIT_PERSONS[i] for i in rng.permutation(len(PRID_SPLIT_PERSONS))]
        splits.append({"test": persons[:3], "train": persons[3:]})
    (root / "splits_prid2011.json").write_text(
        json.dumps([{k: [prid_folder(p) for p in v] for k, v in s.items()} for s in splits])
    )
    return root, written, splits


def test_prid2011_video_each_split_queries_camera_a_against_camera_b_of_its_test_persons(tmp_path):
    root, written, splits = make_prid(tmp_path)
    outside = len(PRID_A) + len(PRID_B) - 2 * len(PRID_SPLIT_PERSONS)
    for split_id, split in enumerate(splits):
        expected = two_camera_expected(
            written, (PRID_A, PRID_B), split["train"], split["test"], prid_folder
        )
        dataset = build_dataset("prid2011_video", root, split_id=split_id)
        assert as_tuples(dataset.train) == relabelled(expected["train"])
        assert as_tuples(dataset.query) == expected["query"]
        assert as_tuples(dataset.gallery) == expected["gallery"]
        assert dataset.skipped == {"sequences outside the split": outside}


@pytest.mark.parametrize("where", ["parent", "release_folder"])
def test_prid2011_video_accepts_the_references_root_and_the_release_folder(tmp_path, where):
    if where == "parent":
        root, _, splits = make_prid(tmp_path / "prid2011", seed=1)
        given = tmp_path
    else:  # ROOT is prid_2011/ itself, holding multi_shot/ and the json
        root, _, splits = make_prid(tmp_path, seed=1)
        (tmp_path / "splits_prid2011.json").rename(tmp_path / "prid_2011" / "splits_prid2011.json")
        given = root = tmp_path / "prid_2011"
    dataset = build_dataset("prid2011_video", given, split_id=4)
    assert dataset.root == root
    test = sorted(splits[4]["test"])
    assert [r.pid for r in dataset.query] == test
    assert all(isinstance(r, TrackletRecord) for r in dataset.query)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("split_id_minus_1", r"split_id=-1 is outside 0\.\.9"),
        ("two_splits", r"split_id=5, but .*splits_prid2011.json has 2 splits"),
        ("no_test_key", r"split 5 lacks a list of folder names under the key 'test'"),
        ("missing_folder", r"split 5 names 'person_0099', but .*cam_a/person_0099 is not a folder"),
        ("camera_a_only", r"split 5 names 'person_0009', but .*cam_b/person_0009 is not a folder"),
        ("overlap", r"split 5 puts 'person_000\d' in both train and test"),
        ("bad_name", r"split 5 key 'train' names 'p1'; expected person folder names"),
        ("not_json", r"splits_prid2011.json is not valid JSON"),
        ("no_json", r"file .*splits_prid2011.json not found; expected layout"),
        ("no_cam_b", r"folder .*multi_shot/cam_b not found; expected layout"),
    ],
)
def test_a_wrong_prid2011_video_layout_is_named(tmp_path, breakage, message):
    root, _, splits = make_prid(tmp_path, seed=2)
    path = root / "splits_prid2011.json"
    named = [{k: [prid_folder(p) for p in v] for k, v in s.items()} for s in splits]
    if breakage == "two_splits":
        named = named[:2]
    elif breakage == "no_test_key":
        del named[5]["test"]
    elif breakage == "missing_folder":
        named[5]["test"].append("person_0099")
    elif breakage == "camera_a_only":
        named[5]["train"].append("person_0009")
    elif breakage == "overlap":
        named[5]["train"].append(named[5]["test"][0])
    elif breakage == "bad_name":
        named[5]["train"].append("p1")
    elif breakage == "no_cam_b":
        (root / "prid_2011" / "multi_shot" / "cam_b").rename(tmp_path / "moved")
    path.write_text(json.dumps(named))
    if breakage == "not_json":
        path.write_text("[{'train': ")
    elif breakage == "no_json":
        path.unlink()
    split_id = -1 if breakage == "split_id_minus_1" else 5
    with pytest.raises(DatasetError, match=message):
        build_dataset("prid2011_video", root, split_id=split_id)
