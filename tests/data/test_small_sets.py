"""VIPeR, PRID 2011 and i-LIDS parsers: protocols on the real images, release layouts, errors.

The real images are the PETA copies in ``../shared/data`` (override with HPC_REID_SHARED_DATA;
missing, they skip these tests, or fail them under CI: ``tests/shared_data.py``);
the reference every check compares against is built here from the folder listing with
``str.split``, never with the parsers' code. Release layouts are generated as empty files.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from hpc_reid.data.datasets import DatasetError, available_datasets, build_dataset
from tests.shared_data import require_shared_data

FOLDERS = {"viper": "viper", "prid2011": "prid2011_single_shot", "ilids": "ilids"}


def real_root(name: str) -> Path:
    return require_shared_data(f"{FOLDERS[name]}/images", directory=True).parent


def listing(root: Path) -> dict[str, list[str]]:
    """File name -> its ``_``-separated fields without the suffix."""
    return {n: n.rsplit(".", 1)[0].split("_") for n in os.listdir(root / "images")}


def ids(records) -> set[int]:
    return {r.pid for r in records}


def names(records) -> set[str]:
    return {Path(r.path).name for r in records}


def signature(dataset) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(names(getattr(dataset, s))) for s in ("train", "query", "gallery"))


def test_the_three_sets_are_registered():
    assert {"viper", "prid2011", "ilids"} <= set(available_datasets())


# --- The real images -------------------------------------------------------------------------


def test_viper_real_splits_hold_316_train_and_316_test_ids_camera_1_queries():
    root = real_root("viper")
    ref = {n: (int(f[0]), int(f[2])) for n, f in listing(root).items()}
    assert len(ref) == 1264 and len({pid for pid, _ in ref.values()}) == 632
    for split_id in range(10):
        dataset = build_dataset("viper", str(root), split_id=split_id)
        assert len(dataset.train) == 632 and dataset.num_train_pids == 316
        assert len(dataset.query) == len(dataset.gallery) == 316
        assert ids(dataset.query) == ids(dataset.gallery) and len(ids(dataset.query)) == 316
        assert {r.camid for r in dataset.query} == {0} and {r.camid for r in dataset.gallery} == {1}
        for records, cam in ((dataset.query, 1), (dataset.gallery, 2)):
            assert all(ref[Path(r.path).name] == (r.pid, cam) for r in records)
        train_ids = {ref[n][0] for n in names(dataset.train)}
        assert len(train_ids) == 316 and not train_ids & ids(dataset.query)
        assert names(dataset.train) == {n for n, (pid, _) in ref.items() if pid in train_ids}
        label = {pid: i for i, pid in enumerate(sorted(train_ids))}
        for r in dataset.train:
            assert (r.pid, r.camid) == (
                label[ref[Path(r.path).name][0]],
                ref[Path(r.path).name][1] - 1,
            )
            assert r.frame is None


def test_prid2011_real_splits_query_100_shared_ids_against_649_camera_b_ids():
    root = real_root("prid2011")
    ref = {n: (int(f[0]), f[1]) for n, f in listing(root).items()}
    cam_a = {pid for pid, cam in ref.values() if cam == "a"}
    cam_b = {pid for pid, cam in ref.values() if cam == "b"}
    assert (len(ref), len(cam_a), len(cam_b), len(cam_a | cam_b)) == (1134, 385, 749, 934)
    assert cam_a & cam_b == set(range(1, 201))
    for split_id in range(10):
        dataset = build_dataset("prid2011", root, split_id=split_id)
        assert dataset.skipped == {"camera-a-only identities": 185}
        test_ids = ids(dataset.query)
        assert len(test_ids) == len(dataset.query) == 100 and test_ids <= cam_a & cam_b
        assert all(ref[Path(r.path).name] == (r.pid, "a") and r.camid == 0 for r in dataset.query)
        assert all(ref[Path(r.path).name] == (r.pid, "b") and r.camid == 1 for r in dataset.gallery)
        assert ids(dataset.gallery) == test_ids | (cam_b - cam_a)
        assert len(ids(dataset.gallery)) == len(dataset.gallery) == 649
        train_ids = {ref[n][0] for n in names(dataset.train)}
        assert train_ids == (cam_a & cam_b) - test_ids and len(train_ids) == 100
        assert len(dataset.train) == 200 and dataset.num_train_pids == 100
        assert {r.camid for r in dataset.train} == {0, 1}


def test_ilids_real_splits_hold_59_train_ids_and_one_query_image_per_60_test_ids():
    root = real_root("ilids")
    ref = {n: int(f[0]) for n, f in listing(root).items()}
    per_id: dict[int, set[str]] = defaultdict(set)
    for n, pid in ref.items():
        per_id[pid].add(n)
    protocol_ids = {pid for pid, files in per_id.items() if len(files) >= 2}
    # The PETA copy adds identity 120 with a single image to the release's 119 / 476.
    assert len(ref) == 477 and len(protocol_ids) == 119 and len(per_id) == 120
    for split_id in range(10):
        dataset = build_dataset("ilids", root, split_id=split_id)
        assert dataset.skipped == {"single-image identities": len(per_id) - 119}
        test_ids = ids(dataset.query)
        assert len(test_ids) == len(dataset.query) == 60 and ids(dataset.gallery) == test_ids
        train_ids = {ref[n] for n in names(dataset.train)}
        assert len(train_ids) == dataset.num_train_pids == 59 and not train_ids & test_ids
        assert train_ids | test_ids == protocol_ids
        assert names(dataset.train) == set().union(*(per_id[p] for p in train_ids))
        assert not names(dataset.query) & names(dataset.gallery)
        for q in dataset.query:
            gallery = {Path(g.path).name for g in dataset.gallery if g.pid == q.pid}
            assert (
                gallery == per_id[q.pid] - {Path(q.path).name} and ref[Path(q.path).name] == q.pid
            )
        # Camera ids stand in for "not the query image": Market's rule removes nothing.
        assert {r.camid for r in dataset.query} == {0} and {r.camid for r in dataset.gallery} == {1}
        assert {r.camid for r in dataset.train} == {0}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_real_splits_are_a_function_of_seed_and_split_id(name):
    root = real_root(name)
    draws = []
    for split_id in range(10):
        split = signature(build_dataset(name, root, split_id=split_id, seed=3))
        assert split == signature(build_dataset(name, root, split_id=split_id, seed=3))
        assert split != signature(build_dataset(name, root, split_id=split_id, seed=4))
        draws.append(split)
    assert len(set(draws)) == 10


def test_real_splits_use_the_documented_generator():
    rng = np.random.default_rng([7, 2])
    viper = build_dataset("viper", real_root("viper"), split_id=2, seed=7)
    viper_ids = sorted({int(n.split("_")[0]) for n in listing(real_root("viper"))})
    assert ids(viper.query) == {int(p) for p in rng.choice(viper_ids, 316, replace=False)}

    rng = np.random.default_rng([7, 2])
    prid = build_dataset("prid2011", real_root("prid2011"), split_id=2, seed=7)
    assert ids(prid.query) == {int(p) for p in rng.choice(np.arange(1, 201), 100, replace=False)}

    rng = np.random.default_rng([7, 2])
    ilids = build_dataset("ilids", real_root("ilids"), split_id=2, seed=7)
    per_id: dict[int, list[str]] = defaultdict(list)
    for n in sorted(listing(real_root("ilids"))):
        per_id[int(n.split("_")[0])].append(n)
    pids = sorted(p for p, files in per_id.items() if len(files) >= 2)
    test_ids = sorted(int(p) for p in rng.choice(pids, 60, replace=False))
    assert names(ilids.query) == {per_id[p][int(rng.integers(len(per_id[p])))] for p in test_ids}


# --- Release layouts, generated --------------------------------------------------------------


def make_viper_release(root: Path) -> dict[str, tuple[int, int]]:
    """``root/VIPeR/cam_{a,b}/PID_ANGLE.bmp``: 632 people numbered 0..873 with gaps."""
    rng = np.random.default_rng(0)
    expected = {}
    for pid in sorted(rng.choice(874, size=632, replace=False)):
        for camid, cam in enumerate(("cam_a", "cam_b")):
            folder = root / "VIPeR" / cam
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{pid:03d}_{rng.choice([0, 45, 90, 135, 180])}.bmp"
            (folder / name).touch()
            expected[f"{cam}/{name}"] = (int(pid), camid)
    return expected


def test_viper_release_layout_gives_the_protocol_splits(tmp_path):
    expected = make_viper_release(tmp_path)
    for root in (tmp_path, tmp_path / "VIPeR"):
        dataset = build_dataset("viper", root, split_id=5)
        assert dataset.root == tmp_path / "VIPeR"
        assert dataset.num_train_pids == 316 and len(dataset.train) == 632
        assert len(ids(dataset.query)) == len(dataset.query) == len(dataset.gallery) == 316
        for records in (dataset.query, dataset.gallery):
            for r in records:
                key = f"{Path(r.path).parent.name}/{Path(r.path).name}"
                assert expected[key] == (r.pid, r.camid)
        assert {r.camid for r in dataset.query} == {0} and {r.camid for r in dataset.gallery} == {1}


def test_prid2011_release_layout_numbers_one_camera_people_apart(tmp_path):
    """Release numbers: camera a 1..385, camera b 1..749; only 1..200 are the same people."""
    single_shot = tmp_path / "prid_2011" / "single_shot"
    for cam, count in (("cam_a", 385), ("cam_b", 749)):
        (single_shot / cam).mkdir(parents=True)
        for n in range(1, count + 1):
            (single_shot / cam / f"person_{n:04d}.png").touch()
    for root in (tmp_path, tmp_path / "prid_2011"):
        dataset = build_dataset("prid2011", root, split_id=1)
        assert dataset.root == tmp_path / "prid_2011"
        assert dataset.skipped == {"camera-a-only identities": 185}
        test_ids = ids(dataset.query)
        assert len(test_ids) == 100 and test_ids <= set(range(1, 201))
        assert all(Path(r.path).parent.name == "cam_a" and r.camid == 0 for r in dataset.query)
        assert all(Path(r.path).parent.name == "cam_b" and r.camid == 1 for r in dataset.gallery)
        # Camera-b-only people keep their number unless a camera-a person has it (PETA's ids).
        gallery = {(r.pid, int(Path(r.path).stem.split("_")[1])) for r in dataset.gallery}
        b_only = {(n + 1000 if n <= 385 else n, n) for n in range(201, 750)}
        assert gallery == {(p, p) for p in test_ids} | b_only
        assert dataset.num_train_pids == 100 and len(dataset.train) == 200
        train_numbers = {int(Path(r.path).stem.split("_")[1]) for r in dataset.train}
        assert train_numbers == set(range(1, 201)) - test_ids


def test_prid2011_release_and_peta_layouts_give_the_same_splits(tmp_path):
    real = build_dataset("prid2011", real_root("prid2011"), split_id=4)
    for cam, count in (("cam_a", 385), ("cam_b", 749)):
        (tmp_path / "single_shot" / cam).mkdir(parents=True)
        for n in range(1, count + 1):
            (tmp_path / "single_shot" / cam / f"person_{n:04d}.png").touch()
    release = build_dataset("prid2011", tmp_path, split_id=4)
    for split in ("query", "gallery"):
        assert ids(getattr(real, split)) == ids(getattr(release, split))


def test_ilids_release_layout_gives_the_protocol_splits(tmp_path):
    rng = np.random.default_rng(0)
    persons = tmp_path / "i-LIDS_Pedestrian" / "Persons"
    persons.mkdir(parents=True)
    counts = {pid: int(rng.integers(2, 9)) for pid in range(1, 120)}
    for pid, count in counts.items():
        for image in range(1, count + 1):
            (persons / f"{pid:04d}{image:03d}.jpg").touch()
    for root in (tmp_path, tmp_path / "i-LIDS_Pedestrian"):
        dataset = build_dataset("ilids", root, split_id=9, seed=2)
        assert dataset.skipped == {"single-image identities": 0}
        assert dataset.num_train_pids == 59 and len(ids(dataset.query)) == len(dataset.query) == 60
        assert len(dataset.train) + len(dataset.query) + len(dataset.gallery) == sum(
            counts.values()
        )
        for r in dataset.query + dataset.gallery:
            assert int(Path(r.path).name[:4]) == r.pid
        assert len(dataset.gallery) == sum(counts[p] - 1 for p in ids(dataset.query))


# --- Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FOLDERS))
def test_a_missing_root_names_the_expected_layout(tmp_path, name):
    with pytest.raises(
        DatasetError, match=rf"(?s){name}: .*{tmp_path / 'nowhere'}.*expected layout"
    ):
        build_dataset(name, tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "bad_file"),
    [
        ("viper", "images/000_45.png"),
        ("viper", "cam_a/000.bmp"),
        ("prid2011", "images/0001_c.png"),
        ("prid2011", "single_shot/cam_b/person_a.png"),
        ("ilids", "images/0001001.jpg"),
        ("ilids", "Persons/0001_001.jpg"),
    ],
)
def test_a_file_name_off_the_pattern_is_named(tmp_path, name, bad_file):
    for folder in (
        "cam_a",
        "cam_b",
        "single_shot/cam_a",
        "single_shot/cam_b",
        Path(bad_file).parent,
    ):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / bad_file).touch()
    with pytest.raises(DatasetError, match=rf"{Path(bad_file).name} does not match .*pattern"):
        build_dataset(name, tmp_path)


@pytest.mark.parametrize("name", list(FOLDERS))
@pytest.mark.parametrize("split_id", [-1, 10])
def test_split_id_outside_0_to_9_is_an_error(tmp_path, name, split_id):
    with pytest.raises(DatasetError, match=rf"split_id={split_id} is outside 0..9"):
        build_dataset(name, tmp_path, split_id=split_id)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["cam_a/000_45.bmp", "cam_a/000_90.bmp", "cam_b/000_0.bmp"], r"identity 0 has 2 camera-1"),
        (["cam_a/007_45.bmp"], r"identity 7 has 1 camera-1 image\(s\) \['007_45.bmp'\] and 0"),
    ],
)
def test_viper_identity_without_one_image_per_camera_is_named(tmp_path, files, message):
    for folder in ("cam_a", "cam_b"):
        (tmp_path / folder).mkdir()
    for f in files:
        (tmp_path / f).touch()
    with pytest.raises(DatasetError, match=message):
        build_dataset("viper", tmp_path)


def test_prid2011_needs_200_shared_identities_and_one_image_per_camera(tmp_path):
    (tmp_path / "images").mkdir()
    for pid in range(1, 151):
        for cam in "ab":
            (tmp_path / "images" / f"{pid:04d}_{cam}.png").touch()
    with pytest.raises(DatasetError, match=r"150 identities .* seen by both cameras; .* 200"):
        build_dataset("prid2011", tmp_path)
    cam_a = tmp_path / "prid_2011" / "single_shot" / "cam_a"
    cam_a.mkdir(parents=True)
    (cam_a.parent / "cam_b").mkdir()
    (cam_a / "person_0001.png").touch()
    (cam_a / "person_001.png").touch()
    with pytest.raises(DatasetError, match=r"identity 1 has 2 camera-a images"):
        build_dataset("prid2011", tmp_path / "prid_2011")


@pytest.mark.parametrize(("name", "folder"), [("viper", "images"), ("ilids", "images")])
def test_too_few_identities_for_the_protocol_is_an_error(tmp_path, name, folder):
    (tmp_path / folder).mkdir()
    with pytest.raises(DatasetError, match=r"holds 0 identities"):
        build_dataset(name, tmp_path)
