"""HDF5 packs: a parsed data set and its encoded images in one file, or in N shard files.

A pack replaces tens of thousands of small files on a parallel file system by one (or a few) large
ones, and records the parse: opening it gives exactly the records of the parser that wrote it.

Layout of each file of an image set (format version :data:`FORMAT_VERSION`), one row per image:

- ``images`` vlen uint8: the image file's bytes, unchanged (JPEG or PNG as on disk);
- ``pids``, ``camids``, ``frames`` int64: the :class:`ImageRecord` fields (frame -1 for None);
  train pids are the parser's relabelled ids, query and gallery pids the original ones;
- ``splits`` uint8: index into the attribute ``split_names`` (train, query, gallery);
- ``order`` int64: the image's position in the whole set (train, then query, then gallery, each in
  the parser's order), so shards can be put back together in order;
- ``relpaths`` UTF-8: the file's path relative to the data set root;
- ``checksums`` uint32: ``zlib.crc32`` of ``images[i]``, checked on every read and by
  :func:`verify_pack`. CRC-32 detects every burst error of up to 32 bits (any flipped byte) and
  random corruption with probability 1 - 2^-32; it does not defend against deliberate tampering;
- ``skipped_corrupt`` UTF-8: ``relpath: reason`` of each file left out by ``skip_corrupt``.

A video set's pack (format version :data:`TRACKLET_FORMAT_VERSION`, which readers older than
tracklets refuse by its number) has one row per frame, each frame stored once and a tracklet's
frames contiguous and in temporal order: ``images``, ``relpaths`` and ``checksums`` as above; and a
tracklet table per split, group ``tracklets/{train,query,gallery}``, int64 columns ``start`` (the
tracklet's first frame row in this file), ``count`` (its frames), ``pids``, ``camids``, ``tids``
(the :class:`TrackletRecord` fields, pids as above) and ``order`` (its position in its split, so
shards can be put back together in order). A frame named by two tracklets would be stored twice
(no video set does so).

Attributes: ``format_version``, ``records`` (``images`` or ``tracklets``), ``dataset``
(registered name), ``protocol`` (parser class and title), ``options`` (JSON, the parser's defaults
filled in), ``statistics`` (JSON), ``root``, ``tool``, ``checksum``, ``split_names``, ``shard``,
``num_shards``, ``num_images`` (image or frame rows of the whole set), ``pack_name``,
``fingerprint`` (a hash of the whole set's rows, equal in all its shards) and ``frame_numbers``
(:data:`FRAME_NUMBERS`: what the ``frames`` column counts).

Shards (``NAME-00000-of-00004.h5`` ...) take images (whole tracklets for a video set) round-robin,
so every shard holds a part of every split. Each file is written under a temporary name in the
output folder and renamed when the whole pack is complete: an interrupted pack leaves nothing at
the final names.

Reading a pack (:class:`~hpc_reid.data.packed.PackedDataset`, the record paths into it, ``hpc-reid
data info`` and ``verify``) is :mod:`hpc_reid.data.packed`.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import sys
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, ImageFile

from hpc_reid import __version__
from hpc_reid.atomic import temporary_sibling
from hpc_reid.data.datasets.base import (
    _REGISTRY,
    DatasetError,
    ReidDataset,
    TrackletRecord,
    frame_count,
    subset_counts,
)
from hpc_reid.data.packed import (
    CHECKSUM,
    FORMAT_VERSION,
    FRAME_NUMBERS,
    PACK_PATH,
    SPLITS,
    TRACKLET_COLUMNS,
    TRACKLET_FORMAT_VERSION,
    PackedDataset,
    PackError,
    read_image_bytes,
    resolved_options,
    shard_file,
)

__all__ = ["PackSummary", "pack_dataset"]

_BATCH = 256  # rows buffered per shard before a write


@dataclass
class PackSummary:
    """What :func:`pack_dataset` wrote: the files, the image count and what it skipped."""

    files: list[Path]
    images: int
    image_bytes: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _protocol(dataset: ReidDataset) -> str:
    cls = type(dataset)
    title = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    return f"{cls.__module__}.{cls.__qualname__}: {title}".rstrip(": ")


def _relpath(path: str, root: str) -> str:
    m = PACK_PATH.fullmatch(path)
    if m is not None:  # re-packing a pack: keep the original relative path
        return m.group("rel") or ""
    return Path(os.path.relpath(path, root)).as_posix()


def _decode_error(data: bytes) -> str | None:
    """None if ``data`` is an image PIL verifies and decodes fully, else the reason."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # structure and (for PNG) chunk checksums
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated JPEG fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return None


