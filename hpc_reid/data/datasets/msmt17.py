"""MSMT17: image folders plus the release's list files, versions V1 and V2."""

from __future__ import annotations

from pathlib import Path

from .base import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    register_dataset,
    require_dir,
    require_file,
)

RELEASES = ("MSMT17_V1", "MSMT17_V2")
# The image folders the lists are relative to: V1 names them train/test, V2 mask_train_v2 and
# mask_test_v2, but some V2 copies use the V1 names, so either name is accepted for either version.
TRAIN_FOLDERS = ("train", "mask_train_v2")
TEST_FOLDERS = ("test", "mask_test_v2")
NUM_CAMERAS = 15


@register_dataset("msmt17")
class MSMT17(ReidDataset):
    """MSMT17 (Wei et al., "Person Transfer GAN to Bridge Domain Gap for Person
    Re-Identification", CVPR 2018).

    Source: the ``MSMT17_V1`` or ``MSMT17_V2`` release (V2 has the faces masked), 4,101
    identities seen by 15 cameras (12 outdoor, 3 indoor) over four days, boxes by Faster R-CNN.
    Train (list_train + list_val): 1,041 ids / 32,621 images; query: 3,060 ids / 11,659 images;
    gallery: 3,060 ids / 82,161 images.

    Protocol: the splits are the list files, one ``FOLDER/IMAGE.jpg PID`` line per image; train
    and val share their identities and are used together for training by default
    (``combine_train_val``, as torchreid does). At evaluation, gallery images of the query's
    identity taken by the query's camera are removed. Image names are
    ``PPPP_NNN_CC_DDDDtime_FFFF_X.jpg``: person, index, camera (1..15), date and time of day,
    frame; the camera and frame come from the name, the pid from the list line.

    When ``root`` holds both releases, V1 is used (torchreid's order); point ``root`` at the
    release folder to choose.
    """

    name = "msmt17"
    layout = (
        "  ROOT/train/0000/0000_000_01_0303morning_0015_0.jpg ...  (V2: mask_train_v2/)\n"
        "  ROOT/test/0000/0000_000_01_0303morning_0036_1.jpg ...   (V2: mask_test_v2/)\n"
        "  ROOT/list_train.txt, list_val.txt, list_query.txt, list_gallery.txt\n"
        "  (lines 'FOLDER/IMAGE.jpg PID'; ROOT may also hold the release folder MSMT17_V1/ or "
        "MSMT17_V2/)"
    )

    def __init__(self, root: str | Path, combine_train_val: bool = True):
        self.root = find_release(Path(root).expanduser())
        require_dir(self.root, self.name, self.layout)
        train_dir = self.image_folder(TRAIN_FOLDERS)
        test_dir = self.image_folder(TEST_FOLDERS)
        train = self.read_list("list_train.txt", train_dir)
        if combine_train_val:
            train += self.read_list("list_val.txt", train_dir)
        query = self.read_list("list_query.txt", test_dir)
        gallery = self.read_list("list_gallery.txt", test_dir)
        self._finish(train, query, gallery)

    def image_folder(self, names: tuple[str, ...]) -> Path:
        for name in names:
            if (self.root / name).is_dir():
                return self.root / name
        raise DatasetError(
            f"{self.name}: none of the folders {', '.join(names)} found in {self.root}; "
            f"expected layout:\n{self.layout}"
        )

    def read_list(self, list_name: str, image_dir: Path) -> list[ImageRecord]:
        list_path = require_file(self.root / list_name, self.name, self.layout)
        records = []
        for line_no, line in enumerate(list_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.name}: {list_path} line {line_no}"
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise DatasetError(
                    f"{where}: {line!r} is not 'FOLDER/IMAGE.jpg PID' "
                    "(e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0')"
                )
            path = image_dir / fields[0]
            camid, frame = parse_image_name(Path(fields[0]).name, where)
            if not path.is_file():
                raise DatasetError(f"{where}: image {path} listed there does not exist")
            records.append(ImageRecord(str(path), int(fields[1]), camid, frame))
        return records


def find_release(root: Path) -> Path:
    """Accept the release folder itself or its parent holding MSMT17_V1/ or MSMT17_V2/."""
    if (root / "list_train.txt").is_file():
        return root
    for release in RELEASES:
        if (root / release).is_dir():
            return root / release
    return root


def parse_image_name(name: str, where: str) -> tuple[int, int | None]:
    """0-based camera and frame (None if that field is not a number) from an MSMT17 image name."""
    tokens = Path(name).stem.split("_")
    if len(tokens) < 3 or not tokens[2].isdigit():
        raise DatasetError(
            f"{where}: image name {name!r} does not match the expected pattern "
            "'PPPP_NNN_CC_DDDDtime_FFFF_X.jpg' (camera CC in the third field)"
        )
    cam = int(tokens[2])
    if not 1 <= cam <= NUM_CAMERAS:
        raise DatasetError(f"{where}: camera {cam} in {name!r} is outside 1..{NUM_CAMERAS}")
    frame = int(tokens[4]) if len(tokens) > 4 and tokens[4].isdigit() else None
    return cam - 1, frame
