"""Market-1501 and DukeMTMC-reID parsers against generated release folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_reid.data.datasets import DatasetError, build_dataset

FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
EXPECTED_TRAIN = dict[str, tuple[int, int, int]]


def market_name(rng: np.random.Generator, pid: int, cam: int) -> tuple[str, int]:
    frame = int(rng.integers(0, 999_999))
    seq = int(rng.integers(1, 7))
    return f"{pid:04d}_c{cam}s{seq}_{frame:06d}_{int(rng.integers(0, 10)):02d}.jpg", frame


def duke_name(rng: np.random.Generator, pid: int, cam: int) -> tuple[str, int]:
    frame = int(rng.integers(0, 9_999_999))
    return f"{pid:04d}_c{cam}_f{frame:07d}.jpg", frame


def make_tree(root: Path, seed: int, duke: bool = False) -> tuple[dict, int]:
    """Empty image files named as the release names them (the parser never opens them).

    Returns ``{split: {file name: (original pid, 0-based camera, frame)}}`` and the number of
    junk files (pid -1, Market only) written into the gallery and query folders.
    """
    rng = np.random.default_rng(seed)
    num_cams, name = (8, duke_name) if duke else (6, market_name)
    ids = rng.permutation(np.arange(1, 1000))
    n_train, n_test = int(rng.integers(4, 12)), int(rng.integers(3, 9))
    split_ids = {"train": ids[:n_train], "test": ids[n_train : n_train + n_test]}
    expected: dict[str, dict[str, tuple[int, int, int]]] = {s: {} for s in FOLDERS}

    def add(split: str, pid: int, cam: int) -> None:
        file_name, frame = name(rng, pid, cam)
        expected[split][file_name] = (pid, cam - 1, frame)

    for pid in split_ids["train"]:
        for _ in range(int(rng.integers(1, 6))):
            add("train", int(pid), int(rng.integers(1, num_cams + 1)))
    for pid in split_ids["test"]:
        cams = rng.choice(np.arange(1, num_cams + 1), size=2, replace=False)
        add("query", int(pid), int(cams[0]))
        for _ in range(int(rng.integers(1, 4))):
            add("gallery", int(pid), int(cams[1]))
    for _ in range(int(rng.integers(1, 4))):  # distractors
        add("gallery", 0, int(rng.integers(1, num_cams + 1)))
    junk_names = []
    for split, folder in FOLDERS.items():
        (root / folder).mkdir(parents=True)
        for file_name in expected[split]:
            (root / folder / file_name).touch()
        if not duke and split != "train":
            for _ in range(int(rng.integers(1, 3))):
                junk_name, _ = market_name(rng, 1, int(rng.integers(1, 7)))
                (root / folder / junk_name.replace("0001_", "-1_", 1)).touch()
                junk_names.append(junk_name)
    if not duke:
        on_camera_clock(expected, junk_names)
    return expected, len(junk_names)


def on_camera_clock(expected: dict, junk_names: list[str]) -> None:
    """Market frames moved, in place, onto their camera's clock: sequence s of camera c starts
    after the longest frame of each of c's earlier sequences among all files, junk included."""
    longest: dict[tuple[int, int], int] = {}
    names = [n for split in expected.values() for n in split] + junk_names
    for name in names:
        camseq, frame = name.split("_")[1:3]
        key = (int(camseq[1]), int(camseq[3]))
        longest[key] = max(longest.get(key, 0), int(frame))
    for split in expected.values():
        for name, (pid, cam, frame) in split.items():
            seq = int(name.split("_")[1][3])
            earlier = [n for (c, s), n in longest.items() if c == cam + 1 and s < seq]
            split[name] = (pid, cam, frame + sum(earlier))


def by_name(records) -> dict[str, tuple[int, int, int]]:
    return {Path(r.path).name: (r.pid, r.camid, r.frame) for r in records}


def assert_matches(dataset, expected: dict) -> None:
    assert by_name(dataset.query) == expected["query"]
    assert by_name(dataset.gallery) == expected["gallery"]
    # Train labels are the rank of the original id among the train ids.
    train_ids = sorted({pid for pid, _, _ in expected["train"].values()})
    label = {pid: i for i, pid in enumerate(train_ids)}
    assert by_name(dataset.train) == {
        name: (label[pid], cam, frame) for name, (pid, cam, frame) in expected["train"].items()
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["market1501", "dukemtmcreid"])
def test_records_match_the_generated_tree(tmp_path, name, seed):
    expected, junk = make_tree(tmp_path, seed, duke=name == "dukemtmcreid")
    dataset = build_dataset(name, tmp_path)
    assert_matches(dataset, expected)
    assert dataset.skipped == {"junk images": junk}
    assert dataset.num_train_pids == len({p for p, _, _ in expected["train"].values()})
    assert all(Path(r.path).is_file() for r in dataset.train + dataset.query + dataset.gallery)


