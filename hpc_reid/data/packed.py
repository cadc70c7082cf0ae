"""Reading HDF5 packs (written by :mod:`hpc_reid.data.pack`, whose docstring gives the layout):
the data set a pack holds, the record paths into it, and ``hpc-reid data info`` and ``verify``.

A record of a :class:`PackedDataset` points into its file with the path ``FILE.h5::INDEX/RELPATH``
(:func:`pack_path`), and so does each frame of a tracklet record (INDEX its frame row);
:func:`image_file` turns any record or frame path into what ``PIL.Image.open`` takes, checking the
image's checksum. Files are opened read-only on first use in each process: handles never cross a
fork, so the pack can be read from ``DataLoader`` workers.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_reid import __version__
from hpc_reid.data.datasets.base import (
    _REGISTRY,
    DatasetError,
    ImageRecord,
    ReidDataset,
    TrackletRecord,
    register_dataset,
)

__all__ = [
    "CHECKSUM",
    "FORMAT_VERSION",
    "TRACKLET_FORMAT_VERSION",
    "BadImage",
    "PackError",
    "PackedDataset",
    "image_file",
    "open_pack",
    "pack_files",
    "pack_info",
    "pack_path",
    "parse_pack_path",
    "read_image_bytes",
    "shard_file",
    "verify_pack",
]

FORMAT_VERSION = 1  # image packs
TRACKLET_FORMAT_VERSION = 2  # packs of tracklets (video sets); image packs keep version 1
READABLE_VERSIONS = (FORMAT_VERSION, TRACKLET_FORMAT_VERSION)
TRACKLET_COLUMNS = ("start", "count", "pids", "camids", "tids", "order")
#: The ``frame_numbers`` attribute: a record's frame is on its camera's clock (Market-1501's
#: sequences laid end to end, :func:`~hpc_reid.data.datasets.market1501.sequence_offsets`), as
#: spatial-temporal scoring reads it. Packs written before it hold Market-1501's frame within its
#: sequence; their frames read as unknown (None, ``PackedDataset.frames_note`` says why), so that
#: st-ReID refuses them instead of ranking with wrong time differences.
FRAME_NUMBERS = "camera clock"
CLOCK_CHANGED = ("market1501",)  # the sets whose frames meant something else before
CHECKSUM = "crc32"
SPLITS = ("train", "query", "gallery")
PACK_PATH = re.compile(r"(?P<file>.+?\.(?:h5|hdf5))::(?P<index>\d+)(?:/(?P<rel>.*))?", re.DOTALL)
_READ_BATCH = 256  # images checked at a time by verify_pack


class PackError(DatasetError):
    """A pack file that is missing, not a pack, incomplete, or whose bytes fail their checksum."""


# ---------------------------------------------------------------------------- record paths


def pack_path(file: str | Path, index: int, relpath: str) -> str:
    """The record path of row ``index`` of pack ``file``: ``FILE::INDEX/RELPATH``."""
    return f"{file}::{index}/{relpath}"


def parse_pack_path(path: str | Path) -> tuple[str, int] | None:
    """(pack file, row) of a record path made by :func:`pack_path`; None for a plain file."""
    m = PACK_PATH.fullmatch(str(path))
    return (m.group("file"), int(m.group("index"))) if m else None


def _open_read(file: str | Path) -> h5py.File:
    # HDF5's default file locking is kept: a process that opens one file twice with different
    # locking flags gets "file locking flag values don't match". On a file system without flock
    # (some Lustre and NFS mounts) set HDF5_USE_FILE_LOCKING=FALSE, which applies to every open.
    return h5py.File(file, "r")


class _Reader:
    """One pack file opened read-only, with its checksums in memory."""

    def __init__(self, file: str) -> None:
        try:
            self.h5 = _open_read(file)
        except FileNotFoundError:
            raise FileNotFoundError(f"pack file {file} not found") from None
        except OSError as e:
            raise PackError(f"cannot open pack file {file}: {e}") from e
        self.file, self.images = file, self.h5["images"]
        self.checksums = self.h5["checksums"][:]

    def read(self, index: int) -> bytes:
        if not 0 <= index < len(self.checksums):
            raise PackError(f"{self.file} has {len(self.checksums)} images; no image {index}")
        data = self.images[index].tobytes()
        if zlib.crc32(data) != self.checksums[index]:
            raise PackError(
                f"image {index} of {self.file} fails its crc32 checksum (the file is corrupt; "
                f"run hpc-reid data verify {self.file})"
            )
        return data


_readers: dict[str, _Reader] = {}
_readers_pid = os.getpid()


def _reader(file: str) -> _Reader:
    global _readers, _readers_pid
    if _readers_pid != os.getpid():
        # A forked worker inherits its parent's handles: never read through them, open its own.
        _readers, _readers_pid = {}, os.getpid()
    if file not in _readers:
        _readers[file] = _Reader(file)
    return _readers[file]


def read_image_bytes(path: str | Path) -> bytes:
    """The encoded bytes of a record's image: from its pack (checksum checked) or its file."""
    where = parse_pack_path(path)
    if where is None:
        with open(path, "rb") as f:  # not Path.read_bytes: its path parsing costs as much
            return f.read()
    return _reader(where[0]).read(where[1])


