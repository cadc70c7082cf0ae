"""CUHK01 parser against a generated ``campus/`` folder of the release's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_reid.data.datasets import DatasetError, build_dataset

NUM_IDS = 971


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """``ROOT/campus/PPPPNNN.png``: 971 people, images 001-002 camera A, 003-004 camera B."""
    root = tmp_path_factory.mktemp("cuhk01")
    (root / "campus").mkdir()
    for pid in range(1, NUM_IDS + 1):
        for image in range(1, 5):
            (root / "campus" / f"{pid:04d}{image:03d}.png").touch()
    return root


def ids(records) -> set[int]:
    return {r.pid for r in records}


@pytest.mark.parametrize(("num_test_ids", "num_train_ids"), [(485, 486), (100, 871)])
def test_split_sizes_and_cameras_follow_the_protocol(release, num_test_ids, num_train_ids):
    dataset = build_dataset("cuhk01", release, num_test_ids=num_test_ids)
    assert dataset.root == release / "campus"
    assert len(ids(dataset.query)) == len(ids(dataset.gallery)) == num_test_ids
    assert ids(dataset.query) == ids(dataset.gallery)
    assert dataset.num_train_pids == num_train_ids and len(dataset.train) == 4 * num_train_ids
    assert len(dataset.query) == len(dataset.gallery) == 2 * num_test_ids
    for records, images, camid in ((dataset.query, "001", 0), (dataset.gallery, "003", 1)):
        for r in records:
            name = Path(r.path).name
            assert r.camid == camid and name[4:7] in (images, f"{int(images) + 1:03d}")
            assert r.pid == int(name[:4])  # test ids stay the original person numbers
    # Train ids are every other person, relabelled in order, both cameras.
    train_ids = sorted(set(range(1, NUM_IDS + 1)) - ids(dataset.query))
    label = {pid: i for i, pid in enumerate(train_ids)}
    for r in dataset.train:
        name = Path(r.path).name
        assert (r.pid, r.camid) == (label[int(name[:4])], (int(name[4:7]) - 1) // 2)


def test_the_split_is_a_function_of_seed_and_split_id(release):
    def test_ids(**options) -> set[int]:
        return ids(build_dataset("cuhk01", release, **options).query)

    assert test_ids(split_id=3, seed=7) == test_ids(split_id=3, seed=7)
    draws = [frozenset(test_ids(split_id=s)) for s in range(10)]
    assert len(set(draws)) == 10
    assert test_ids(split_id=0, seed=1) != test_ids(split_id=0, seed=0)
    # Pinned: the documented generator, so splits stay the same across versions.
    rng = np.random.default_rng([5, 2])
    pinned = {int(p) for p in rng.choice(np.arange(1, NUM_IDS + 1), size=100, replace=False)}
    assert test_ids(num_test_ids=100, split_id=2, seed=5) == pinned


def test_the_campus_folder_itself_is_accepted(release):
    dataset = build_dataset("cuhk01", release / "campus", num_test_ids=100)
    assert dataset.root == release / "campus" and dataset.num_train_pids == 871


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_test_ids": 200}, r"num_test_ids=200 is not one of the protocols' \(100, 485\)"),
        ({"split_id": 10}, r"split_id=10 is outside 0..9"),
        ({"split_id": -1}, r"split_id=-1 is outside 0..9"),
    ],
)
def test_options_outside_the_protocol_are_errors(release, options, message):
    with pytest.raises(DatasetError, match=message):
        build_dataset("cuhk01", release, **options)


def make_small_campus(root: Path, num_ids: int) -> None:
    (root / "campus").mkdir()
    for pid in range(1, num_ids + 1):
        for image in range(1, 5):
            (root / "campus" / f"{pid:04d}{image:03d}.png").touch()


@pytest.mark.parametrize(
    ("bad_name", "message"),
    [
        ("0001005.png", r"image number 5 in .*0001005\.png is outside 1..4"),
        ("0001_001.png", r"0001_001\.png does not match the expected pattern"),
        ("0001001.jpg", r"0001001\.jpg does not match the expected pattern"),
    ],
)
def test_a_bad_file_name_is_an_error(tmp_path, bad_name, message):
    make_small_campus(tmp_path, 3)
    (tmp_path / "campus" / bad_name).touch()
    with pytest.raises(DatasetError, match=message):
        build_dataset("cuhk01", tmp_path)


def test_too_few_identities_is_an_error(tmp_path):
    make_small_campus(tmp_path, 100)
    with pytest.raises(DatasetError, match="holds 100 identities; num_test_ids=100 leaves none"):
        build_dataset("cuhk01", tmp_path, num_test_ids=100)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"absent not found; expected layout:\n.*campus"):
        build_dataset("cuhk01", tmp_path / "absent")


def test_an_empty_camera_is_an_empty_split(tmp_path):
    make_small_campus(tmp_path, 200)
    for path in (tmp_path / "campus").glob("????00[34].png"):
        path.unlink()
    with pytest.raises(DatasetError, match=r"the gallery split .* is empty"):
        build_dataset("cuhk01", tmp_path, num_test_ids=100)