@pytest.mark.parametrize(
    ("name", "release"),
    [("market1501", "Market-1501-v15.09.15"), ("dukemtmcreid", "DukeMTMC-reID")],
)
def test_root_may_be_the_parent_of_the_release_folder(tmp_path, name, release):
    expected, _ = make_tree(tmp_path / release, 3, duke=name == "dukemtmcreid")
    dataset = build_dataset(name, tmp_path)
    assert dataset.root == tmp_path / release
    assert_matches(dataset, expected)


def test_junk_is_dropped_and_distractors_stay_in_the_gallery(tmp_path):
    expected, junk = make_tree(tmp_path, 4)
    dataset = build_dataset("market1501", tmp_path)
    assert junk > 0 and dataset.skipped["junk images"] == junk
    assert all(r.pid != -1 for r in dataset.train + dataset.query + dataset.gallery)
    distractors = [r for r in dataset.gallery if r.pid == 0]
    assert len(distractors) == sum(pid == 0 for pid, _, _ in expected["gallery"].values()) > 0
    assert f"skipped by protocol: {junk} junk images" in dataset.statistics()


def test_train_labels_are_consecutive_and_follow_the_original_ids(tmp_path):
    expected, _ = make_tree(tmp_path, 5, duke=True)
    dataset = build_dataset("dukemtmcreid", tmp_path)
    original = {name: pid for name, (pid, _, _) in expected["train"].items()}
    labels = {}
    for r in dataset.train:
        labels.setdefault(original[Path(r.path).name], set()).add(r.pid)
    assert all(len(v) == 1 for v in labels.values())  # same person, same label
    assert sorted(min(v) for v in labels.values()) == list(range(len(labels)))
    ordered = [min(labels[pid]) for pid in sorted(labels)]
    assert ordered == sorted(ordered)


@pytest.mark.parametrize("folder", list(FOLDERS.values()))
def test_a_missing_folder_is_named(tmp_path, folder):
    make_tree(tmp_path, 6)
    for f in (tmp_path / folder).iterdir():
        f.unlink()
    (tmp_path / folder).rmdir()
    with pytest.raises(DatasetError, match=f"folder .*{folder} not found"):
        build_dataset("market1501", tmp_path)


def test_a_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nowhere not found"):
        build_dataset("market1501", tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["market1501", "dukemtmcreid"])
def test_a_bad_file_name_names_the_file_and_the_pattern(tmp_path, name):
    make_tree(tmp_path, 7, duke=name == "dukemtmcreid")
    (tmp_path / "query" / "0001_cam1_000.jpg").touch()
    with pytest.raises(DatasetError, match=r"0001_cam1_000\.jpg does not match .*pattern"):
        build_dataset(name, tmp_path)


def test_a_camera_outside_the_set_is_an_error(tmp_path):
    make_tree(tmp_path, 8)
    (tmp_path / "query" / "0001_c7s1_000151_01.jpg").touch()
    with pytest.raises(DatasetError, match=r"camera 7 .* outside 1..6"):
        build_dataset("market1501", tmp_path)


def test_a_distractor_outside_the_gallery_is_an_error(tmp_path):
    make_tree(tmp_path, 9)
    (tmp_path / "bounding_box_train" / "0000_c1s1_000151_01.jpg").touch()
    with pytest.raises(DatasetError, match="distractor pid 0 in train"):
        build_dataset("market1501", tmp_path)


@pytest.mark.parametrize("split", list(FOLDERS))
def test_an_empty_split_is_an_error(tmp_path, split):
    make_tree(tmp_path, 10, duke=True)
    for f in (tmp_path / FOLDERS[split]).iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=f"the {split} split .* is empty"):
        build_dataset("dukemtmcreid", tmp_path)


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("market1051", "market1501"), ("dukemtmc-reid", "dukemtmcreid"), ("msmt", "msmt17")],
)
def test_a_misspelt_name_suggests_the_registered_one(tmp_path, typo, suggestion):
    with pytest.raises(DatasetError, match=f"did you mean '{suggestion}'"):
        build_dataset(typo, tmp_path)
