"""Records, the data set base class, statistics and the data set registry.

A parser turns a data set folder into three lists of :class:`ImageRecord` (train, query, gallery).
Train person ids are relabelled to ``0..N-1`` (classifier targets); query and gallery keep the
original ids so that results can be traced back to files. Camera ids are 0-based everywhere.
"""

from __future__ import annotations

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


def relabel(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Map the person ids of ``records`` to ``0..N-1`` in increasing order of the original id."""
    label = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, label[r.pid], r.camid, r.frame) for r in records]


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


def subset_counts(records: Sequence[ImageRecord]) -> tuple[int, int, int]:
    """(identities, images, cameras) of a split."""
    return len({r.pid for r in records}), len(records), len({r.camid for r in records})


class ReidDataset:
    """An image person re-identification data set: train, query and gallery records.

    Subclasses parse their folder in ``__init__`` and call :meth:`_finish` with the three splits.
    ``skipped`` counts what the protocol itself says to leave out (for example Market-1501's junk
    images, pid -1); nothing else is ever skipped silently.
    """

    name: ClassVar[str] = "dataset"
    layout: ClassVar[str] = ""

    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    skipped: dict[str, int]
    root: Path

    def _finish(
        self,
        train: Sequence[ImageRecord],
        query: Sequence[ImageRecord],
        gallery: Sequence[ImageRecord],
        skipped: dict[str, int] | None = None,
    ) -> None:
        for split, records in (("train", train), ("query", query), ("gallery", gallery)):
            if not records:
                raise DatasetError(f"{self.name}: the {split} split under {self.root} is empty")
        self.train = relabel(train)
        self.query = list(query)
        self.gallery = list(gallery)
        self.skipped = dict(skipped or {})

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    def statistics(self) -> str:
        """A torchreid-style table of identities, images and cameras per split."""
        rule = "  " + "-" * 44
        lines = [f"=> Loaded {self.name} from {self.root}", rule]
        lines.append(f"  {'subset':<8} | {'# ids':>6} | {'# images':>9} | {'# cameras':>9}")
        lines.append(rule)
        for split in ("train", "query", "gallery"):
            ids, images, cams = subset_counts(getattr(self, split))
            lines.append(f"  {split:<8} | {ids:>6} | {images:>9} | {cams:>9}")
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

    A ``root`` ending in ``.h5`` is an HDF5 pack of the set (see :mod:`hpc_reid.data.pack`): it is
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
        from hpc_reid.data.pack import open_pack  # imported here: pack imports this module

        return open_pack(root, name, options)
    return factory(root, **options)
