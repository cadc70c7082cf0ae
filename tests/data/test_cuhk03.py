"""CUHK03 parser against generated MATLAB v7.3 release files, new-protocol configs, cuhk03-np."""

from __future__ import annotations

import itertools
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from hpc_reid.data.datasets import DatasetError, build_dataset

VARIANTS = ("labeled", "detected")


def write_raw_mat(path: Path, seed: int) -> tuple[dict, list[int]]:
    """A small ``cuhk-03.mat`` laid out as MATLAB v7.3 writes cell arrays.

    Each variant is a 1x5 array of references to camera-pair cells; a cell holding an
    (persons x 10) MATLAB cell array appears to h5py as (10, persons) references, and an HxWx3
    image as a 3xWxH array; an empty cell is a 2-element uint64 placeholder. Returns
    ``{variant: {torchreid file name: HxWx3 pixels}}`` and the persons per camera pair.
    """
    rng = np.random.default_rng(seed)
    persons = [int(n) for n in rng.integers(2, 5, size=5)]
    images: dict[str, dict[str, np.ndarray]] = {v: {} for v in VARIANTS}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as mat:
        refs = mat.create_group("#refs#")
        counter = itertools.count()

        def store(data: np.ndarray) -> h5py.Reference:
            dataset = refs.create_dataset(f"r{next(counter)}", data=data)
            if data.ndim == 1:
                dataset.attrs["MATLAB_empty"] = np.uint8(1)
            return dataset.ref

        for variant in VARIANTS:
            pairs = np.empty((1, 5), dtype=h5py.ref_dtype)
            for campair, n in enumerate(persons, start=1):
                cells = np.empty((10, n), dtype=h5py.ref_dtype)
                for pid, image in itertools.product(range(1, n + 1), range(1, 11)):
                    # Some people lack their last images in a view, as in the release.
                    if image in (5, 10) and rng.random() < 0.4:
                        cells[image - 1, pid - 1] = store(np.zeros(2, dtype=np.uint64))
                        continue
                    shape = (int(rng.integers(4, 10)), int(rng.integers(3, 7)), 3)
                    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                    cells[image - 1, pid - 1] = store(pixels.T)
                    view = 1 if image <= 5 else 2
                    images[variant][f"{campair}_{pid:03d}_{view}_{image:02d}.png"] = pixels
                pairs[0, campair - 1] = store(cells)
            mat.create_dataset(variant, data=pairs)
    return images, persons


