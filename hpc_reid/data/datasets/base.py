"""Records, the data set base class, statistics and the data set registry.

A parser turns a data set folder into three lists of :class:`ImageRecord` (train, query, gallery),
or, for a video set, of :class:`TrackletRecord` (a tracklet: its frames' paths in temporal
order). Train person ids are relabelled to ``0..N-1`` (classifier targets); query and gallery keep
the original ids so that results can be traced back to files. Camera ids are 0-based everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


class DatasetError(ValueError):
    """A data set folder, file name or split does not match what its protocol expects."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image: where it is, whose it is, which camera saw it and when (if known)."""

    path: str
    pid: int
    camid: int
    frame: int | None = None


@dataclass(frozen=True, slots=True)
class TrackletRecord:
    """One tracklet of a video set: its frames' paths in temporal order (a frame is stored once,
    in this order, in an HDF5 pack), whose it is, which camera saw it, and its id within the set
    (``tid``: the row of MARS's track info, the sequence folder's index otherwise; -1 unknown).

    It has no ``path``: code written for single images fails loudly on a tracklet instead of
    silently reading its first frame."""

    frames: tuple[str, ...]
    pid: int
    camid: int
    tid: int = -1

    def __post_init__(self) -> None:
        if not self.frames:
            raise DatasetError(f"tracklet {self.tid} of person {self.pid} has no frames")

    @property
    def num_frames(self) -> int:
        return len(self.frames)


Record = ImageRecord | TrackletRecord


def are_tracklets(records: Sequence[Record]) -> bool:
    """Whether ``records`` are tracklets (a data set's splits are all one kind)."""
    return bool(records) and isinstance(records[0], TrackletRecord)


def relabel(records: Sequence[Record]) -> list[Record]:
    """Map the person ids of ``records`` to ``0..N-1`` in increasing order of the original id."""
    label = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [dataclasses.replace(r, pid=label[r.pid]) for r in records]


def require_dir(path: Path, dataset: str, layout: str) -> Path:
    """Return ``path`` if it is a folder, else raise naming it and the expected layout."""
    if not path.is_dir():
        raise DatasetError(f"{dataset}: folder {path} not found; expected layout:\n{layout}")
    return path


def require_file(path: Path, dataset: str, layout: str) -> Path:
    """Return ``path`` if it is a file, else raise naming it and the expected layout."""
    if not path.is_file():
        raise DatasetError(f"{dataset}: file {path} not found; expected layout:\n{layout}")
    return path


def match_name(pattern: re.Pattern[str], path: Path, dataset: str) -> re.Match[str]:
    """Match a file name against the set's naming pattern or raise naming both."""
    m = pattern.fullmatch(path.name)
    if m is None:
        raise DatasetError(
            f"{dataset}: file name {path} does not match the expected pattern {pattern.pattern!r}"
        )
    return m


