"""MSMT17 parser against generated V1 and V2 release folders with their list files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_reid.data.datasets import DatasetError, build_dataset

TIMES = ("morning", "noon", "afternoon")


def make_release(root: Path, seed: int, train_dir: str, test_dir: str) -> dict:
    """Empty images under ``train_dir``/``test_dir`` and the four list files naming them.

    Returns ``{list name: [(file path, pid, 0-based camera, frame), ...]}`` in list order.
    """
    rng = np.random.default_rng(seed)
    n_train, n_test = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    expected: dict[str, list[tuple[str, int, int, int]]] = {}
    lines: dict[str, list[str]] = {}

    def add(list_name: str, folder: str, pid: int, index: int) -> None:
        cam = int(rng.integers(1, 16))
        frame = int(rng.integers(0, 10_000))
        date = f"{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        name = f"{pid:04d}_{index:03d}_{cam:02d}_{date}{rng.choice(TIMES)}_{frame:04d}_0.jpg"
        path = root / folder / f"{pid:04d}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        lines.setdefault(list_name, []).append(f"{pid:04d}/{name} {pid}")
        expected.setdefault(list_name, []).append((str(path), pid, cam - 1, frame))

    # Train and val share identities; test ids restart at 0 and are other people.
    for pid in range(n_train):
        for index in range(int(rng.integers(1, 4))):
            add("list_train.txt", train_dir, pid, index)
        add("list_val.txt", train_dir, pid, 99)
    for pid in range(n_test):
        add("list_query.txt", test_dir, pid, 0)
        for index in range(1, int(rng.integers(2, 5))):
            add("list_gallery.txt", test_dir, pid, index)
    for list_name, list_lines in lines.items():
        (root / list_name).write_text("\n".join(list_lines) + "\n")
    return expected


def relabelled(records: list[tuple[str, int, int, int]]) -> list[tuple[str, int, int, int]]:
    label = {pid: i for i, pid in enumerate(sorted({r[1] for r in records}))}
    return [(path, label[pid], cam, frame) for path, pid, cam, frame in records]


def as_tuples(records) -> list[tuple[str, int, int, int | None]]:
    return [(r.path, r.pid, r.camid, r.frame) for r in records]


@pytest.mark.parametrize(
    ("release", "train_dir", "test_dir"),
    [
        ("MSMT17_V1", "train", "test"),
        ("MSMT17_V2", "mask_train_v2", "mask_test_v2"),
        ("MSMT17_V2", "train", "test"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_records_match_the_list_files(tmp_path, release, train_dir, test_dir, seed):
    expected = make_release(tmp_path / release, seed, train_dir, test_dir)
    for root in (tmp_path, tmp_path / release):
        dataset = build_dataset("msmt17", root)
        assert dataset.root == tmp_path / release
        assert as_tuples(dataset.train) == relabelled(
            expected["list_train.txt"] + expected["list_val.txt"]
        )
        assert as_tuples(dataset.query) == expected["list_query.txt"]
        assert as_tuples(dataset.gallery) == expected["list_gallery.txt"]
        assert dataset.skipped == {}


def test_train_alone_when_val_is_not_combined(tmp_path):
    expected = make_release(tmp_path, 2, "train", "test")
    dataset = build_dataset("msmt17", tmp_path, combine_train_val=False)
    assert as_tuples(dataset.train) == relabelled(expected["list_train.txt"])


def test_v1_is_chosen_when_both_releases_are_present(tmp_path):
    make_release(tmp_path / "MSMT17_V1", 3, "train", "test")
    make_release(tmp_path / "MSMT17_V2", 4, "mask_train_v2", "mask_test_v2")
    assert build_dataset("msmt17", tmp_path).root == tmp_path / "MSMT17_V1"
    assert build_dataset("msmt17", tmp_path / "MSMT17_V2").root == tmp_path / "MSMT17_V2"


def test_frame_is_none_when_the_name_has_no_frame_field(tmp_path):
    make_release(tmp_path, 5, "train", "test")
    (tmp_path / "test" / "0000" / "0000_050_03_short.jpg").touch()
    with (tmp_path / "list_query.txt").open("a") as f:
        f.write("0000/0000_050_03_short.jpg 0\n\n")  # a trailing blank line is not a record
    record = build_dataset("msmt17", tmp_path).query[-1]
    assert (Path(record.path).name, record.pid, record.camid, record.frame) == (
        "0000_050_03_short.jpg",
        0,
        2,
        None,
    )


@pytest.mark.parametrize(
    "bad_line", ["0000/0000_000_01_0303morning_0015_0.jpg", "0000/x.jpg zero", "a b c"]
)
def test_a_malformed_line_names_the_list_file_and_line(tmp_path, bad_line):
    make_release(tmp_path, 6, "train", "test")
    path = tmp_path / "list_gallery.txt"
    lines = path.read_text().splitlines()
    lines.insert(1, bad_line)
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"list_gallery\.txt line 2: .* is not 'FOLDER/IMAGE"):
        build_dataset("msmt17", tmp_path)


def test_a_listed_image_that_does_not_exist_names_list_line_and_image(tmp_path):
    expected = make_release(tmp_path, 7, "train", "test")
    Path(expected["list_val.txt"][1][0]).unlink()
    name = Path(expected["list_val.txt"][1][0]).name
    with pytest.raises(DatasetError, match=rf"list_val\.txt line 2: image .*{name} .*not exist"):
        build_dataset("msmt17", tmp_path)


def test_a_bad_image_name_or_camera_is_an_error(tmp_path):
    make_release(tmp_path, 8, "train", "test")
    with (tmp_path / "list_query.txt").open("a") as f:
        f.write("0001/0001_000_16_0303noon_0001_0.jpg 1\n")
    with pytest.raises(DatasetError, match=r"list_query\.txt line \d+: camera 16 .* outside"):
        build_dataset("msmt17", tmp_path)
    with (tmp_path / "list_query.txt").open("a") as f:
        f.write("0001/0001.jpg 1\n")
    lines = (tmp_path / "list_query.txt").read_text().splitlines()
    (tmp_path / "list_query.txt").write_text("\n".join(lines[:-2] + lines[-1:]))
    with pytest.raises(DatasetError, match=r"'0001\.jpg' does not match the expected pattern"):
        build_dataset("msmt17", tmp_path)


@pytest.mark.parametrize(
    "list_name", ["list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"]
)
def test_a_missing_list_file_is_named(tmp_path, list_name):
    make_release(tmp_path / "MSMT17_V1", 9, "train", "test")
    (tmp_path / "MSMT17_V1" / list_name).unlink()
    with pytest.raises(DatasetError, match=rf"MSMT17_V1/{list_name} not found"):
        build_dataset("msmt17", tmp_path)


def test_a_missing_image_folder_is_named(tmp_path):
    make_release(tmp_path, 10, "mask_train_v2", "mask_test_v2")
    (tmp_path / "mask_test_v2").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match="folders test, mask_test_v2 found"):
        build_dataset("msmt17", tmp_path)


def test_an_empty_list_is_an_empty_split(tmp_path):
    make_release(tmp_path, 11, "train", "test")
    (tmp_path / "list_query.txt").write_text("")
    with pytest.raises(DatasetError, match=r"the query split .* is empty"):
        build_dataset("msmt17", tmp_path)