class _ShardWriter:
    """Rows of one shard, buffered and appended to resizable datasets; for a video set, also its
    tracklet tables, kept in memory (a row per tracklet) and written by :meth:`write_tracklets`."""

    COLUMNS = (
        ("pids", np.int64),
        ("camids", np.int64),
        ("frames", np.int64),
        ("splits", np.uint8),
        ("order", np.int64),
        ("checksums", np.uint32),
    )
    FRAME_COLUMNS = (("checksums", np.uint32),)  # a video set's frame rows

    def __init__(self, h5: h5py.File, expected: int, tracklets: bool = False) -> None:
        self.h5, self.rows, self.size = h5, [], 0
        self.columns = self.FRAME_COLUMNS if tracklets else self.COLUMNS
        self.tracklets: dict[str, list[tuple[int, ...]]] = {s: [] for s in SPLITS}
        chunk = (max(1, min(expected, 4096)),)  # small sets: no mostly empty chunks
        h5.create_dataset("images", (0,), h5py.vlen_dtype(np.uint8), maxshape=(None,), chunks=chunk)
        h5.create_dataset(
            "relpaths", (0,), h5py.string_dtype("utf-8"), maxshape=(None,), chunks=chunk
        )
        for name, dtype in self.columns:
            h5.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=chunk)

    def add_tracklet(
        self, split: str, record: TrackletRecord, frames: list[tuple[bytes, str, int]], order: int
    ) -> None:
        """Append a tracklet's frames (bytes, relpath, crc32), in order, and its table row."""
        start = self.size + len(self.rows)  # the row its first frame gets
        for data, relpath, crc in frames:
            self.add(data, relpath, crc)
        row = (start, len(frames), record.pid, record.camid, record.tid, order)
        self.tracklets[split].append(row)

    def write_tracklets(self) -> None:
        for split, rows in self.tracklets.items():
            group = self.h5.create_group(f"tracklets/{split}")
            table = np.asarray(rows, dtype=np.int64).reshape(len(rows), len(TRACKLET_COLUMNS))
            for name, column in zip(TRACKLET_COLUMNS, table.T, strict=True):
                group.create_dataset(name, data=column)

    def add(self, data: bytes, relpath: str, *values: int) -> None:
        self.rows.append((data, relpath, *values))
        if len(self.rows) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        start, n = self.size, len(self.rows)
        self.size += n
        images = np.empty(n, dtype=object)
        for i, row in enumerate(self.rows):  # one by one: equal lengths would make a 2-D array
            images[i] = np.frombuffer(row[0], dtype=np.uint8)
        columns = list(zip(*self.rows, strict=True))
        for name in ("images", "relpaths", *(c for c, _ in self.columns)):
            self.h5[name].resize((self.size,))
        # write_direct: item assignment sees n equal-length arrays (one image, or frames of
        # equal byte size) as an n x L array and fails to broadcast it to the n vlen rows.
        self.h5["images"].write_direct(images, dest_sel=np.s_[start : self.size])
        self.h5["relpaths"][start:] = np.array(columns[1], dtype=object)
        for (name, dtype), values in zip(self.columns, columns[2:], strict=True):
            self.h5[name][start:] = np.asarray(values, dtype=dtype)
        self.rows = []