def list_images(folder: Path, suffixes: Iterable[str] = (".jpg", ".jpeg", ".png")) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (the order defines record indices)."""
    allowed = {s.lower() for s in suffixes}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in allowed)


#: The image files a folder given on the command line may hold (``--query-dir``,
#: ``--check-images``): whatever PIL opens, by suffix.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def image_folder(folder: Path, option: str, error: type[Exception] = ValueError) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`) directly in ``folder``, sorted by name; ``error``
    naming the command-line ``option`` and the folder when it is not a folder or holds none."""
    if not folder.is_dir():
        raise error(f"{option} {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise error(f"{option} {folder} holds no image file (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return files


def subset_counts(records: Sequence[Record]) -> tuple[int, int, int]:
    """(identities, images or tracklets, cameras) of a split."""
    return len({r.pid for r in records}), len(records), len({r.camid for r in records})


def frame_count(records: Sequence[Record]) -> int:
    """Frames of a split: a tracklet's frames, or one per image."""
    return sum(r.num_frames if isinstance(r, TrackletRecord) else 1 for r in records)


class ReidDataset:
    """A person re-identification data set: train, query and gallery records, images
    (:class:`ImageRecord`) or, for a video set, tracklets (:class:`TrackletRecord`).

    Subclasses parse their folder in ``__init__`` and call :meth:`_finish` with the three splits.
    ``skipped`` counts what the protocol itself says to leave out (for example Market-1501's junk
    images, pid -1); nothing else is ever skipped silently.
    """

    name: ClassVar[str] = "dataset"
    layout: ClassVar[str] = ""

    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    skipped: dict[str, int]
    root: Path

    def _finish(
        self,
        train: Sequence[Record],
        query: Sequence[Record],
        gallery: Sequence[Record],
        skipped: dict[str, int] | None = None,
    ) -> None:
        for split, records in (("train", train), ("query", query), ("gallery", gallery)):
            if not records:
                raise DatasetError(f"{self.name}: the {split} split under {self.root} is empty")
        if len({are_tracklets(train), are_tracklets(query), are_tracklets(gallery)}) != 1:
            raise DatasetError(f"{self.name}: splits mix images and tracklets under {self.root}")
        self.train = relabel(train)
        self.query = list(query)
        self.gallery = list(gallery)
        self.skipped = dict(skipped or {})

    @property
    def is_video(self) -> bool:
        """Whether the records are tracklets (MARS, iLIDS-VID, PRID 2011 multi-shot)."""
        return are_tracklets(self.train)

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    def statistics(self) -> str:
        """A torchreid-style table of identities, images and cameras per split (for a video set:
        identities, tracklets, frames and cameras)."""
        video = self.is_video
        rule = "  " + "-" * (57 if video else 44)
        lines = [f"=> Loaded {self.name} from {self.root}", rule]
        items = "# tracklets" if video else "# images"
        head = f"  {'subset':<8} | {'# ids':>6} | {items:>{11 if video else 9}}"
        lines.append(head + (f" | {'# frames':>9}" if video else "") + f" | {'# cameras':>9}")
        lines.append(rule)
        for split in ("train", "query", "gallery"):
            records = getattr(self, split)
            ids, items_, cams = subset_counts(records)
            row = f"  {split:<8} | {ids:>6} | {items_:>{11 if video else 9}}"
            row += f" | {frame_count(records):>9}" if video else ""
            lines.append(row + f" | {cams:>9}")
        lines.append(rule)
        for what, count in sorted(self.skipped.items()):
            lines.append(f"  skipped by protocol: {count} {what}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, s))}" for s in ("train", "query", "gallery"))
        return f"{type(self).__name__}(root={str(self.root)!r}, {sizes})"


DatasetFactory = Callable[..., ReidDataset]
_REGISTRY: dict[str, DatasetFactory] = {}


def register_dataset(name: str, factory: DatasetFactory | None = None):
    """Register a data set under ``name``: as a decorator or a plain call.

    >>> @register_dataset("my_set")
    ... class MySet(ReidDataset): ...
    >>> register_dataset("my_other_set", MyOtherSet)  # doctest: +SKIP
    """

    def add(f: DatasetFactory) -> DatasetFactory:
        if name in _REGISTRY and _REGISTRY[name] is not f:
            raise ValueError(f"data set name {name!r} is already registered to {_REGISTRY[name]}")
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def available_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset`."""
    return sorted(_REGISTRY)


def build_dataset(name: str, root: str | Path, **options) -> ReidDataset:
    """Parse the data set registered as ``name`` under ``root``.

    A ``root`` ending in ``.h5`` is an HDF5 pack of the set (see :mod:`hpc_reid.data.packed`): it is
    opened instead of parsed, after checking that it holds ``name`` built with ``options``.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(
            f"unknown data set {name!r}{hint}; available: {', '.join(available_datasets())}"
        ) from None
    if Path(root).suffix.lower() in (".h5", ".hdf5"):
        from hpc_reid.data.packed import open_pack  # imported here: packed imports this module

        return open_pack(root, name, options)
    return factory(root, **options)
