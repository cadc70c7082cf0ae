"""Market-1501 and DukeMTMC-reID: the bounding_box_train / query / bounding_box_test layout."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
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

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def sequence_offsets(frames: Iterable[tuple[int, int, int]]) -> dict[tuple[int, int], int]:
    """Market-1501's camera clocks: for each (camera, sequence) of ``frames`` (camera, sequence,
    frame within the sequence), the frames of the camera's earlier sequences,
    ``offset[c, s] = sum over s' < s of max frame[c, s']``, so that a frame's number on its
    camera's clock is ``offset[c, s] + F``.

    The maxima come from the data (the fine-grained ReID code's rule, over the train, query and
    gallery names): a sequence without a file counts 0. The st-ReID code hard-codes a table of
    them instead, which differs from the maxima of the release's names at 4 of its 25 sequences
    (c1s4, c2s2, c4s1, c4s2, by 50 to 600 frames), shifting the later sequences of cameras 1, 2
    and 4 by up to 700 frames: up to 7 of st-ReID's 100-frame bins.
    """
    longest: dict[tuple[int, int], int] = {}
    for cam, seq, frame in frames:
        longest[cam, seq] = max(longest.get((cam, seq), 0), frame)
    offsets = {}
    for cam, seq in longest:
        offsets[cam, seq] = sum(n for (c, s), n in longest.items() if c == cam and s < seq)
    return offsets


def find_root(root: str | Path, release_folder: str) -> Path:
    """Accept the data set folder itself or its parent holding the original release folder."""
    root = Path(root).expanduser()
    if not (root / SPLIT_FOLDERS["train"]).is_dir() and (root / release_folder).is_dir():
        return root / release_folder
    return root


@register_dataset("market1501")
class Market1501(ReidDataset):
    """Market-1501 (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015).

    Source: the ``Market-1501-v15.09.15`` release, 1,501 identities seen by 6 cameras on the
    Tsinghua campus, boxes by the DPM detector. Train: 751 ids / 12,936 images; query: 750 ids /
    3,368 images; gallery: 751 ids / 15,913 images (plus 2,793 distractors, pid 0).

    Protocol: single query; junk images (pid -1) are left out of every split (counted in
    ``skipped``); distractors (pid 0) stay in the gallery; at evaluation, gallery images of the
    query's identity taken by the query's camera are removed. File names are
    ``PPPP_cCsS_FFFFFF_BB.jpg``: person, camera, sequence, frame within the sequence, box.

    A record's ``frame`` is the frame on its camera's clock, the sequences of a camera laid end to
    end (:func:`sequence_offsets`, from every file of the three folders, junk included: they are
    frames of the same videos), as spatial-temporal scoring needs (Wang et al., AAAI 2019: the
    ``PPPP_cC_fGGGGGGG`` renaming of their prepare.py).
    """

    name = "market1501"
    release_folder = "Market-1501-v15.09.15"
    pattern = re.compile(r"(-?\d+)_c(\d)s(\d)_(\d+)_(\d+)\.jpe?g")
    num_cameras = 6
    layout = (
        "  ROOT/bounding_box_train/0002_c1s1_000451_03.jpg ...\n"
        "  ROOT/query/0001_c1s1_001051_00.jpg ...\n"
        "  ROOT/bounding_box_test/0000_c1s1_000151_01.jpg ...\n"
        "(ROOT may also hold the release folder Market-1501-v15.09.15/)"
    )

    def __init__(self, root: str | Path):
        self.root = find_root(root, self.release_folder)
        require_dir(self.root, self.name, self.layout)
        parsed: dict[str, list[tuple[ImageRecord, int]]] = {}
        clock: list[tuple[int, int, int]] = []  # (camera, sequence, frame) of every file
        junk = 0
        for split, folder in SPLIT_FOLDERS.items():
            records = []
            for path in list_images(require_dir(self.root / folder, self.name, self.layout)):
                record, sequence = self.parse_name(path)
                clock.append((record.camid, sequence, record.frame))
                if record.pid == -1:
                    junk += 1
                    continue
                if record.pid == 0 and split != "gallery":
                    raise DatasetError(
                        f"{self.name}: distractor pid 0 in {split} split: {path} "
                        "(distractors belong in bounding_box_test only)"
                    )
                records.append((record, sequence))
            parsed[split] = records
        offsets = sequence_offsets(clock)
        splits = {
            split: [
                dataclasses.replace(r, frame=offsets[r.camid, seq] + r.frame) for r, seq in records
            ]
            for split, records in parsed.items()
        }
        self._finish(splits["train"], splits["query"], splits["gallery"], {"junk images": junk})

    def parse_name(self, path: Path) -> tuple[ImageRecord, int]:
        """The record of ``path`` with its frame within its sequence, and the sequence."""
        m = match_name(self.pattern, path, self.name)
        pid, cam, seq, frame = int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))
        if not 1 <= cam <= self.num_cameras:
            raise DatasetError(
                f"{self.name}: camera {cam} in {path} is outside 1..{self.num_cameras}"
            )
        return ImageRecord(str(path), pid, cam - 1, frame), seq


@register_dataset("dukemtmcreid")
class DukeMTMCreID(Market1501):
    """DukeMTMC-reID (Zheng et al., "Unlabeled Samples Generated by GAN Improve the Person
    Re-identification Baseline in vitro", ICCV 2017; videos from Ristani et al., ECCVW 2016).

    Source: the ``DukeMTMC-reID`` release, 8 cameras. Train: 702 ids / 16,522 images; query: 702
    ids / 2,228 images; gallery: 1,110 ids / 17,661 images (408 of them distractor identities that
    appear in one camera only). Same layout and protocol as Market-1501, no junk images. File
    names are ``PPPP_cC_fFFFFFFF.jpg``: person, camera, frame (already on the camera's clock: one
    sequence per camera).
    """

    name = "dukemtmcreid"
    release_folder = "DukeMTMC-reID"
    pattern = re.compile(r"(\d+)_c(\d)_f(\d+)\.jpe?g")
    num_cameras = 8
    layout = (
        "  ROOT/bounding_box_train/0001_c2_f0046182.jpg ...\n"
        "  ROOT/query/0005_c2_f0046985.jpg ...\n"
        "  ROOT/bounding_box_test/0002_c1_f0044158.jpg ...\n"
        "(ROOT may also hold the release folder DukeMTMC-reID/)"
    )

    def parse_name(self, path: Path) -> tuple[ImageRecord, int]:
        m = match_name(self.pattern, path, self.name)
        pid, cam, frame = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if not 1 <= cam <= self.num_cameras:
            raise DatasetError(
                f"{self.name}: camera {cam} in {path} is outside 1..{self.num_cameras}"
            )
        return ImageRecord(str(path), pid, cam - 1, frame), 1
