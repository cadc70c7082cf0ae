"""CUHK01: one folder of two-camera images, split at random into train and test identities."""

from __future__ import annotations

import re
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
TEST_ID_COUNTS = (100, 485)


@register_dataset("cuhk01")
class CUHK01(ReidDataset):
    """CUHK01 (Li, Zhao and Wang, "Human Reidentification with Transferred Metric Learning",
    ACCV 2012).

    Source: the ``CUHK01.zip`` release, folder ``campus/``: 3,884 images of 971 identities, two
    from camera A (images 001-002, mostly frontal/back views) and two from camera B (003-004,
    side views), named ``PPPPNNN.png``.

    Protocol: ``num_test_ids`` identities (100: 871 train / 100 test, or 485: 486 train / 485
    test) are drawn at random for each of ``NUM_SPLITS`` splits; the draw is a function of
    ``(seed, split_id)`` only. Train holds every image of the other identities. Query holds the
    camera-A images of the test identities and gallery their camera-B images, all of them
    (multi-shot, two per identity and camera) as torchreid does, so results compare with
    torchreid-based papers; the original paper's single-shot variant picks one image per camera.
    """

    name = "cuhk01"
    release_folder = "campus"
    pattern = re.compile(r"(\d{4})(\d{3})\.png")
    layout = (
        "  ROOT/campus/0001001.png 0001002.png 0001003.png 0001004.png 0002001.png ...\n"
        "  (person PPPP, image NNN: 001-002 camera A, 003-004 camera B; ROOT may be campus/ itself)"
    )

    def __init__(self, root: str | Path, num_test_ids: int = 485, split_id: int = 0, seed: int = 0):
        if num_test_ids not in TEST_ID_COUNTS:
            raise DatasetError(
                f"{self.name}: num_test_ids={num_test_ids} is not one of the protocols' "
                f"{TEST_ID_COUNTS}"
            )
        if not 0 <= split_id < NUM_SPLITS:
            raise DatasetError(f"{self.name}: split_id={split_id} is outside 0..{NUM_SPLITS - 1}")
        root = Path(root).expanduser()
        self.root = root / self.release_folder if (root / self.release_folder).is_dir() else root
        records = [
            self.parse_name(p) for p in list_images(require_dir(self.root, self.name, self.layout))
        ]
        pids = sorted({r.pid for r in records})
        if len(pids) <= num_test_ids:
            raise DatasetError(
                f"{self.name}: {self.root} holds {len(pids)} identities; num_test_ids="
                f"{num_test_ids} leaves none for training"
            )
        rng = np.random.default_rng([seed, split_id])
        test_ids = {int(p) for p in rng.choice(pids, size=num_test_ids, replace=False)}
        train = [r for r in records if r.pid not in test_ids]
        query = [r for r in records if r.pid in test_ids and r.camid == 0]
        gallery = [r for r in records if r.pid in test_ids and r.camid == 1]
        self._finish(train, query, gallery)

    def parse_name(self, path: Path) -> ImageRecord:
        m = match_name(self.pattern, path, self.name)
        image = int(m.group(2))
        if not 1 <= image <= 4:
            raise DatasetError(
                f"{self.name}: image number {image} in {path} is outside 1..4 "
                "(001-002 camera A, 003-004 camera B)"
            )
        return ImageRecord(str(path), int(m.group(1)), (image - 1) // 2)
