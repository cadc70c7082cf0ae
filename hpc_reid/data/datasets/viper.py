"""VIPeR: one image of each person from each of two cameras, split at random into halves."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .base import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    list_images,
    match_name,
    register_dataset,
    require_dir,
)

NUM_SPLITS = 10
NUM_TEST_IDS = 316


@register_dataset("viper")
class VIPeR(ReidDataset):
    """VIPeR (Gray and Tao, "Viewpoint Invariant Pedestrian Recognition with an Ensemble of
    Localized Features", ECCV 2008).

    Source: the ``VIPeR`` release, 632 identities, one 48x128 image of each from each of two
    outdoor cameras (``cam_a``, ``cam_b``), named ``PID_ANGLE.bmp`` (person number, viewpoint
    angle in degrees); or the PETA collection's copy, ``images/PID_ANGLE_CAM.png`` with CAM 1
    (cam_a) or 2 (cam_b). Person numbers run from 000 to 873 with gaps; they are kept as pids.

    Protocol: ``NUM_TEST_IDS`` = 316 test identities are drawn for each of ``NUM_SPLITS`` splits
    as ``np.random.default_rng([seed, split_id]).choice(sorted pids, 316, replace=False)``; the
    other 316 train on both their images. Query holds the camera-1 (cam_a, camid 0) images of
    the test identities and gallery their camera-2 (cam_b, camid 1) images; mean CMC over the
    splits is reported. Every identity must have exactly one image per camera.
    """

    name = "viper"
    release_folder = "VIPeR"
    pattern = re.compile(r"(\d+)_(\d+)_([12])\.png")
    release_pattern = re.compile(r"(\d+)_(\d+)\.bmp")
    layout = (
        "  ROOT/images/000_45_1.png 000_45_2.png 001_45_1.png 001_90_2.png ...\n"
        "  (PETA copy: person, viewpoint angle, camera 1 or 2)\n"
        "or the original release:\n"
        "  ROOT/cam_a/000_45.bmp ...  ROOT/cam_b/000_45.bmp ...\n"
        "  (ROOT may also hold the release folder VIPeR/)"
    )

    def __init__(self, root: str | Path, split_id: int = 0, seed: int = 0):
        if not 0 <= split_id < NUM_SPLITS:
            raise DatasetError(f"{self.name}: split_id={split_id} is outside 0..{NUM_SPLITS - 1}")
        root = Path(root).expanduser()
        if not (root / "images").is_dir() and (root / self.release_folder).is_dir():
            root = root / self.release_folder
        self.root = root
        require_dir(root, self.name, self.layout)
        if (root / "images").is_dir():
            records = [self.parse_name(p) for p in list_images(root / "images")]
        else:
            records = []
            for camid, folder in enumerate(("cam_a", "cam_b")):
                cam_dir = require_dir(root / folder, self.name, self.layout)
                for path in list_images(cam_dir, suffixes=(".bmp",)):
                    m = match_name(self.release_pattern, path, self.name)
                    records.append(ImageRecord(str(path), int(m.group(1)), camid))
        self.check_one_image_per_camera(records)

        pids = sorted({r.pid for r in records})
        if len(pids) <= NUM_TEST_IDS:
            raise DatasetError(
                f"{self.name}: {root} holds {len(pids)} identities; the protocol tests "
                f"{NUM_TEST_IDS} and trains on the rest (632 in the release)"
            )
        rng = np.random.default_rng([seed, split_id])
        test_ids = {int(p) for p in rng.choice(pids, size=NUM_TEST_IDS, replace=False)}
        train = [r for r in records if r.pid not in test_ids]
        query = [r for r in records if r.pid in test_ids and r.camid == 0]
        gallery = [r for r in records if r.pid in test_ids and r.camid == 1]
        self._finish(train, query, gallery)

    def parse_name(self, path: Path) -> ImageRecord:
        m = match_name(self.pattern, path, self.name)
        return ImageRecord(str(path), int(m.group(1)), int(m.group(3)) - 1)

    def check_one_image_per_camera(self, records: list[ImageRecord]) -> None:
        # Single-shot by construction: a second image, or a missing one, means a broken copy.
        names: dict[int, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for r in records:
            names[r.pid][r.camid].append(Path(r.path).name)
        for pid, (cam1, cam2) in sorted(names.items()):
            if len(cam1) != 1 or len(cam2) != 1:
                raise DatasetError(
                    f"{self.name}: identity {pid} has {len(cam1)} camera-1 image(s) {cam1} and "
                    f"{len(cam2)} camera-2 image(s) {cam2} under {self.root}; VIPeR has exactly "
                    "one image per identity and camera"
                )