def write_config(path: Path, seed: int, names: list[str], persons: list[int]) -> dict:
    """A new-protocol config (MATLAB v5) over ``names``; returns ``{split: {name: (pid, cam)}}``.

    As in the real files, person ids count through the camera pairs from 1, ``camId`` is the
    view (1 or 2), query holds one image per test person and view and gallery the rest.
    """
    rng = np.random.default_rng(seed)
    first_pid = np.cumsum([0, *persons])
    names = [names[i] for i in rng.permutation(len(names))]
    labels = [int(first_pid[int(n[0]) - 1] + int(n[2:5])) for n in names]
    cams = [int(n[6]) for n in names]
    ids = rng.permutation(sorted(set(labels)))
    test_ids = set(ids[: len(ids) // 2].tolist())
    idx: dict[str, list[int]] = {"train": [], "query": [], "gallery": []}
    for i, label in enumerate(labels):
        if label not in test_ids:
            idx["train"].append(i)
    for label, cam in itertools.product(sorted(test_ids), (1, 2)):
        mine = [i for i in range(len(names)) if labels[i] == label and cams[i] == cam]
        query = int(rng.choice(mine))
        idx["query"].append(query)
        idx["gallery"] += [i for i in mine if i != query]

    def column(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.float64).reshape(-1, 1)  # MATLAB doubles

    filelist = np.empty((len(names), 1), dtype=object)
    filelist[:, 0] = names
    scipy.io.savemat(
        path,
        {
            "train_idx": column([i + 1 for i in idx["train"]]),
            "query_idx": column([i + 1 for i in idx["query"]]),
            "gallery_idx": column([i + 1 for i in idx["gallery"]]),
            "labels": column(labels),
            "camId": column(cams),
            "filelist": filelist,
        },
    )
    return {s: {names[i]: (labels[i], cams[i] - 1) for i in idx[s]} for s in idx}


def make_release(root: Path, seed: int, raw_folder: str = "") -> tuple[dict, dict]:
    images, persons = write_raw_mat(root / raw_folder / "cuhk-03.mat", seed)
    expected = {
        v: write_config(
            root / f"cuhk03_new_protocol_config_{v}.mat", seed + i, sorted(images[v]), persons
        )
        for i, v in enumerate(VARIANTS)
    }
    return images, expected


def by_name(records) -> dict[str, tuple[int, int]]:
    return {Path(r.path).name: (r.pid, r.camid) for r in records}


def assert_matches(dataset, expected: dict, image_dir: Path) -> None:
    assert by_name(dataset.query) == expected["query"]
    assert by_name(dataset.gallery) == expected["gallery"]
    label = {pid: i for i, pid in enumerate(sorted({p for p, _ in expected["train"].values()}))}
    assert by_name(dataset.train) == {n: (label[p], c) for n, (p, c) in expected["train"].items()}
    records = dataset.train + dataset.query + dataset.gallery
    assert {Path(r.path).parent for r in records} == {image_dir}
    assert all(r.frame is None for r in records)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_images_are_extracted_pixel_exact_and_splits_follow_the_config(tmp_path, variant, seed):
    images, expected = make_release(tmp_path, seed)
    dataset = build_dataset("cuhk03", tmp_path, variant=variant)
    image_dir = tmp_path / f"images_{variant}"
    assert sorted(p.name for p in image_dir.iterdir()) == sorted(images[variant])
    for name, pixels in images[variant].items():
        np.testing.assert_array_equal(read_png(image_dir / name), pixels)
    assert_matches(dataset, expected[variant], image_dir)
    assert not (tmp_path / f"images_{'detected' if variant == 'labeled' else 'labeled'}").exists()


def test_the_release_folder_and_a_parent_folder_are_accepted(tmp_path):
    _, expected = make_release(tmp_path / "cuhk03", 2, raw_folder="cuhk03_release")
    dataset = build_dataset("cuhk03", tmp_path)
    assert dataset.root == tmp_path / "cuhk03"
    assert_matches(dataset, expected["labeled"], tmp_path / "cuhk03" / "images_labeled")


def test_extracted_images_are_reused_and_existing_files_kept(tmp_path):
    images, expected = make_release(tmp_path, 3)
    build_dataset("cuhk03", tmp_path)
    image_dir = tmp_path / "images_labeled"
    kept, removed = sorted(images["labeled"])[:2]
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(image_dir / kept)
    (image_dir / removed).unlink()
    build_dataset("cuhk03", tmp_path)
    np.testing.assert_array_equal(read_png(image_dir / kept), np.zeros((2, 2, 3), np.uint8))
    np.testing.assert_array_equal(read_png(image_dir / removed), images["labeled"][removed])
    # Once every image is there the release file is no longer needed.
    (tmp_path / "cuhk-03.mat").unlink()
    assert_matches(build_dataset("cuhk03", tmp_path), expected["labeled"], image_dir)


def test_an_interrupted_extraction_leaves_only_whole_images(tmp_path, monkeypatch):
    images, expected = make_release(tmp_path, 4)
    real_save = Image.Image.save
    calls = 0

    def save_then_fail(self, fp, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 4:
            fp.write(b"\x89PNG\r\n\x1a\n half an image")
            raise OSError("No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        build_dataset("cuhk03", tmp_path)
    monkeypatch.undo()
    image_dir = tmp_path / "images_labeled"
    written = sorted(image_dir.iterdir())
    assert len(written) == 3  # no temporary or partial file left behind
    for path in written:
        np.testing.assert_array_equal(read_png(path), images["labeled"][path.name])
    assert_matches(build_dataset("cuhk03", tmp_path), expected["labeled"], image_dir)
    assert len(list(image_dir.iterdir())) == len(images["labeled"])


def rewrite_config(path: Path, **changes) -> None:
    config = scipy.io.loadmat(path)
    config = {k: v for k, v in config.items() if not k.startswith("__")}
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value(config[key])
    scipy.io.savemat(path, config)


def test_an_index_outside_the_filelist_names_the_key_and_value(tmp_path):
    images, _ = make_release(tmp_path, 5)
    n = len(images["labeled"])
    config = tmp_path / "cuhk03_new_protocol_config_labeled.mat"
    rewrite_config(config, gallery_idx=lambda v: np.vstack([v, [[n + 1]]]))
    with pytest.raises(DatasetError, match=rf"'gallery_idx' holds index {n + 1}, outside 1..{n}"):
        build_dataset("cuhk03", tmp_path)
    rewrite_config(config, gallery_idx=lambda v: v[:-1], query_idx=lambda v: v * 0)
    with pytest.raises(DatasetError, match="'query_idx' holds index 0"):
        build_dataset("cuhk03", tmp_path)


def test_a_camera_other_than_1_or_2_is_an_error(tmp_path):
    make_release(tmp_path, 6)
    rewrite_config(
        tmp_path / "cuhk03_new_protocol_config_detected.mat", camId=lambda v: np.where(v == 2, 3, v)
    )
    with pytest.raises(DatasetError, match=r"'camId' holds 3 .*expected 1 or 2"):
        build_dataset("cuhk03", tmp_path, variant="detected")


def test_a_missing_config_key_is_named(tmp_path):
    make_release(tmp_path, 7)
    rewrite_config(tmp_path / "cuhk03_new_protocol_config_labeled.mat", labels=None)
    with pytest.raises(DatasetError, match=r"lacks the key.* labels; expected train_idx"):
        build_dataset("cuhk03", tmp_path)


def test_a_bad_filelist_name_names_the_file_and_pattern(tmp_path):
    make_release(tmp_path, 8)

    def rename_first(filelist: np.ndarray) -> np.ndarray:
        filelist = filelist.copy()
        filelist.flat[0] = np.array(["6_001_1_01.png"])
        return filelist

    rewrite_config(tmp_path / "cuhk03_new_protocol_config_labeled.mat", filelist=rename_first)
    with pytest.raises(DatasetError, match=r"6_001_1_01\.png does not match the expected pattern"):
        build_dataset("cuhk03", tmp_path)


def test_a_filelist_image_missing_from_the_release_is_named(tmp_path):
    images, _ = make_release(tmp_path, 9)
    absent = "5_099_2_10.png"
    assert absent not in images["labeled"]

    def add_absent(filelist: np.ndarray) -> np.ndarray:
        filelist = filelist.copy()
        filelist.flat[-1] = np.array([absent])
        return filelist

    rewrite_config(tmp_path / "cuhk03_new_protocol_config_labeled.mat", filelist=add_absent)
    with pytest.raises(DatasetError, match=rf"{absent} named in .* is not in .*cuhk-03\.mat"):
        build_dataset("cuhk03", tmp_path)


@pytest.mark.parametrize(
    "missing", ["cuhk-03.mat", "cuhk03_new_protocol_config_labeled.mat", "whole folder"]
)
def test_a_missing_file_names_it_and_the_layout(tmp_path, missing):
    make_release(tmp_path, 10)
    if missing == "whole folder":
        root, missing = tmp_path / "elsewhere", "cuhk03_new_protocol_config_labeled.mat"
        root.mkdir()
    else:
        root = tmp_path
        (tmp_path / missing).unlink()
    with pytest.raises(DatasetError, match=rf"{missing} not found; expected layout:\n.*cuhk-03"):
        build_dataset("cuhk03", root)


def test_an_unknown_variant_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="variant 'labelled' is not one of"):
        build_dataset("cuhk03", tmp_path, variant="labelled")


def make_np_folders(root: Path, seed: int) -> dict:
    """The cuhk03-np release: Market-style split folders per variant, ``PPPP_cC_N.png`` names."""
    rng = np.random.default_rng(seed)
    expected: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
    for variant in VARIANTS:
        ids = rng.permutation(np.arange(1, 200))
        n = int(rng.integers(3, 8))
        groups = {"train": ids[:n], "query": ids[n : 2 * n], "gallery": ids[n : 2 * n]}
        expected[variant] = {}
        for split, folder in zip(
            groups, ("bounding_box_train", "query", "bounding_box_test"), strict=True
        ):
            (root / variant / folder).mkdir(parents=True)
            names = {}
            for pid, cam in itertools.product(groups[split].tolist(), (1, 2)):
                for k in range(1, int(rng.integers(2, 4))):
                    name = f"{pid:04d}_c{cam}_{k}.png"
                    (root / variant / folder / name).touch()
                    names[name] = (pid, cam - 1)
            expected[variant][split] = names
    return expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_cuhk03_np_folders_are_read_when_no_config_is_present(tmp_path, variant):
    expected = make_np_folders(tmp_path / "cuhk03-np", 11)
    dataset = build_dataset("cuhk03", tmp_path, variant=variant)
    assert dataset.root == tmp_path / "cuhk03-np"
    assert by_name(dataset.query) == expected[variant]["query"]
    assert by_name(dataset.gallery) == expected[variant]["gallery"]
    label = {
        p: i for i, p in enumerate(sorted({p for p, _ in expected[variant]["train"].values()}))
    }
    assert by_name(dataset.train) == {
        n: (label[p], c) for n, (p, c) in expected[variant]["train"].items()
    }


def test_a_bad_cuhk03_np_name_names_the_file_and_pattern(tmp_path):
    make_np_folders(tmp_path, 12)
    (tmp_path / "detected" / "query" / "0001_c3_1.png").touch()
    with pytest.raises(DatasetError, match=r"0001_c3_1\.png does not match the expected pattern"):
        build_dataset("cuhk03", tmp_path, variant="detected")
