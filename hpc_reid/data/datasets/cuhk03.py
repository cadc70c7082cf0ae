"""CUHK03 under the new 767/700 protocol: from the release's .mat files or cuhk03-np folders."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image

from hpc_reid.atomic import write_atomic

from .base import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    list_images,
    match_name,
    register_dataset,
    require_dir,
    require_file,
)
from .market1501 import SPLIT_FOLDERS

VARIANTS = ("labeled", "detected")
RAW_MAT = "cuhk-03.mat"
RAW_FOLDER = "cuhk03_release"  # the folder cuhk03_release.zip unpacks to
CONFIG_FILES = {v: f"cuhk03_new_protocol_config_{v}.mat" for v in VARIANTS}
CONFIG_KEYS = ("train_idx", "query_idx", "gallery_idx", "labels", "filelist", "camId")
# campair (1..5) _ person within the pair (1-based) _ view (1: images 1-5, 2: images 6-10) _ image
FILE_NAME = re.compile(r"([1-5])_(\d{3})_([12])_(\d{2})\.png")
NP_FILE_NAME = re.compile(r"(\d+)_c([12])_(\d+)\.png")


@register_dataset("cuhk03")
class CUHK03(ReidDataset):
    """CUHK03 (Li et al., "DeepReID: Deep Filter Pairing Neural Network for Person
    Re-identification", CVPR 2014) under the new protocol of Zhong et al. ("Re-ranking Person
    Re-identification with k-reciprocal Encoding", CVPR 2017).

    Source: ``cuhk03_release/cuhk-03.mat`` (MATLAB v7.3: up to 10 images of each of 1,467
    identities from 5 camera pairs, 5 per camera, as hand-labelled and as DPM-detected boxes) and
    the new protocol's ``cuhk03_new_protocol_config_{labeled,detected}.mat`` from
    github.com/zhunzhong07/person-re-ranking. Labeled: train 767 ids / 7,368 images, query 700 /
    1,400, gallery 700 / 5,328. Detected: train 767 / 7,365, query 700 / 1,400, gallery 700 / 5,332.

    Protocol: the config's ``train_idx``, ``query_idx`` and ``gallery_idx`` (1-based into
    ``filelist``) are the splits, ``labels`` the person ids and ``camId`` (1 or 2, the view within
    the camera pair) the cameras; at evaluation, gallery images of the query's identity from the
    query's camera are removed. On first use the images of the chosen ``variant`` are extracted
    from ``cuhk-03.mat`` to ``ROOT/images_{variant}/`` with torchreid's names
    ``{campair}_{pid:03d}_{view}_{image:02d}.png`` (every file written under a temporary name, then
    renamed, so an interrupted extraction never leaves a partial image; existing files are kept).
    The pre-split cuhk03-np folders (``ROOT/{variant}/bounding_box_train`` etc., names
    ``PPPP_cC_N.png``) are read instead when no config file is present.
    """

    name = "cuhk03"
    layout = (
        "  ROOT/cuhk-03.mat  (or ROOT/cuhk03_release/cuhk-03.mat; MATLAB v7.3)\n"
        "  ROOT/cuhk03_new_protocol_config_labeled.mat\n"
        "  ROOT/cuhk03_new_protocol_config_detected.mat\n"
        "  (images are extracted to ROOT/images_labeled/, ROOT/images_detected/)\n"
        "or the cuhk03-np folders:\n"
        "  ROOT/labeled/bounding_box_train/0001_c1_1.png ... (and query/, bounding_box_test/)\n"
        "  ROOT/detected/...\n"
        "(ROOT may also hold a folder cuhk03/ or cuhk03-np/ laid out as above)"
    )

    def __init__(self, root: str | Path, variant: str = "labeled"):
        if variant not in VARIANTS:
            raise DatasetError(f"{self.name}: variant {variant!r} is not one of {VARIANTS}")
        self.variant = variant
        self.root = find_root(Path(root).expanduser())
        require_dir(self.root, self.name, self.layout)
        np_folder = self.root / variant
        if not (self.root / CONFIG_FILES[variant]).is_file() and np_folder.is_dir():
            train, query, gallery = self.read_np_folders(np_folder)
        else:
            train, query, gallery = self.read_mat_protocol()
        self._finish(train, query, gallery)

    def read_mat_protocol(self) -> tuple[list[ImageRecord], ...]:
        config_path = require_file(self.root / CONFIG_FILES[self.variant], self.name, self.layout)
        config = read_config(config_path)
        names = config["filelist"]
        image_dir = self.root / f"images_{self.variant}"
        if not all((image_dir / n).is_file() for n in names):
            extract_images(self.raw_mat_path(), self.variant, image_dir)
            for n in names:
                if not (image_dir / n).is_file():
                    raise DatasetError(
                        f"{self.name}: image {n} named in {config_path} is not in "
                        f"{self.raw_mat_path()} ({self.variant} boxes)"
                    )
        splits = []
        for key in ("train_idx", "query_idx", "gallery_idx"):
            splits.append(
                [
                    ImageRecord(
                        str(image_dir / names[i]), int(config["labels"][i]), config["camId"][i] - 1
                    )
                    for i in config[key]
                ]
            )
        return tuple(splits)

    def raw_mat_path(self) -> Path:
        for path in (self.root / RAW_MAT, self.root / RAW_FOLDER / RAW_MAT):
            if path.is_file():
                return path
        return require_file(self.root / RAW_MAT, self.name, self.layout)

    def read_np_folders(self, folder: Path) -> tuple[list[ImageRecord], ...]:
        splits = []
        for split_folder in SPLIT_FOLDERS.values():
            records = []
            for path in list_images(require_dir(folder / split_folder, self.name, self.layout)):
                m = match_name(NP_FILE_NAME, path, self.name)
                records.append(ImageRecord(str(path), int(m.group(1)), int(m.group(2)) - 1))
            splits.append(records)
        return tuple(splits)


def find_root(root: Path) -> Path:
    """The folder holding the config files or the cuhk03-np folders: ``root`` or a child of it."""
    for folder in (root, root / "cuhk03", root / "cuhk03-np"):
        if any((folder / f).is_file() for f in CONFIG_FILES.values()) or any(
            (folder / v / SPLIT_FOLDERS["train"]).is_dir() for v in VARIANTS
        ):
            return folder
    return root


def read_config(path: Path) -> dict[str, np.ndarray]:
    """The new protocol's config as 0-based index arrays, person ids, 1-based cameras, names."""
    mat = scipy.io.loadmat(str(path))
    missing = [k for k in CONFIG_KEYS if k not in mat]
    if missing:
        raise DatasetError(
            f"cuhk03: {path} lacks the key(s) {', '.join(missing)}; "
            f"expected {', '.join(CONFIG_KEYS)}"
        )
    names = [cell_string(c) for c in mat["filelist"].ravel()]
    config: dict[str, np.ndarray] = {"filelist": np.array(names, dtype=object)}
    for name in names:
        match_name(FILE_NAME, Path(name), "cuhk03")
    for key in ("labels", "camId", "train_idx", "query_idx", "gallery_idx"):
        values = mat[key].ravel()
        if values.size and not np.array_equal(values, np.round(values)):
            raise DatasetError(f"cuhk03: {path} key {key!r} holds non-integer values")
        config[key] = values.astype(np.int64)
    for key in ("labels", "camId"):
        if len(config[key]) != len(names):
            raise DatasetError(
                f"cuhk03: {path} key {key!r} has {len(config[key])} entries but 'filelist' "
                f"has {len(names)}"
            )
    bad_cams = np.flatnonzero((config["camId"] != 1) & (config["camId"] != 2))
    if bad_cams.size:
        i = bad_cams[0]
        raise DatasetError(
            f"cuhk03: {path} key 'camId' holds {config['camId'][i]} at entry {i + 1} "
            f"({names[i]}); expected 1 or 2"
        )
    for key in ("train_idx", "query_idx", "gallery_idx"):
        idx = config[key]
        bad = np.flatnonzero((idx < 1) | (idx > len(names)))
        if bad.size:
            raise DatasetError(
                f"cuhk03: {path} key {key!r} holds index {idx[bad[0]]}, outside 1..{len(names)} "
                "(1-based indices into 'filelist')"
            )
        config[key] = idx - 1
    return config


