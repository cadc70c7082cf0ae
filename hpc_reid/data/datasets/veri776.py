"""VeRi-776: vehicles seen by 20 cameras, the image_train / image_query / image_test layout."""

from __future__ import annotations

import re
from pathlib import Path

from .base import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    list_images,
    match_name,
    register_dataset,
    require_dir,
)

SPLIT_FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}
NUM_CAMERAS = 20


@register_dataset("veri776")
class VeRi776(ReidDataset):
    """VeRi-776 (Liu, Liu, Mei and Ma, "A Deep Learning-Based Approach to Progressive Vehicle
    Re-identification for Urban Surveillance", ECCV 2016; Liu et al., "Large-scale vehicle
    re-identification in urban surveillance videos", ICME 2016).

    Source: the ``VeRi`` release, 776 vehicles seen by 20 cameras over 1 km^2 in 24 hours.
    Train (``image_train``): 576 ids / 37,778 images; query (``image_query``): 200 ids / 1,678
    images; gallery (``image_test``): 200 ids / 11,579 images; 20 cameras in every split.

    Protocol: image to image, cross-camera as Market-1501: at evaluation, gallery images of the
    query's vehicle taken by the query's camera are removed (VeRi's "junk" images). No junk or
    distractor files are left out at parsing.
    File names are ``VVVV_cCCC_FFFFFFFF_N.jpg``: vehicle, camera (1..20, camid CCC - 1), frame
    number (the record's ``frame``, which spatial-temporal scoring reads), index.
    """

    name = "veri776"
    release_folder = "VeRi"
    pattern = re.compile(r"(\d+)_c(\d+)_(\d+)_(\d+)\.jpe?g")
    layout = (
        "  ROOT/image_train/0001_c001_00016450_0.jpg ...\n"
        "  ROOT/image_query/0002_c002_00030600_0.jpg ...\n"
        "  ROOT/image_test/0002_c002_00030600_0.jpg ...\n"
        "(ROOT may also hold the release folder VeRi/)"
    )

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not (root / SPLIT_FOLDERS["train"]).is_dir() and (root / self.release_folder).is_dir():
            root = root / self.release_folder
        self.root = root
        require_dir(root, self.name, self.layout)
        splits = {
            split: [
                self.parse_name(path)
                for path in list_images(require_dir(root / folder, self.name, self.layout))
            ]
            for split, folder in SPLIT_FOLDERS.items()
        }
        self._finish(splits["train"], splits["query"], splits["gallery"])

    def parse_name(self, path: Path) -> ImageRecord:
        m = match_name(self.pattern, path, self.name)
        pid, cam, frame = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if not 1 <= cam <= NUM_CAMERAS:
            raise DatasetError(f"{self.name}: camera {cam} in {path} is outside 1..{NUM_CAMERAS}")
        return ImageRecord(str(path), pid, cam - 1, frame)
