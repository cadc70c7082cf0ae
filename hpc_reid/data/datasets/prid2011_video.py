"""PRID 2011 multi-shot: sequences from two cameras, the 178 people of the standard splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .base import DatasetError, ReidDataset, register_dataset, require_dir, require_file
from .ilidsvid import person_sequences, two_camera_splits

NUM_SPLITS = 10
SPLIT_FILE = "splits_prid2011.json"


@register_dataset("prid2011_video")
class PRID2011Video(ReidDataset):
    """PRID 2011 multi-shot (Hirzer, Beleznai, Roth and Bischof, "Person Re-Identification by
    Descriptive and Discriminative Classification", SCIA 2011).

    Source: the ``prid_2011`` release, folder ``multi_shot/``: camera a saw 385 people and camera
    b 749 (``cam_{a,b}/person_NNNN/NNNN.png``, 64x128 frames, 5 to 675 a sequence); persons
    1..200 are the same people in both. ``splits_prid2011.json`` (from the video ReID
    references, torchreid's copy): 10 splits, each a dict of ``train`` and ``test`` lists of
    person folder names over the 178 persons whose sequences in both cameras are long enough
    (more than 21 frames, Wang et al., ECCV 2014), 89 train and 89 test.

    Protocol: ``split_id`` picks the split; train holds both sequences of each train person;
    query the camera-a sequences and gallery the camera-b sequences of the test persons (no
    distractors, as the references); report the mean over the 10 splits. pid is the folder's
    person number (train relabelled); camid 0 for cam_a, 1 for cam_b; tid the sequence folder's
    index among cam_a's sorted folders followed by cam_b's. Frames are sorted by name. The
    sequences of persons in neither list of the split are counted in ``skipped``.
    """

    name = "prid2011_video"
    release_folder = "prid_2011"
    pattern = re.compile(r"person_(\d+)")
    layout = (
        "  ROOT/prid_2011/multi_shot/cam_a/person_0001/0001.png ...\n"
        "  ROOT/prid_2011/multi_shot/cam_b/person_0001/0001.png ...\n"
        "  ROOT/splits_prid2011.json  ([{'train': ['person_0004', ...], 'test': [...]}, ...])\n"
        "(ROOT may also hold a folder prid2011/ laid out as above, or be prid_2011/ itself\n"
        " with multi_shot/ and splits_prid2011.json)"
    )

    def __init__(self, root: str | Path, split_id: int = 0):
        if not 0 <= split_id < NUM_SPLITS:
            raise DatasetError(f"{self.name}: split_id={split_id} is outside 0..{NUM_SPLITS - 1}")
        root = Path(root).expanduser()
        for folder in (root, root / "prid2011"):
            if (folder / self.release_folder / "multi_shot").is_dir():
                root, multi_shot = folder, folder / self.release_folder / "multi_shot"
                break
        else:
            multi_shot = root / "multi_shot"
        self.root = require_dir(root, self.name, self.layout)
        require_dir(multi_shot, self.name, self.layout)
        sequences = tuple(
            person_sequences(multi_shot / cam, self.pattern, self.name, self.layout)
            for cam in ("cam_a", "cam_b")
        )
        split_file = require_file(root / SPLIT_FILE, self.name, self.layout)
        train, test = self.read_split(split_file, split_id)
        for person in train + test:
            for cam, folders in zip(("cam_a", "cam_b"), sequences, strict=True):
                if person not in folders:
                    raise DatasetError(
                        f"{self.name}: {split_file} split {split_id} names {person!r}, but "
                        f"{multi_shot / cam / person} is not a folder"
                    )
        used = 2 * len(train) + 2 * len(test)
        skipped = {"sequences outside the split": sum(map(len, sequences)) - used}
        self._finish(*two_camera_splits(sequences, train, test, self.pattern, self.name), skipped)

    def read_split(self, path: Path, split_id: int) -> tuple[list[str], list[str]]:
        """(train, test) person folder names of split ``split_id`` of the json."""
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.name}: {path} is not valid JSON: {e}") from e
        if not isinstance(splits, list):
            raise DatasetError(
                f"{self.name}: {path} holds a {type(splits).__name__}; expected a list of splits"
            )
        if split_id >= len(splits):
            raise DatasetError(
                f"{self.name}: split_id={split_id}, but {path} has {len(splits)} splits"
            )
        split = splits[split_id]
        lists = []
        for key in ("train", "test"):
            names = split.get(key) if isinstance(split, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DatasetError(
                    f"{self.name}: {path} split {split_id} lacks a list of folder names under "
                    f"the key {key!r}; expected {{'train': [...], 'test': [...]}}"
                )
            for name in names:
                if self.pattern.fullmatch(name) is None:
                    raise DatasetError(
                        f"{self.name}: {path} split {split_id} key {key!r} names {name!r}; "
                        f"expected person folder names matching {self.pattern.pattern!r}"
                    )
            if len(set(names)) != len(names):
                raise DatasetError(
                    f"{self.name}: {path} split {split_id} key {key!r} names a person twice"
                )
            lists.append(names)
        both = sorted(set(lists[0]) & set(lists[1]))
        if both:
            raise DatasetError(
                f"{self.name}: {path} split {split_id} puts {both[0]!r} in both train and test"
            )
        return lists[0], lists[1]