def cell_string(cell: object) -> str:
    """A MATLAB cell holding a char array, as scipy.io.loadmat returns it, as a Python string."""
    while isinstance(cell, np.ndarray):
        if cell.size != 1:
            raise DatasetError(f"cuhk03: 'filelist' entry {cell!r} is not a single file name")
        cell = cell.item()
    return str(cell)


def extract_images(mat_path: Path, variant: str, image_dir: Path) -> int:
    """Write the ``variant`` images of ``cuhk-03.mat`` as PNGs; return how many were written.

    ``mat[variant]`` is a 1x5 cell of camera-pair cells, each (persons x 10) of image arrays.
    h5py sees MATLAB arrays transposed: a cell array as (10, persons), an HxWx3 image as 3xWxH.
    An empty cell (a missing image) is stored as a 1-D placeholder.
    """
    image_dir.mkdir(exist_ok=True)
    written = 0
    with h5py.File(mat_path, "r") as mat:
        if variant not in mat:
            raise DatasetError(
                f"cuhk03: {mat_path} has no {variant!r} cell; found {', '.join(mat.keys())}"
            )
        for campair, pair_ref in enumerate(mat[variant][()].ravel(), start=1):
            cells = mat[pair_ref][()].T
            for pid, row in enumerate(cells, start=1):
                for image, ref in enumerate(row, start=1):
                    pixels = mat[ref]
                    if pixels.ndim != 3 or pixels.size == 0:
                        continue
                    view = 1 if image <= 5 else 2
                    path = image_dir / f"{campair}_{pid:03d}_{view}_{image:02d}.png"
                    if path.is_file():
                        continue
                    if pixels.dtype != np.uint8 or pixels.shape[0] != 3:
                        raise DatasetError(
                            f"cuhk03: {mat_path} {variant} image for {path.name} has shape "
                            f"{pixels.shape} and type {pixels.dtype}; expected uint8 3 x W x H"
                        )
                    write_png_atomically(np.ascontiguousarray(pixels[()].T), path)
                    written += 1
    return written


def write_png_atomically(pixels: np.ndarray, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file.
    No fsync: a conversion writes thousands of these, and after a crash it runs again."""
    write_atomic(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"), fsync=False)
