"""VehicleID: an image folder plus list files; one random gallery image per test vehicle."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from .base import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    register_dataset,
    require_dir,
    require_file,
)

TEST_SIZES = (800, 1600, 2400)
#: Draws of the gallery the protocol averages over (fast-reid's "10-fold" test).
NUM_DRAWS = 10
# VehicleID has no camera labels. Queries and gallery get different camids so that the standard
# removal of same-identity same-camera gallery images (the Market protocol) removes nothing: every
# query keeps its identity's one gallery image.
TRAIN_CAMID, QUERY_CAMID, GALLERY_CAMID = 0, 0, 1


@register_dataset("vehicleid")
class VehicleID(ReidDataset):
    """PKU VehicleID (Liu, Tian, Yang, Pang and Huang, "Deep Relative Distance Learning: Tell the
    Difference Between Similar Vehicles", CVPR 2016).

    Source: the ``VehicleID_V1.0`` release, 221,763 images of 26,267 vehicles from daytime
    surveillance cameras, front or rear views. ``train_test_split/train_list.txt`` (13,164 ids /
    113,346 images) trains; ``test_list_{800,1600,2400}.txt`` are the small, medium and large test
    sets (800 ids / 6,493 images, 1,600 / 13,377, 2,400 / 19,777), chosen by ``test_size``. List
    lines are ``NAME VID``, the image being ``image/NAME.jpg``.

    Protocol: for each test vehicle one image is drawn at random as its gallery image and its other
    images are queries, so a test set of N ids has N gallery images and (images - N) queries
    (5,693 / 11,777 / 17,377). Draw ``split_id`` uses ``np.random.default_rng([seed, split_id])``:
    over the test vehicles in increasing id order, one ``integers(0, n)`` each picks the gallery
    image among that vehicle's n images sorted by name. A draw is thus a function of (seed,
    split_id, test list) alone, independent of line order; mean and std over ``NUM_DRAWS`` = 10
    draws (split_id 0..9, seed 0) are reported, as fast-reid does. The option is named
    ``split_id`` (with ``seed``), as for the small person sets, so ``bench/real_data.py``
    campaigns, which set ``data.options = {split_id: s, seed: seed}``, run the draws as splits.
    A vehicle with a single test image is gallery only (a distractor for the other queries), as in
    fast-reid, whose first shuffled image of each vehicle is its gallery image.

    No cameras: train images get camid 0, queries camid 0 and gallery images camid 1, so the
    cross-camera removal at evaluation keeps every gallery match. No frame numbers (``frame`` is
    None): spatial-temporal scoring does not apply. A list line repeated verbatim is read once
    (counted in ``skipped``); an image listed with two vehicle ids, a vehicle in both the train and
    the test list, or a listed image missing from ``image/`` is an error.
    """

    name = "vehicleid"
    release_folder = "VehicleID_V1.0"
    layout = (
        "  ROOT/image/0000001.jpg ...\n"
        "  ROOT/train_test_split/train_list.txt\n"
        "  ROOT/train_test_split/test_list_800.txt, test_list_1600.txt, test_list_2400.txt\n"
        "  (lines 'NAME VID', the image being image/NAME.jpg; ROOT may also hold the release "
        "folder VehicleID_V1.0/)"
    )

    def __init__(self, root: str | Path, test_size: int = 800, split_id: int = 0, seed: int = 0):
        if (
            isinstance(test_size, bool)
            or not isinstance(test_size, int)
            or test_size not in TEST_SIZES
        ):
            raise DatasetError(f"{self.name}: test_size={test_size!r} is not one of {TEST_SIZES}")
        for option, value in (("split_id", split_id), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DatasetError(
                    f"{self.name}: {option}={value!r} is not a non-negative integer "
                    f"(draws 0..{NUM_DRAWS - 1} with seed 0 are the protocol's)"
                )
        root = Path(root).expanduser()
        if not (root / "train_test_split").is_dir() and (root / self.release_folder).is_dir():
            root = root / self.release_folder
        self.root = root
        require_dir(root, self.name, self.layout)
        image_dir = require_dir(root / "image", self.name, self.layout)
        images = set(os.listdir(image_dir))  # one listing, not 130k stat calls
        skipped = {"repeated list lines": 0}
        train = self.read_list("train_list.txt", images, skipped)
        test = self.read_list(f"test_list_{test_size}.txt", images, skipped)
        shared = sorted({vid for _, vid in train} & {vid for _, vid in test})
        if shared:
            raise DatasetError(
                f"{self.name}: vehicle(s) {shared[:5]} under {root / 'train_test_split'} are in "
                f"both train_list.txt and test_list_{test_size}.txt; the protocol's train and "
                "test vehicles are disjoint"
            )
        gallery_names = draw_gallery(test, np.random.default_rng([seed, split_id]))
        query, gallery = [], []
        for name, vid in test:
            if name in gallery_names:
                gallery.append(ImageRecord(str(image_dir / f"{name}.jpg"), vid, GALLERY_CAMID))
            else:
                query.append(ImageRecord(str(image_dir / f"{name}.jpg"), vid, QUERY_CAMID))
        train_records = [
            ImageRecord(str(image_dir / f"{name}.jpg"), vid, TRAIN_CAMID) for name, vid in train
        ]
        self._finish(train_records, query, gallery, {k: v for k, v in skipped.items() if v})

    def read_list(
        self, list_name: str, images: set[str], skipped: dict[str, int]
    ) -> list[tuple[str, int]]:
        """(image name, vehicle id) of each line of ``train_test_split/list_name``, in order."""
        path = require_file(self.root / "train_test_split" / list_name, self.name, self.layout)
        entries: list[tuple[str, int]] = []
        vid_of: dict[str, int] = {}
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.name}: {path} line {line_no}"
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise DatasetError(f"{where}: {line!r} is not 'NAME VID' (e.g. '0004339 1')")
            name, vid = fields[0], int(fields[1])
            if name in vid_of:
                if vid_of[name] != vid:
                    raise DatasetError(
                        f"{where}: image {name} is listed as vehicle {vid} here and as vehicle "
                        f"{vid_of[name]} above; an image shows one vehicle"
                    )
                skipped["repeated list lines"] += 1
                continue
            if f"{name}.jpg" not in images:
                raise DatasetError(
                    f"{where}: image {self.root / 'image' / (name + '.jpg')} does not exist"
                )
            vid_of[name] = vid
            entries.append((name, vid))
        return entries


def draw_gallery(test: list[tuple[str, int]], rng: np.random.Generator) -> set[str]:
    """The gallery image names of one draw: per vehicle, in increasing id order, image
    ``rng.integers(0, n)`` of its n images sorted by name (so line order does not matter)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, vid in test:
        names[vid].append(name)
    vids = sorted(names)
    picks = rng.integers(0, [len(names[v]) for v in vids])
    return {sorted(names[v])[int(i)] for v, i in zip(vids, picks, strict=True)}
