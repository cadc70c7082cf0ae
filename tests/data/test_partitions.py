"""``partitions.pkl`` parser against generated AlignedReID- and CACE-Net-style folders."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest

from hpc_reid.data.datasets import DatasetError, build_dataset

KEYS = ("train_im_names", "train_ids2labels", "val_im_names", "val_marks", "test_im_names")


def make_tree(root: Path, seed: int, style: str = "alignedreid", ext: str = "jpg") -> dict:
    """``ROOT/partitions.pkl`` and empty ``ROOT/images/*`` as the conversion scripts write them.

    ``style="alignedreid"``: camera field = camera number (here 1..6, as for Market-1501), names
    in numpy arrays, int keys in the ids-to-labels maps, multi-query marks (2) in test.
    ``style="cacenet"``: camera field = camera digit + track id, plain lists, str keys.
    Returns the pickle's content plus ``camera`` ({name: camera number}) for the reference.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    cameras: dict[str, int] = {}
    offsets = itertools.count()

    def images(pid: int, n: int) -> list[str]:
        names = []
        for _ in range(n):
            cam = int(rng.integers(1, 7))
            track = int(rng.integers(0, 1000))
            field = f"{cam:04d}" if style == "alignedreid" else f"{cam}{track:03d}"
            name = f"{pid:08d}_{field}_{next(offsets):08d}.{ext}"
            (root / "images" / name).touch()
            cameras[name] = cam
            names.append(name)
        return names

    ids = rng.permutation(np.arange(1, 1500)).tolist()
    n_train, n_val, n_test = (int(n) for n in rng.integers(3, 9, size=3))
    train_ids, val_ids = ids[:n_train], ids[n_train : n_train + n_val]
    test_ids = ids[n_train + n_val : n_train + n_val + n_test]
    train = [n for pid in train_ids for n in images(pid, int(rng.integers(1, 5)))]
    val_query = [n for pid in val_ids for n in images(pid, 1)]
    val_gallery = [n for pid in val_ids for n in images(pid, int(rng.integers(1, 4)))]
    test_query = [n for pid in test_ids for n in images(pid, 1)]
    test_gallery = [n for pid in [*test_ids, 0, 0] for n in images(pid, int(rng.integers(1, 3)))]
    multi_query = [n for pid in test_ids for n in images(pid, 2)] if style == "alignedreid" else []

    def ids2labels(pids: list[int]) -> dict:
        key = int if style == "alignedreid" else str
        return {key(pid): label for label, pid in enumerate(sorted(pids))}

    container = np.array if style == "alignedreid" else list
    partitions = {
        "trainval_im_names": container(train + val_query + val_gallery),
        "trainval_ids2labels": ids2labels(train_ids + val_ids),
        "train_im_names": container(train),
        "train_ids2labels": ids2labels(train_ids),
        "val_im_names": val_query + val_gallery,
        "val_marks": [0] * len(val_query) + [1] * len(val_gallery),
        "test_im_names": test_query + multi_query + test_gallery,
        "test_marks": [0] * len(test_query) + [2] * len(multi_query) + [1] * len(test_gallery),
    }
    with (root / "partitions.pkl").open("wb") as f:
        pickle.dump(partitions, f, protocol=2)
    return {**partitions, "camera": cameras}


def expected_records(root: Path, tree: dict, split: str = "test", train: str = "train") -> dict:
    """The reference: ``{subset: {name: (pid, camid)}}`` from how the tree was generated."""
    rank = {cam: i for i, cam in enumerate(sorted(set(tree["camera"].values())))}

    def pid(name: str) -> int:
        return int(name.split("_")[0])

    names = [str(n) for n in tree[f"{train}_im_names"]]
    label = {p: i for i, p in enumerate(sorted({pid(n) for n in names}))}
    marked = list(zip(tree[f"{split}_im_names"], tree[f"{split}_marks"], strict=True))
    return {
        "train": {n: (label[pid(n)], rank[tree["camera"][n]]) for n in names},
        "query": {n: (pid(n), rank[tree["camera"][n]]) for n, m in marked if m == 0},
        "gallery": {n: (pid(n), rank[tree["camera"][n]]) for n, m in marked if m == 1},
    }


def by_name(records, root: Path) -> dict[str, tuple[int, int]]:
    assert all(Path(r.path).parent == root / "images" for r in records)
    return {Path(r.path).name: (r.pid, r.camid) for r in records}


def assert_matches(dataset, expected: dict, root: Path) -> None:
    for subset in ("train", "query", "gallery"):
        assert by_name(getattr(dataset, subset), root) == expected[subset], subset


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("split", ["test", "val"])
def test_alignedreid_partitions_match_the_generated_tree(tmp_path, seed, split):
    tree = make_tree(tmp_path, seed)
    dataset = build_dataset("partitions", tmp_path, split=split)
    assert_matches(dataset, expected_records(tmp_path, tree, split), tmp_path)
    n_multi = tree["test_marks"].count(2) if split == "test" else 0
    assert dataset.skipped == {"multi-query images": n_multi}


def test_distractors_stay_in_the_gallery(tmp_path):
    make_tree(tmp_path, 3)
    dataset = build_dataset("partitions", tmp_path)
    assert any(r.pid == 0 for r in dataset.gallery)
    assert all(r.pid != 0 for r in dataset.query)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_cacenet_partitions_read_the_camera_from_the_first_digit(tmp_path, ext):
    tree = make_tree(tmp_path, 4, style="cacenet", ext=ext)
    dataset = build_dataset("partitions", tmp_path, camera_from="first_digit")
    assert_matches(dataset, expected_records(tmp_path, tree), tmp_path)
    # Read as a whole field, camera+track numbers become many more "cameras".
    whole = build_dataset("partitions", tmp_path, camera_from="field")
    assert len({r.camid for r in whole.gallery}) > len({r.camid for r in dataset.gallery})


def test_trainval_part_trains_on_train_and_val_identities(tmp_path):
    tree = make_tree(tmp_path, 5)
    dataset = build_dataset("partitions", tmp_path, train_part="trainval")
    assert_matches(dataset, expected_records(tmp_path, tree, train="trainval"), tmp_path)
    assert dataset.num_train_pids == len(tree["trainval_ids2labels"])


def test_python2_byte_string_names_are_decoded(tmp_path):
    tree = make_tree(tmp_path, 6)
    partitions = {k: v for k, v in tree.items() if k != "camera"}
    partitions["test_im_names"] = np.array(tree["test_im_names"], dtype="S")
    with (tmp_path / "partitions.pkl").open("wb") as f:
        pickle.dump(partitions, f, protocol=2)
    assert_matches(
        build_dataset("partitions", tmp_path), expected_records(tmp_path, tree), tmp_path
    )


def test_train_labels_are_relabelled_from_the_ids_to_labels_map(tmp_path):
    tree = make_tree(tmp_path, 7)
    # Labels in the reverse order of the ids: the result must follow the map, then be 0..N-1.
    ids = sorted(tree["train_ids2labels"])
    tree["train_ids2labels"] = {pid: 10 * (len(ids) - i) for i, pid in enumerate(ids)}
    with (tmp_path / "partitions.pkl").open("wb") as f:
        pickle.dump({k: v for k, v in tree.items() if k != "camera"}, f, protocol=2)
    dataset = build_dataset("partitions", tmp_path)
    label = {pid: len(ids) - 1 - i for i, pid in enumerate(ids)}
    assert {(int(Path(r.path).name[:8]), r.pid) for r in dataset.train} == {
        (int(n[:8]), label[int(n[:8])]) for n in tree["train_im_names"]
    }


def rewrite(root: Path, tree: dict, **changes) -> None:
    partitions = {k: v for k, v in tree.items() if k != "camera"}
    for key, value in changes.items():
        if value is None:
            del partitions[key]
        else:
            partitions[key] = value
    with (root / "partitions.pkl").open("wb") as f:
        pickle.dump(partitions, f, protocol=2)


@pytest.mark.parametrize("key", [*KEYS, "test_marks"])
def test_a_missing_key_is_named_with_the_expected_ones(tmp_path, key):
    tree = make_tree(tmp_path, 8)
    rewrite(tmp_path, tree, **{key: None})
    with pytest.raises(DatasetError, match=rf"lacks the key\(s\) {key}; expected keys: train_im_"):
        build_dataset("partitions", tmp_path)


def test_marks_of_another_length_name_both_keys(tmp_path):
    tree = make_tree(tmp_path, 9)
    n = len(tree["val_im_names"])
    rewrite(tmp_path, tree, val_marks=tree["val_marks"][:-1])
    with pytest.raises(
        DatasetError, match=rf"'val_marks' has {n - 1} marks but 'val_im_names' has {n}"
    ):
        build_dataset("partitions", tmp_path, split="val")


def test_an_unknown_mark_is_an_error(tmp_path):
    tree = make_tree(tmp_path, 10)
    rewrite(tmp_path, tree, test_marks=[3, *tree["test_marks"][1:]])
    with pytest.raises(DatasetError, match="'test_marks' holds mark 3"):
        build_dataset("partitions", tmp_path)


def test_a_train_id_without_a_label_is_named(tmp_path):
    tree = make_tree(tmp_path, 11)
    labels = dict(tree["train_ids2labels"])
    dropped = sorted(labels)[1]
    del labels[dropped]
    rewrite(tmp_path, tree, train_ids2labels=labels)
    with pytest.raises(DatasetError, match=f"no label for train person id {dropped} "):
        build_dataset("partitions", tmp_path)


def test_two_ids_with_one_label_is_an_error(tmp_path):
    tree = make_tree(tmp_path, 12)
    rewrite(tmp_path, tree, train_ids2labels=dict.fromkeys(tree["train_ids2labels"], 0))
    with pytest.raises(DatasetError, match="gives two train person ids the same label"):
        build_dataset("partitions", tmp_path)


def test_a_bad_name_names_the_file_and_pattern(tmp_path):
    tree = make_tree(tmp_path, 13)
    (tmp_path / "images" / "0001_c1s1_000151_01.jpg").touch()
    rewrite(tmp_path, tree, val_im_names=[*tree["val_im_names"][:-1], "0001_c1s1_000151_01.jpg"])
    with pytest.raises(DatasetError, match=r"0001_c1s1_000151_01\.jpg does not match .*pattern"):
        build_dataset("partitions", tmp_path)


def test_a_named_image_that_does_not_exist_is_an_error(tmp_path):
    tree = make_tree(tmp_path, 14)
    name = tree["test_im_names"][2]
    (tmp_path / "images" / name).unlink()
    with pytest.raises(DatasetError, match=rf"{name} named in .*key 'test_im_names' does not"):
        build_dataset("partitions", tmp_path)


@pytest.mark.parametrize("missing", ["partitions.pkl", "images"])
def test_a_missing_file_or_folder_is_named(tmp_path, missing):
    tree = make_tree(tmp_path, 15)
    if missing == "images":
        for name in tree["camera"]:
            (tmp_path / "images" / name).unlink()
        (tmp_path / "images").rmdir()
    else:
        (tmp_path / missing).unlink()
    with pytest.raises(DatasetError, match=rf"{missing} not found; expected layout"):
        build_dataset("partitions", tmp_path)


def test_an_empty_query_is_an_error(tmp_path):
    tree = make_tree(tmp_path, 16)
    rewrite(tmp_path, tree, val_marks=[1] * len(tree["val_marks"]))
    with pytest.raises(DatasetError, match=r"the query split .* is empty"):
        build_dataset("partitions", tmp_path, split="val")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"split": "train"}, "split='train' is not one of"),
        ({"camera_from": "digit"}, "camera_from='digit' is not one of"),
        ({"train_part": "all"}, "train_part='all' is not one of"),
    ],
)
def test_unknown_options_are_errors(tmp_path, options, message):
    with pytest.raises(DatasetError, match=message):
        build_dataset("partitions", tmp_path, **options)