def pack_dataset(
    dataset: ReidDataset,
    out: str | Path,
    shards: int = 1,
    skip_corrupt: bool = False,
    progress: bool = False,
    *,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> PackSummary:
    """Write ``dataset``'s records and image bytes to the pack ``out`` (or ``shards`` files).

    Every image (every frame of a tracklet) is read and fully decoded first: a missing, truncated
    or corrupt one stops the pack with a :class:`PackError` naming the file, unless
    ``skip_corrupt``, which leaves out the image (the whole tracklet: its frames must stay
    consecutive), prints it and returns it in :attr:`PackSummary.skipped`. ``options`` are those
    the data set was built with (recorded, with the parser's defaults, as its protocol). Files
    are written under temporary names and renamed only when all are complete.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ValueError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would pass")
    out = Path(out).expanduser()
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise PackError(f"pack output {out} must end in .h5 (the suffix marks a pack as a root)")
    video = dataset.is_video
    unit = "tracklet" if video else "image"
    rows = [(s, r) for s, split in enumerate(SPLITS) for r in getattr(dataset, split)]
    if not 1 <= shards <= max(1, len(rows)):
        raise PackError(f"pack {out}: shards={shards} must be in 1..{len(rows)} (the {unit} count)")
    finals = [shard_file(out, k, shards) for k in range(shards)]
    for final in finals:
        if final.is_dir() or (final.exists() and not overwrite):
            raise PackError(f"pack output {final} exists; pass overwrite=True (--overwrite)")
    if isinstance(dataset, PackedDataset):
        name, protocol, root = dataset.name, dataset.protocol, dataset.source_root
        options = dataset.options if options is None else options
        reasons = list(dataset.skipped_corrupt)  # what the source pack left out
    else:
        name, protocol, root = dataset.name, _protocol(dataset), str(Path(dataset.root).resolve())
        reasons = []
    options = resolved_options(_REGISTRY.get(name, type(dataset)), options)
    out.parent.mkdir(parents=True, exist_ok=True)
    start, tmps, files = time.perf_counter(), [], []
    try:
        for final in finals:
            tmp = temporary_sibling(final)  # readable as the umask allows: packs are shared
            tmps.append(tmp)
            files.append(h5py.File(tmp, "w"))
        num_frames = sum(frame_count(getattr(dataset, split)) for split in SPLITS)
        writers = [_ShardWriter(f, -(-num_frames // shards), video) for f in files]
        fingerprint, skipped, kept = hashlib.sha256(), [], {s: [] for s in SPLITS}
        image_bytes = total = 0
        for i, (split, record) in enumerate(rows):
            paths = record.frames if video else (record.path,)
            frames, reason = [], None
            for path in paths:
                relpath = _relpath(path, root)
                try:
                    data = read_image_bytes(path)
                    reason = _decode_error(data)
                except (OSError, DatasetError) as e:
                    reason = f"cannot read: {type(e).__name__}: {e}"
                if reason is not None:
                    break
                frames.append((data, relpath, zlib.crc32(data)))
            if reason is not None:
                if video:
                    reason += (
                        f" (a frame of tracklet {record.tid} of person {record.pid}, camera "
                        f"{record.camid}: the tracklet is left out)"
                    )
                if not skip_corrupt:
                    raise PackError(
                        f"pack {out}: image {path} is corrupt ({reason}); fix or remove it, or "
                        "pass skip_corrupt=True (--skip-corrupt) to pack the rest"
                    )
                skipped.append((str(path), reason))
                reasons.append(f"{relpath}: {reason}")
                print(f"skipped corrupt image {path}: {reason}", file=sys.stderr)
                continue
            writer = writers[sum(map(len, kept.values())) % shards]
            if video:
                writer.add_tracklet(SPLITS[split], record, frames, len(kept[SPLITS[split]]))
                fingerprint.update(
                    f"{record.pid},{record.camid},{record.tid},{split},{len(frames)},".encode()
                )
                for _, relpath, crc in frames:
                    fingerprint.update(f"{crc},".encode() + relpath.encode() + b"\0")
            else:
                data, relpath, crc = frames[0]
                frame = -1 if record.frame is None else record.frame
                writer.add(data, relpath, record.pid, record.camid, frame, split, total, crc)
                fingerprint.update(f"{crc},{record.pid},{record.camid},{frame},{split},".encode())
                fingerprint.update(relpath.encode() + b"\0")
            total += len(frames)
            kept[SPLITS[split]].append(record)
            image_bytes += sum(len(data) for data, _, _ in frames)
            if progress and (i + 1 == len(rows) or (i + 1) % _BATCH == 0):
                print(f"\rpack {out.name}: {i + 1}/{len(rows)} {unit}s", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        for split, records in kept.items():
            if not records:
                raise PackError(f"pack {out}: no {unit} of the {split} split is left to pack")
        stats: dict[str, Any] = {split: _split_statistics(kept[split]) for split in SPLITS}
        stats["skipped_by_protocol"] = dict(dataset.skipped)
        stats["skipped_corrupt"] = len(reasons)
        attrs = {
            "format_version": TRACKLET_FORMAT_VERSION if video else FORMAT_VERSION,
            "records": f"{unit}s",
            "dataset": name,
            "protocol": protocol,
            "options": json.dumps(options, sort_keys=True),
            "statistics": json.dumps(stats, sort_keys=True),
            "root": root,
            "tool": f"hpc-reid {__version__}",
            "checksum": CHECKSUM,
            "split_names": list(SPLITS),
            "num_shards": shards,
            "num_images": total,
            "pack_name": out.name,
            "fingerprint": fingerprint.hexdigest()[:32],
        }
        if getattr(dataset, "frames_note", None) is None:  # a re-packed old pack keeps its note
            attrs["frame_numbers"] = FRAME_NUMBERS
        for k, (f, w) in enumerate(zip(files, writers, strict=True)):
            w.flush()
            if video:
                w.write_tracklets()
            f.attrs.update({**attrs, "shard": k})
            f.create_dataset("skipped_corrupt", data=reasons, dtype=h5py.string_dtype("utf-8"))
            f.close()
        for tmp, final in zip(tmps, finals, strict=True):
            os.replace(tmp, final)
    except BaseException:
        for f in files:
            f.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    return PackSummary(finals, total, image_bytes, round(seconds, 3), skipped)


def _split_statistics(records: list[Any]) -> dict[str, int]:
    """A split's counts as the statistics attribute stores them (tracklets: and frames)."""
    ids, items, cameras = subset_counts(records)
    if records and isinstance(records[0], TrackletRecord):
        return {"ids": ids, "tracklets": items, "frames": frame_count(records), "cameras": cameras}
    return {"ids": ids, "images": items, "cameras": cameras}
