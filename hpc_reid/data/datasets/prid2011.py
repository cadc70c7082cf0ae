"""PRID 2011 single-shot: two cameras, 200 people seen by both, distractors seen by camera b."""

from __future__ import annotations

import re
from collections import Counter
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
NUM_SHARED_IDS = 200
NUM_TEST_IDS = 100
# The release numbers each camera's people from 1; only 1..200 are the same people in both.
# Camera-b-only people whose numbers a camera-a-only person also uses get this offset, as the
# PETA copy numbers them (camera b 201..385 -> 1201..1385), so both layouts give the same pids.
CAM_B_OFFSET = 1000


@register_dataset("prid2011")
class PRID2011(ReidDataset):
    """PRID 2011 single-shot (Hirzer, Beleznai, Roth and Bischof, "Person Re-Identification by
    Descriptive and Discriminative Classification", SCIA 2011).

    Source: the ``prid_2011`` release, folder ``single_shot/``: camera a saw 385 people and
    camera b 749 (64x128 images, one per person and camera, ``cam_a/person_0001.png``); persons
    1..200 are the same people in both cameras, the others appear in one camera only. Or the
    PETA collection's copy, ``images/PID_CAM.png`` with CAM ``a`` or ``b``: 934 identities, the
    200 shared ones numbered 1..200 in both cameras.

    Protocol: for each of ``NUM_SPLITS`` splits ``NUM_TEST_IDS`` = 100 of the 200 shared
    identities are drawn as ``np.random.default_rng([seed, split_id]).choice(sorted shared
    pids, 100, replace=False)``; the other 100 train on both their images. Query holds the
    camera-a (camid 0) images of the test identities; gallery holds their camera-b (camid 1)
    images plus the 549 identities seen by camera b only (649 gallery identities). The 185
    identities seen by camera a only are in no split (no training pair, no gallery match); they
    are counted in ``skipped``.
    """

    name = "prid2011"
    release_folder = "prid_2011"
    pattern = re.compile(r"(\d+)_([ab])\.png")
    release_pattern = re.compile(r"person_(\d+)\.png")
    layout = (
        "  ROOT/images/0001_a.png 0001_b.png 0201_a.png 0386_b.png ...\n"
        "  (PETA copy: person, camera a or b; the same person has the same number in both)\n"
        "or the original release:\n"
        "  ROOT/single_shot/cam_a/person_0001.png ...  ROOT/single_shot/cam_b/person_0001.png ...\n"
        "  (ROOT may also hold the release folder prid_2011/)"
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
            records = self.parse_release(root / "single_shot")

        per_camera = Counter((r.pid, r.camid) for r in records)
        repeated = sorted(key for key, count in per_camera.items() if count > 1)
        if repeated:
            pid, camid = repeated[0]
            raise DatasetError(
                f"{self.name}: identity {pid} has {per_camera[repeated[0]]} camera-"
                f"{'ab'[camid]} images under {root}; single-shot has one per identity and camera"
            )
        cam_a = {r.pid for r in records if r.camid == 0}
        cam_b = {r.pid for r in records if r.camid == 1}
        shared_ids = cam_a & cam_b
        if len(shared_ids) != NUM_SHARED_IDS:
            raise DatasetError(
                f"{self.name}: {len(shared_ids)} identities under {root} are seen by both cameras; "
                f"PRID 2011 has {NUM_SHARED_IDS} (persons 1..{NUM_SHARED_IDS} in both)"
            )
        rng = np.random.default_rng([seed, split_id])
        test_ids = {
            int(p) for p in rng.choice(sorted(shared_ids), size=NUM_TEST_IDS, replace=False)
        }
        train = [r for r in records if r.pid in shared_ids and r.pid not in test_ids]
        query = [r for r in records if r.pid in test_ids and r.camid == 0]
        gallery = [r for r in records if r.camid == 1 and (r.pid in test_ids or r.pid not in cam_a)]
        self._finish(train, query, gallery, {"camera-a-only identities": len(cam_a - cam_b)})

    def parse_name(self, path: Path) -> ImageRecord:
        m = match_name(self.pattern, path, self.name)
        return ImageRecord(str(path), int(m.group(1)), "ab".index(m.group(2)))

    def parse_release(self, single_shot: Path) -> list[ImageRecord]:
        cam_dirs = [
            require_dir(single_shot / f, self.name, self.layout) for f in ("cam_a", "cam_b")
        ]
        records = []
        for camid, cam_dir in enumerate(cam_dirs):
            for path in list_images(cam_dir, suffixes=(".png",)):
                number = int(match_name(self.release_pattern, path, self.name).group(1))
                records.append(ImageRecord(str(path), number, camid))
        cam_a = {r.pid for r in records if r.camid == 0}
        return [
            ImageRecord(r.path, r.pid + CAM_B_OFFSET, 1)
            if r.camid == 1 and r.pid > NUM_SHARED_IDS and r.pid in cam_a
            else r
            for r in records
        ]
