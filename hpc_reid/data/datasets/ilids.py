"""i-LIDS MCTS: airport images without camera labels, one query image per test identity."""

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
)

NUM_SPLITS = 10
NUM_TEST_IDS = 60


@register_dataset("ilids")
class ILIDS(ReidDataset):
    """i-LIDS MCTS (Zheng, Gong and Xiang, "Associating Groups of People", BMVC 2009).

    Source: the ``i-LIDS_Pedestrian`` release, ``Persons/PPPPNNN.jpg`` (person, image number),
    476 images of 119 identities, 2 to 8 each, cropped from the i-LIDS multi-camera tracking
    scenario at an airport arrival hall; or the PETA collection's copy, ``images/PPPP_NNN.jpg``,
    477 images: the same 476 plus identity 0120 with a single image.

    Protocol: for each of ``NUM_SPLITS`` splits ``NUM_TEST_IDS`` = 60 identities are drawn as
    ``rng.choice(sorted pids, 60, replace=False)`` with ``rng = np.random.default_rng([seed,
    split_id])``; the other 59 train on all their images. Then, for each test identity in
    increasing pid order, ``rng.integers(n)`` picks its query among its ``n`` images sorted by
    file name; the rest of its images are the gallery. Identities with a single image can have no
    gallery match and are not part of the 119-identity protocol: they are left out and counted in
    ``skipped``.

    Camera ids: the set has no camera labels. Query records get camid 0 and gallery records
    camid 1, so the Market-1501 evaluation rule (drop gallery images of the query's pid AND
    camera) drops nothing; the query image itself is excluded by not being in the gallery. Train
    records all get camid 0.
    """

    name = "ilids"
    release_folder = "i-LIDS_Pedestrian"
    pattern = re.compile(r"(\d{4})_(\d{3})\.jpg")
    release_pattern = re.compile(r"(\d{4})(\d{3})\.jpg")
    layout = (
        "  ROOT/images/0001_001.jpg 0001_002.jpg ... 0002_001.jpg ...\n"
        "  (PETA copy: person, image number)\n"
        "or the original release:\n"
        "  ROOT/i-LIDS_Pedestrian/Persons/0001001.jpg 0001002.jpg ...\n"
        "  (ROOT may also be i-LIDS_Pedestrian/ itself)"
    )

    def __init__(self, root: str | Path, split_id: int = 0, seed: int = 0):
        if not 0 <= split_id < NUM_SPLITS:
            raise DatasetError(f"{self.name}: split_id={split_id} is outside 0..{NUM_SPLITS - 1}")
        self.root = Path(root).expanduser()
        candidates = {
            self.root / "images": self.pattern,
            self.root / "Persons": self.release_pattern,
            self.root / self.release_folder / "Persons": self.release_pattern,
        }
        folder = next((f for f in candidates if f.is_dir()), None)
        if folder is None:
            raise DatasetError(
                f"{self.name}: none of {', '.join(str(f) for f in candidates)} is a folder; "
                f"expected layout:\n{self.layout}"
            )
        images: dict[int, list[str]] = defaultdict(list)
        for path in list_images(folder, suffixes=(".jpg",)):
            images[int(match_name(candidates[folder], path, self.name).group(1))].append(str(path))
        single = {pid for pid, paths in images.items() if len(paths) < 2}
        pids = sorted(images.keys() - single)
        if len(pids) <= NUM_TEST_IDS:
            raise DatasetError(
                f"{self.name}: {folder} holds {len(pids)} identities with two or more images; "
                f"the protocol tests {NUM_TEST_IDS} and trains on the rest (119 in the release)"
            )

        rng = np.random.default_rng([seed, split_id])
        test_ids = sorted({int(p) for p in rng.choice(pids, size=NUM_TEST_IDS, replace=False)})
        query, gallery = [], []
        for pid in test_ids:
            pick = int(rng.integers(len(images[pid])))
            for i, path in enumerate(images[pid]):
                if i == pick:
                    query.append(ImageRecord(path, pid, 0))
                else:
                    gallery.append(ImageRecord(path, pid, 1))
        train_ids = sorted(set(pids) - set(test_ids))
        train = [ImageRecord(path, pid, 0) for pid in train_ids for path in images[pid]]
        self._finish(train, query, gallery, {"single-image identities": len(single)})
