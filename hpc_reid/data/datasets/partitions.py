"""The ``partitions.pkl`` + ``images/`` format of AlignedReID-Re-Production-Pytorch and CACE-Net."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

from .base import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    match_name,
    register_dataset,
    require_dir,
    require_file,
)

REQUIRED_KEYS = (
    "train_im_names",
    "train_ids2labels",
    "val_im_names",
    "val_marks",
    "test_im_names",
    "test_marks",
)
QUERY, GALLERY, MULTI_QUERY = 0, 1, 2


@register_dataset("partitions")
class Partitions(ReidDataset):
    """Any data set converted to the ``partitions.pkl`` format of huanghoujing's
    AlignedReID-Re-Production-Pytorch (for Zhang et al., "AlignedReID: Surpassing Human-Level
    Performance in Person Re-Identification", arXiv 1711.08184), also read by CACE-Net (Jiang et
    al., "Devil's in the Details: Aligning Visual Clues for Conditional Embedding in Person
    Re-Identification", arXiv 2009.05250).

    Source: the conversion scripts of those repositories (Market-1501, DukeMTMC-reID, CUHK03);
    sizes are those of the converted set. ``partitions.pkl`` holds ``train_im_names`` with
    ``train_ids2labels`` ({person id: label}), and ``val_im_names``/``val_marks`` and
    ``test_im_names``/``test_marks``, where mark 0 is query, 1 gallery and 2 multi-query.
    Image names are ``PPPPPPPP_CCCC_OOOOOOOO.jpg`` (or .png; CACE-Net's README shows other
    widths, so any width is accepted): person, camera, image offset.

    Protocol: ``split`` picks the evaluation pair, ``"test"`` or ``"val"`` (the val identities
    are held out of ``train_im_names``); ``train_part="trainval"`` trains on
    ``trainval_im_names`` with ``trainval_ids2labels`` instead, which the AlignedReID scripts do
    before reporting test results. Multi-query images (mark 2) are left out (counted in
    ``skipped``). ``camera_from="field"`` reads the whole camera field as the camera number (the
    AlignedReID scripts write it so, 1-based for Market-1501 and Duke, 0-based for CUHK03);
    ``"first_digit"`` reads only its first digit (CACE-Net: the rest is a track id). Camera
    numbers are mapped to 0-based ids by their rank among all cameras the pickle names, so the
    mapping is the same whichever split is read. Train pids come from the ids-to-labels map
    (then relabelled to 0..N-1 in label order); query and gallery keep the person ids.
    """

    name = "partitions"
    pattern = re.compile(r"(\d+)_(\d+)_(\d+)\.(?:png|jpe?g)")
    layout = (
        "  ROOT/partitions.pkl  (dict with keys " + ", ".join(REQUIRED_KEYS) + ")\n"
        "  ROOT/images/00000002_0001_00000000.jpg ...  (person_camera_offset; .png too)"
    )

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        camera_from: str = "field",
        train_part: str = "train",
    ):
        for option, value, allowed in (
            ("split", split, ("test", "val")),
            ("camera_from", camera_from, ("field", "first_digit")),
            ("train_part", train_part, ("train", "trainval")),
        ):
            if value not in allowed:
                raise DatasetError(f"{self.name}: {option}={value!r} is not one of {allowed}")
        self.root = Path(root).expanduser()
        self.camera_from = camera_from
        require_dir(self.root, self.name, self.layout)
        self.pickle_path = require_file(self.root / "partitions.pkl", self.name, self.layout)
        self.image_dir = require_dir(self.root / "images", self.name, self.layout)
        with self.pickle_path.open("rb") as f:
            # Written by Python 2 scripts: latin1 turns their byte strings into str losslessly.
            self.partitions = pickle.load(f, encoding="latin1")
        if not isinstance(self.partitions, dict):
            raise DatasetError(
                f"{self.name}: {self.pickle_path} holds a {type(self.partitions).__name__}; "
                "expected a dict"
            )
        keys = list(REQUIRED_KEYS)
        if train_part == "trainval":
            keys += ["trainval_im_names", "trainval_ids2labels"]
        missing = [k for k in keys if k not in self.partitions]
        if missing:
            raise DatasetError(
                f"{self.name}: {self.pickle_path} lacks the key(s) {', '.join(missing)}; "
                f"expected keys: {', '.join(keys)}"
            )

        name_keys = ["train_im_names", "val_im_names", "test_im_names"]
        name_keys += ["trainval_im_names"] if "trainval_im_names" in self.partitions else []
        parsed = {k: [self.parse_name(n, k) for n in self.names(k)] for k in name_keys}
        cameras = sorted({cam for names in parsed.values() for _, _, cam in names})
        self.camera_rank = {cam: i for i, cam in enumerate(cameras)}

        train = self.train_records(parsed[f"{train_part}_im_names"], f"{train_part}_ids2labels")
        query, gallery, multi_query = [], [], []
        by_mark = {QUERY: query, GALLERY: gallery, MULTI_QUERY: multi_query}
        marks = self.marks(f"{split}_marks", len(parsed[f"{split}_im_names"]), f"{split}_im_names")
        for (path, pid, cam), mark in zip(parsed[f"{split}_im_names"], marks, strict=True):
            by_mark[mark].append(ImageRecord(path, pid, self.camera_rank[cam]))
        self._finish(train, query, gallery, {"multi-query images": len(multi_query)})

    def names(self, key: str) -> list[str]:
        names = self.partitions[key]
        if not isinstance(names, list | tuple | np.ndarray):
            raise DatasetError(
                f"{self.name}: {self.pickle_path} key {key!r} holds a {type(names).__name__}; "
                "expected a list of image names"
            )
        # Python 2 str (and numpy 'S' arrays) unpickle as bytes.
        return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]

    def parse_name(self, name: str, key: str) -> tuple[str, int, int]:
        """(path, person id, camera number as written) of one image named under ``key``."""
        path = self.image_dir / name
        m = match_name(self.pattern, path, self.name)
        if not path.is_file():
            raise DatasetError(
                f"{self.name}: image {path} named in {self.pickle_path} key {key!r} does not exist"
            )
        field = m.group(2)
        cam = int(field) if self.camera_from == "field" else int(field[0])
        return str(path), int(m.group(1)), cam

    def marks(self, key: str, expected: int, names_key: str) -> list[int]:
        marks = [int(m) for m in self.partitions[key]]
        if len(marks) != expected:
            raise DatasetError(
                f"{self.name}: {self.pickle_path} key {key!r} has {len(marks)} marks but "
                f"{names_key!r} has {expected} names"
            )
        bad = [m for m in marks if m not in (QUERY, GALLERY, MULTI_QUERY)]
        if bad:
            raise DatasetError(
                f"{self.name}: {self.pickle_path} key {key!r} holds mark {bad[0]}; expected "
                f"{QUERY} (query), {GALLERY} (gallery) or {MULTI_QUERY} (multi-query)"
            )
        return marks

    def train_records(self, parsed: list[tuple[str, int, int]], key: str) -> list[ImageRecord]:
        """Train records labelled by the pickle's ids-to-labels map ``key``."""
        ids2labels = {}
        for pid, label in dict(self.partitions[key]).items():
            if not str(pid).strip().isdigit():
                raise DatasetError(
                    f"{self.name}: {self.pickle_path} key {key!r} maps {pid!r}; expected person ids"
                )
            ids2labels[int(pid)] = int(label)
        pids = {pid for _, pid, _ in parsed}
        unlabelled = sorted(pids - ids2labels.keys())
        if unlabelled:
            raise DatasetError(
                f"{self.name}: {self.pickle_path} key {key!r} has no label for train person "
                f"id {unlabelled[0]} ({len(unlabelled)} unlabelled in all)"
            )
        if len({ids2labels[pid] for pid in pids}) != len(pids):
            raise DatasetError(
                f"{self.name}: {self.pickle_path} key {key!r} gives two train person ids the "
                "same label"
            )
        return [
            ImageRecord(path, ids2labels[pid], self.camera_rank[cam]) for path, pid, cam in parsed
        ]