def image_file(path: str | Path) -> str | Path | io.BytesIO:
    """What ``PIL.Image.open`` takes for a record path: the path itself, or its packed bytes."""
    if parse_pack_path(path) is None:
        return path
    return io.BytesIO(read_image_bytes(path))


def shard_file(out: Path, shard: int, num_shards: int) -> Path:
    """``out`` itself for one shard, else ``STEM-00000-of-0000N.SUFFIX`` beside it."""
    if num_shards == 1:
        return out
    return out.with_name(f"{out.stem}-{shard:05d}-of-{num_shards:05d}{out.suffix}")


def resolved_options(factory: Any, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` with the parser's defaults filled in, as JSON values: the protocol a pack
    records, and against which a request to open it is checked."""
    out: dict[str, Any] = {}
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.name not in ("self", "root") and p.default is not p.empty:
            out[p.name] = p.default
    out.update(options or {})
    return json.loads(json.dumps(out, sort_keys=True, default=str))


# ---------------------------------------------------------------------------- reading


def _attrs(file: Path) -> dict[str, Any]:
    try:
        with _open_read(file) as f:
            attrs = dict(f.attrs)
    except FileNotFoundError:
        raise PackError(f"pack file {file} not found") from None
    except OSError as e:
        raise PackError(f"{file} is not an HDF5 file ({e})") from e
    if "format_version" not in attrs or "fingerprint" not in attrs:
        raise PackError(f"{file} is an HDF5 file but not a pack written by hpc-reid data pack")
    if int(attrs["format_version"]) not in READABLE_VERSIONS:
        raise PackError(
            f"{file} has pack format version {attrs['format_version']}; this hpc-reid "
            f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return attrs


def pack_files(root: str | Path) -> list[Path]:
    """The files of the pack ``root``, in shard order.

    ``root`` is a pack file; one shard of a pack (its other shards are found beside it); the name
    given to ``pack_dataset`` (``NAME.h5`` for ``NAME-*-of-*.h5``); or a glob of the shards.
    Every shard must be present and from the same pack.
    """
    root = Path(root).expanduser()
    if any(c in root.name for c in "*?["):
        files = sorted(root.parent.glob(root.name))
    elif root.is_file():
        files = [root]
    else:
        pattern = f"{root.stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]{root.suffix}"
        files = sorted(root.parent.glob(pattern))
        if len({f.name[-len(root.suffix) - 5 :] for f in files}) > 1:
            raise PackError(
                f"{root}: shards of packs of different sizes: {[f.name for f in files]}"
            )
    if not files:
        raise PackError(f"pack {root} not found (no file, and no shards {root.stem}-*-of-*)")
    num = int(_attrs(files[0])["num_shards"])
    if num > 1 and len(files) == 1:  # one shard named: take its siblings
        out = files[0].with_name(str(_attrs(files[0])["pack_name"]))
        files = [shard_file(out, k, num) for k in range(num)]
    attrs = [_attrs(f) for f in files]
    first = attrs[0]
    for f, a in zip(files, attrs, strict=True):
        if a["fingerprint"] != first["fingerprint"] or int(a["num_shards"]) != num:
            raise PackError(f"{f} is not a shard of the same pack as {files[0]}")
    if sorted(int(a["shard"]) for a in attrs) != list(range(num)):
        have = sorted(int(a["shard"]) for a in attrs)
        raise PackError(f"pack {root}: shards {have} found, {num} expected (0..{num - 1})")
    return [f for _, f in sorted(zip((int(a["shard"]) for a in attrs), files, strict=True))]


@register_dataset("pack")
class PackedDataset(ReidDataset):
    """A data set read from an HDF5 pack written by :func:`pack_dataset` (``hpc-reid data pack``).

    The records are those of the parser that wrote the pack, in the same order, with paths
    ``FILE.h5::INDEX/RELPATH`` into the pack. ``name``, ``options`` and ``protocol`` are the
    packed set's. Build it as ``build_dataset("pack", FILE)``, or give a pack as the root of the
    data set it holds: ``build_dataset("market1501", FILE)`` checks the name and options.
    """

    name = "pack"
    layout = (
        "  ROOT.h5 written by `hpc-reid data pack`, or its shards ROOT-00000-of-0000N.h5 ...\n"
        "(ROOT may also be one shard, or a glob of the shards)"
    )

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.files = pack_files(self.root)
        with _open_read(self.files[0]) as f:
            attrs = dict(f.attrs)
            self.skipped_corrupt = list(f["skipped_corrupt"].asstr()[:])
        self.name = str(attrs["dataset"])
        self.options = json.loads(attrs["options"])
        self.protocol = str(attrs["protocol"])
        self.source_root = str(attrs["root"])
        self.attrs = attrs
        #: why the records' frames are unknown though the packed set has frame numbers, or None
        self.frames_note: str | None = None
        if "frame_numbers" not in attrs and self.name in CLOCK_CHANGED:
            self.frames_note = (
                f"pack {self.root} was written before {self.name} frame numbers counted on the "
                "camera's clock (its frames are within their sequences); pack the data set again"
            )
        stats = json.loads(attrs["statistics"])
        if int(attrs["format_version"]) == TRACKLET_FORMAT_VERSION:
            splits = self._read_tracklets(stats)
        else:
            splits = self._read_images(int(attrs["num_images"]))
        # _finish relabels train pids: the identity unless skip_corrupt emptied an identity.
        self._finish(splits[0], splits[1], splits[2], stats["skipped_by_protocol"])

    def _read_images(self, num_images: int) -> list[list[ImageRecord]]:
        columns: dict[str, list[np.ndarray]] = {}
        paths: list[str] = []
        for file in self.files:
            absolute = str(file.resolve())
            with _open_read(file) as f:
                for name in ("pids", "camids", "frames", "splits", "order"):
                    columns.setdefault(name, []).append(f[name][:])
                rel = f["relpaths"].asstr()[:]
                paths += [pack_path(absolute, i, r) for i, r in enumerate(rel)]
        col = {k: np.concatenate(v) for k, v in columns.items()}
        order = np.argsort(col["order"], kind="stable")
        if not np.array_equal(col["order"][order], np.arange(num_images)):
            raise PackError(f"pack {self.root}: its rows do not cover 0..{num_images} once")
        splits: list[list[ImageRecord]] = [[] for _ in SPLITS]
        for i in order.tolist():
            frame = -1 if self.frames_note else int(col["frames"][i])
            record = ImageRecord(
                paths[i], int(col["pids"][i]), int(col["camids"][i]), None if frame < 0 else frame
            )
            splits[int(col["splits"][i])].append(record)
        return splits

    def _read_tracklets(self, stats: dict[str, Any]) -> list[list[TrackletRecord]]:
        """Each split's tracklets from the shards' tables, frames as pack paths, in order."""
        found: list[list[tuple[int, TrackletRecord]]] = [[] for _ in SPLITS]
        for file in self.files:
            absolute = str(file.resolve())
            with _open_read(file) as f:
                rel = f["relpaths"].asstr()[:]
                for s, split in enumerate(SPLITS):
                    group = f"tracklets/{split}"
                    if group not in f:
                        raise PackError(f"{file} is a pack of tracklets without the table {group}")
                    table = np.stack([f[group][c][:] for c in TRACKLET_COLUMNS], axis=1)
                    for start, count, pid, camid, tid, order in table.tolist():
                        if not 0 <= start < start + count <= len(rel):
                            raise PackError(
                                f"{file}: {group} row for tracklet {tid} spans frame rows "
                                f"{start}..{start + count - 1}, outside 0..{len(rel) - 1}"
                            )
                        frames = tuple(
                            pack_path(absolute, k, rel[k]) for k in range(start, start + count)
                        )
                        found[s].append((order, TrackletRecord(frames, pid, camid, tid)))
        splits = []
        for s, split in enumerate(SPLITS):
            found[s].sort(key=lambda item: item[0])
            expected = int(stats[split]["tracklets"])
            if [order for order, _ in found[s]] != list(range(expected)):
                raise PackError(
                    f"pack {self.root}: its {split} tracklets do not cover 0..{expected - 1} once"
                )
            splits.append([record for _, record in found[s]])
        return splits

    def statistics(self) -> str:
        lines = [super().statistics()]
        if self.skipped_corrupt:
            unit = "tracklets" if self.is_video else "images"
            lines.append(f"  skipped as corrupt when packed: {len(self.skipped_corrupt)} {unit}")
        return "\n".join(lines)


def open_pack(root: str | Path, name: str, options: Mapping[str, Any]) -> PackedDataset:
    """The pack ``root`` as the data set ``name`` built with ``options``, or a clear error.

    ``name`` "pack" opens any pack; another name must be the packed set's, and ``options`` (with
    the parser's defaults) those it was packed with.
    """
    if name == "pack":
        if options:
            raise DatasetError(f"data set 'pack' takes no options, got {sorted(options)}")
        return PackedDataset(root)
    dataset = PackedDataset(root)
    if dataset.name != name:
        raise DatasetError(
            f"{root} is a pack of the data set {dataset.name!r}, not {name!r}; ask for "
            f"{dataset.name!r} (or 'pack') with this root"
        )
    wanted = resolved_options(_REGISTRY[name], options)
    if wanted != dataset.options:
        raise DatasetError(
            f"{root} packs {name} with options {dataset.options}, but {wanted} were asked for; "
            "pack the data set again with these options"
        )
    return dataset


# ---------------------------------------------------------------------------- inspection


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def pack_info(root: str | Path) -> str:
    """What ``hpc-reid data info`` prints: the set, its protocol, version, files and statistics."""
    dataset = PackedDataset(root)
    a = dataset.attrs
    disk = sum(f.stat().st_size for f in dataset.files)
    lines = [
        f"pack: {dataset.root}",
        f"data set: {dataset.name}",
        f"protocol: {dataset.protocol}",
        f"options: {json.dumps(dataset.options, sort_keys=True)}",
        f"source root: {dataset.source_root}",
        f"format version: {a['format_version']} (written by {a['tool']})",
        f"checksum: {a['checksum']} (zlib.crc32 of each image's encoded bytes)",
        f"fingerprint: {a['fingerprint']}",
        f"files: {len(dataset.files)} shard(s), {_size(disk)} on disk, {a['num_images']} "
        + ("frames" if dataset.is_video else "images"),
    ]
    lines += [f"  {f}" for f in dataset.files] if len(dataset.files) > 1 else []
    return "\n".join([*lines, dataset.statistics()])


@dataclass(frozen=True)
class BadImage:
    """An image whose bytes fail their checksum."""

    file: Path
    index: int
    relpath: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}::{self.index} ({self.relpath}): {self.reason}"


def verify_pack(root: str | Path, progress: bool = False) -> tuple[int, list[BadImage]]:
    """Re-check every image's checksum: (images checked, the bad ones)."""
    checked, bad = 0, []
    for file in pack_files(root):
        with _open_read(file) as f:
            images, sums, rel = f["images"], f["checksums"][:], f["relpaths"].asstr()
            if len(images) != len(sums):
                raise PackError(f"{file}: {len(images)} images but {len(sums)} checksums")
            for start in range(0, len(sums), _READ_BATCH):
                stop = min(start + _READ_BATCH, len(sums))
                for i, data in enumerate(images[start:stop], start=start):
                    crc = zlib.crc32(data.tobytes())
                    if crc != sums[i]:
                        reason = f"crc32 {crc:08x}, stored {int(sums[i]):08x}"
                        bad.append(BadImage(file, i, rel[i], reason))
                checked += stop - start
                if progress:
                    print(f"\rverify {file.name}: {stop}/{len(sums)}", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
    return checked, bad
