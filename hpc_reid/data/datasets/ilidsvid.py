"""iLIDS-VID: one sequence of each of 300 people from each of two airport cameras."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .base import (
    DatasetError,
    ReidDataset,
    TrackletRecord,
    list_images,
    register_dataset,
    require_dir,
    require_file,
)
from .mars import integer_array, load_mat

NUM_SPLITS = 10
SPLIT_FILE = Path("train-test people splits") / "train_test_splits_ilidsvid.mat"


def person_sequences(
    cam_dir: Path, pattern: re.Pattern[str], dataset: str, layout: str
) -> dict[str, Path]:
    """The sequence folders of one camera, by folder name, sorted; each must match ``pattern``
    (whose first group is the person number)."""
    require_dir(cam_dir, dataset, layout)
    folders = {}
    for folder in sorted(p for p in cam_dir.iterdir() if p.is_dir()):
        if pattern.fullmatch(folder.name) is None:
            raise DatasetError(
                f"{dataset}: sequence folder {folder} does not match the expected pattern "
                f"{pattern.pattern!r}; expected layout:\n{layout}"
            )
        folders[folder.name] = folder
    if not folders:
        raise DatasetError(
            f"{dataset}: camera folder {cam_dir} holds no sequence folder; expected layout:\n"
            f"{layout}"
        )
    return folders


def sequence_tracklet(folder: Path, pid: int, camid: int, tid: int, dataset: str) -> TrackletRecord:
    """The tracklet of one sequence folder: its PNG frames sorted by name (temporal order; the
    references glob them unsorted)."""
    frames = tuple(str(p) for p in list_images(folder, suffixes=(".png",)))
    if not frames:
        raise DatasetError(f"{dataset}: sequence folder {folder} holds no .png frame")
    return TrackletRecord(frames, pid, camid, tid)


def two_camera_splits(
    sequences: tuple[dict[str, Path], dict[str, Path]],
    train_persons: list[str],
    test_persons: list[str],
    pattern: re.Pattern[str],
    dataset: str,
) -> tuple[list[TrackletRecord], ...]:
    """(train, query, gallery) of a two-camera video set: train holds both sequences of each
    train person, query the first camera's and gallery the second camera's sequence of each test
    person, persons in sorted folder order. pid is the folder's person number; tid the folder's
    index in the first camera's sorted folders followed by the second's."""
    offsets = (0, len(sequences[0]))
    index = [{name: offsets[c] + i for i, name in enumerate(s)} for c, s in enumerate(sequences)]

    def tracklets(persons: list[str], cameras: tuple[int, ...]) -> list[TrackletRecord]:
        out = []
        for name in sorted(persons):
            pid = int(pattern.fullmatch(name).group(1))
            for c in cameras:
                out.append(sequence_tracklet(sequences[c][name], pid, c, index[c][name], dataset))
        return out

    return (
        tracklets(train_persons, (0, 1)),
        tracklets(test_persons, (0,)),
        tracklets(test_persons, (1,)),
    )


@register_dataset("ilidsvid")
class ILIDSVID(ReidDataset):
    """iLIDS-VID (Wang, Gong, Zhu and Wang, "Person Re-Identification by Video Ranking",
    ECCV 2014).

    Source: the ``iLIDS-VID`` release: 600 sequences of 300 people, one from each of two
    non-overlapping cameras of the i-LIDS multi-camera tracking scenario at an airport arrival
    hall (23 to 192 frames each, 64x128 PNG), ``i-LIDS-VID/sequences/cam{1,2}/personNNN/``, and
    ``train-test people splits/train_test_splits_ilidsvid.mat``.

    Protocol: the .mat's ``ls_set`` (10 x 300) holds, per split, 1-based indices into the
    person folders sorted by name; the first half are the test persons and the second half train
    (Wang et al.; torchreid). ``split_id`` picks the row; report the mean over the 10 splits.
    Train: 150 ids / 300 tracklets; query: the 150 test persons' camera-1 sequences; gallery
    their camera-2 sequences. pid is the folder's person number (train relabelled); camid 0 for
    cam1, 1 for cam2; tid the sequence folder's index among cam1's sorted folders followed by
    cam2's. Frames are sorted by name (the references glob them unsorted).
    """

    name = "ilidsvid"
    pattern = re.compile(r"person(\d+)")
    layout = (
        "  ROOT/i-LIDS-VID/sequences/cam1/person001/cam1_person001_00317.png ...\n"
        "  ROOT/i-LIDS-VID/sequences/cam2/person001/...\n"
        "  ROOT/train-test people splits/train_test_splits_ilidsvid.mat  (key ls_set, 10 x 300)\n"
        "(ROOT may also hold a folder ilids-vid/ laid out as above)"
    )

    def __init__(self, root: str | Path, split_id: int = 0):
        if not 0 <= split_id < NUM_SPLITS:
            raise DatasetError(f"{self.name}: split_id={split_id} is outside 0..{NUM_SPLITS - 1}")
        root = Path(root).expanduser()
        if not (root / "i-LIDS-VID").is_dir() and (root / "ilids-vid" / "i-LIDS-VID").is_dir():
            root = root / "ilids-vid"
        self.root = require_dir(root, self.name, self.layout)
        sequences_dir = require_dir(root / "i-LIDS-VID" / "sequences", self.name, self.layout)
        sequences = tuple(
            person_sequences(sequences_dir / cam, self.pattern, self.name, self.layout)
            for cam in ("cam1", "cam2")
        )
        only = sorted(sequences[0].keys() ^ sequences[1].keys())
        if only:
            cam = "cam1" if only[0] in sequences[0] else "cam2"
            raise DatasetError(
                f"{self.name}: person folder {only[0]} is in {sequences_dir / cam} only "
                f"({len(only)} folders in one camera only); every person has a sequence in both"
            )
        persons = list(sequences[0])  # sorted: ls_set indexes this order
        split_file = require_file(root / SPLIT_FILE, self.name, self.layout)
        row = self.split_row(split_file, split_id, len(persons))
        half = len(persons) // 2
        test = [persons[i] for i in row[:half]]
        train = [persons[i] for i in row[half:]]
        self._finish(*two_camera_splits(sequences, train, test, self.pattern, self.name))

    def split_row(self, path: Path, split_id: int, num_persons: int) -> list[int]:
        """Row ``split_id`` of ``ls_set`` as 0-based person indices, checked to be a permutation
        of all ``num_persons`` sorted person folders."""
        ls_set = integer_array(load_mat(path, "ls_set", self.name), path, "ls_set", self.name)
        if ls_set.ndim != 2 or ls_set.shape[1] != num_persons:
            raise DatasetError(
                f"{self.name}: {path} key 'ls_set' has shape {ls_set.shape}; expected (splits, "
                f"{num_persons}), one row per split over the {num_persons} person folders "
                "(10 x 300 in the release)"
            )
        if split_id >= len(ls_set):
            raise DatasetError(
                f"{self.name}: split_id={split_id}, but {path} key 'ls_set' has "
                f"{len(ls_set)} splits"
            )
        row = ls_set[split_id]
        bad = np.flatnonzero((row < 1) | (row > num_persons))
        if bad.size:
            raise DatasetError(
                f"{self.name}: {path} key 'ls_set' row {split_id + 1} holds index {row[bad[0]]}, "
                f"outside 1..{num_persons} (1-based indices into the sorted person folders)"
            )
        if sorted(row.tolist()) != list(range(1, num_persons + 1)):
            raise DatasetError(
                f"{self.name}: {path} key 'ls_set' row {split_id + 1} names a person twice; "
                f"expected each of 1..{num_persons} once (the sorted person folders)"
            )
        return (row - 1).tolist()
