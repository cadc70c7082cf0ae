"""SAN's target textures: where a training image's texture comes from, how pseudo textures are
stored, and the batch fields ``texture`` and ``texture_valid``.

SAN (Jin et al., "Semantics-Aligned Representation Learning for Person Re-identification", AAAI
2020) regresses, from each person image, the person's full-body texture in a pose- and view-free
UV layout (L_rec, Sec. 3). The target is looked up by the image's dataset index, never augmented
with it (the released code's dataset_loader.py reads the texture beside the image and applies only
ToTensor + Normalize(0.5, 0.5)): a flipped, cropped or erased person keeps its texture.

``data.textures.kind`` says where the targets are:

- ``synthetic``: the synthetic set's own per-identity maps, ``ROOT/textures/PPPP.png`` next to
  ``bounding_box_train/`` (SAN's PIT pairs: the true textures). The identity is the file name's
  ``PPPP`` (the record's pid is relabelled for training).
- ``pseudo``: one texture per image, written by ``hpc-reid textures`` with :class:`TextureWriter`
  into ``data.textures.root``, keyed by :func:`image_key` (the image's path relative to the data
  set root, or its path inside the data set's HDF5 pack). Either a folder mirroring the images
  (``ROOT/bounding_box_train/0002_c1s1_000451_03.png``), or an HDF5 file ``NAME.h5`` (or its rank
  shards ``NAME-rank00000-of-00002.h5``) with columns ``relpaths`` (the keys) and ``textures``
  (PNG bytes) and attributes ``format`` = :data:`FORMAT`, ``format_version``, ``count``, ``shard``,
  ``num_shards`` and what the writer adds (the checkpoint, the data set).

Decoded textures are RGB, resized (bilinear, PIL) to ``model.san.texture_size`` when another size,
and normalised to [-1, 1] as ``(x / 255 - 0.5) / 0.5``. ``data.textures.missing``: ``error`` checks
every training image once, at the first batch, and names the first without a texture and where it
was looked for; ``skip`` gives such an image a zero texture and ``texture_valid`` False, so the
texture loss leaves it out.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image

from hpc_reid.atomic import write_atomic
from hpc_reid.config import Config
from hpc_reid.data.build import dataset_root
from hpc_reid.data.datasets.base import DatasetError, ImageRecord
from hpc_reid.data.fields import register_batch_field
from hpc_reid.data.packed import parse_pack_path

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PseudoTextures",
    "SyntheticTextures",
    "TextureError",
    "TextureTargets",
    "TextureWriter",
    "decode_texture",
    "image_key",
    "texture_or_black",
    "texture_shard",
    "texture_store",
    "texture_targets",
    "true_textures",
]

FORMAT = "hpc-reid textures"
FORMAT_VERSION = 1
_FLUSH_EVERY = 64  # rows buffered before an HDF5 append (each append is flushed to disk)
_SHARD = re.compile(r"-rank(\d{5})-of-(\d{5})$")
_PID = re.compile(r"(\d+)_")


class TextureError(DatasetError):
    """A texture that is missing, undecodable or not an RGB image, or a texture store that is not
    what hpc-reid textures writes."""


# ---------------------------------------------------------------------------- keys and decoding


def image_key(path: str | Path, root: str | Path) -> str:
    """The key of an image's pseudo texture: its path relative to the data set ``root`` (POSIX
    separators), or, for a record read from an HDF5 pack, its relative path inside the pack."""
    if parse_pack_path(path) is not None:
        return str(path).split("::", 1)[1].split("/", 1)[1]
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()
    if rel.startswith("../"):
        raise TextureError(f"image {path} is not inside the data set root {root}")
    return rel


def _check_key(key: str) -> None:
    if not key or Path(key).is_absolute() or ".." in Path(key).parts:
        raise ValueError(f"texture key {key!r} must be a relative path inside the data set")


def decode_texture(data: bytes, where: str, size: tuple[int, int]) -> np.ndarray:
    """``data`` (an encoded RGB image) as (H, W, 3) uint8 of ``size`` (H, W), resized bilinearly
    when it has another size; a file that is not an RGB image raises naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, image = img.mode, img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise TextureError(
            f"texture {where} is not a readable image ({type(e).__name__}: {e})"
        ) from e
    if mode != "RGB":
        raise TextureError(f"texture {where} is a {mode} image; expected RGB (H x W x 3)")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------- stores


class SyntheticTextures:
    """The synthetic set's per-identity texture maps, ``ROOT/textures/PPPP.png`` (the true
    textures: :mod:`hpc_reid.data.synthetic` paints every image from its identity's map)."""

    per_identity = True

    def __init__(self, root: str | Path) -> None:
        self.folder = Path(root) / "textures"
        if not self.folder.is_dir():
            raise TextureError(
                f"data.textures.kind=synthetic: {self.folder} not found (the synthetic set writes "
                "textures/PPPP.png beside bounding_box_train/; a pack of the set holds no textures)"
            )

    def key(self, path: str) -> str:
        name = str(path).rsplit("/", 1)[-1]
        m = _PID.match(name)
        if m is None:
            raise TextureError(
                f"image {path}: data.textures.kind=synthetic takes the identity from a "
                "Market-style file name PPPP_..., which this name is not"
            )
        return f"{int(m.group(1)):04d}"

    def where(self, key: str) -> str:
        return str(self.folder / f"{key}.png")

    def has(self, key: str) -> bool:
        return os.path.isfile(self.where(key))

    def read(self, key: str) -> bytes:
        return _read(self.where(key))


def true_textures(root: str | Path) -> SyntheticTextures | None:
    """The data set's own per-identity texture maps where it has them (the synthetic set's
    ``textures/``), else None: real sets have none."""
    return SyntheticTextures(root) if (Path(root) / "textures").is_dir() else None


def texture_or_black(
    store: SyntheticTextures | PseudoTextures, path: str, size: tuple[int, int]
) -> np.ndarray:
    """The texture ``store`` holds for the image at ``path``, decoded as (H, W, 3) uint8 of
    ``size``; black where it holds none (distractor and junk images have no identity's)."""
    key = store.key(path)
    if not store.has(key):
        return np.zeros((*size, 3), dtype=np.uint8)
    return decode_texture(store.read(key), store.where(key), size)


def texture_shard(out: str | Path, rank: int, world: int) -> Path:
    """The file rank ``rank`` of ``world`` writes for the pseudo-texture pack ``out``: ``out``
    itself for one rank, else ``STEM-rank00000-of-0000N.SUFFIX`` beside it."""
    out = Path(out)
    if world == 1:
        return out
    return out.with_name(f"{out.stem}-rank{rank:05d}-of-{world:05d}{out.suffix}")


def _h5_attrs(file: Path) -> dict[str, Any]:
    try:
        with h5py.File(file, "r") as f:
            attrs = dict(f.attrs)
    except OSError as e:
        raise TextureError(f"texture pack {file} is not a readable HDF5 file ({e})") from e
    if attrs.get("format") != FORMAT:
        raise TextureError(f"{file} is not a texture pack written by hpc-reid textures")
    if int(attrs["format_version"]) != FORMAT_VERSION:
        raise TextureError(
            f"{file}: texture pack format version {attrs['format_version']}, this hpc-reid reads "
            f"{FORMAT_VERSION}"
        )
    return attrs


def _h5_files(root: Path) -> list[Path]:
    """The files of the texture pack ``root``: the file itself, or all its rank shards (named
    ``NAME.h5``, or one of them)."""
    m = _SHARD.search(root.stem)
    if m is not None:
        root = root.with_name(root.stem[: m.start()] + root.suffix)
    if root.is_file():
        return [root]
    pattern = f"{root.stem}-rank[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]{root.suffix}"
    files = sorted(root.parent.glob(pattern))
    if not files:
        raise TextureError(
            f"data.textures.root {root} not found (no file, and no shards {root.stem}-rank*-of-*)"
        )
    worlds = {int(_SHARD.search(f.stem).group(2)) for f in files}
    world = worlds.pop()
    ranks = [int(_SHARD.search(f.stem).group(1)) for f in files]
    if worlds or ranks != list(range(world)):
        raise TextureError(
            f"texture pack {root}: shards {[f.name for f in files]} found, ranks 0..{world - 1} "
            "of one run expected (an unfinished rank leaves NAME-rank*.h5.tmp: rerun hpc-reid "
            "textures, which resumes)"
        )
    return files


class PseudoTextures:
    """Textures written by :class:`TextureWriter`: a folder mirroring the images, or an HDF5
    texture pack (one file or its rank shards), keyed by :func:`image_key`."""

    per_identity = False

    def __init__(self, root: str | Path, data_root: str | Path) -> None:
        self.root, self.data_root = Path(root).expanduser(), Path(data_root)
        self.h5 = self.root.suffix.lower() in (".h5", ".hdf5")
        if not self.h5 and not self.root.is_dir():
            raise TextureError(
                f"data.textures.root {self.root}: no such folder (pseudo textures are a folder "
                "or a .h5 file written by hpc-reid textures)"
            )
        self.rows: dict[str, tuple[int, int]] = {}  # key -> (file, row) in a pack
        self.files: list[Path] = _h5_files(self.root) if self.h5 else []
        for i, file in enumerate(self.files):
            count = int(_h5_attrs(file)["count"])
            with h5py.File(file, "r") as f:
                keys = f["relpaths"].asstr()[:count]
            for row, key in enumerate(keys):
                if key in self.rows:
                    other = self.files[self.rows[key][0]]
                    raise TextureError(f"texture of {key} is in both {other} and {file}")
                self.rows[key] = (i, row)
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def key(self, path: str) -> str:
        return image_key(path, self.data_root)

    def where(self, key: str) -> str:
        if self.h5:
            return f"{self.root} (key {key})"
        return str(self.root / Path(key).with_suffix(".png"))

    def has(self, key: str) -> bool:
        return key in self.rows if self.h5 else os.path.isfile(self.where(key))

    def read(self, key: str) -> bytes:
        if not self.h5:
            return _read(self.where(key))
        if self._pid != os.getpid():  # a forked process never reads through its parent's handle
            self._handles, self._pid = {}, os.getpid()
        file, row = self.rows[key]
        if file not in self._handles:
            self._handles[file] = h5py.File(self.files[file], "r")
        return self._handles[file]["textures"][row].tobytes()


def texture_store(config: Config) -> SyntheticTextures | PseudoTextures:
    """The store ``config.data.textures`` names (kind synthetic or pseudo)."""
    cfg = config.data.textures
    _, root = dataset_root(config.data, announce=lambda _: None)
    if cfg.kind == "synthetic":
        return SyntheticTextures(root)
    if cfg.kind == "pseudo":
        return PseudoTextures(cfg.root, root)
    raise TextureError(
        "the batch field 'texture' needs target textures: data.textures.kind is 'none' (set "
        "synthetic or pseudo)"
    )


# ---------------------------------------------------------------------------- batch fields


class TextureTargets:
    """The target textures of ``records`` from ``store``, as normalised batches.

    Every record's key is made and its texture's existence checked once, here: with ``missing``
    "error" the first record without one raises, naming the image and where it was looked for.
    A store's per-identity textures (few) are decoded once and kept; per-image ones are decoded
    at every batch.
    """

    def __init__(
        self,
        store: SyntheticTextures | PseudoTextures,
        records: Sequence[ImageRecord],
        size: tuple[int, int],
        missing: str = "error",
    ) -> None:
        self.store, self.size = store, (int(size[0]), int(size[1]))
        self.keys = [store.key(r.path) for r in records]
        found = {k: store.has(k) for k in set(self.keys)}
        self.valid = np.array([found[k] for k in self.keys], dtype=bool)
        if missing == "error" and not self.valid.all():
            i = int(np.flatnonzero(~self.valid)[0])
            raise TextureError(
                f"training image {records[i].path} has no texture: looked for "
                f"{store.where(self.keys[i])} ({int((~self.valid).sum())} of {len(records)} "
                "training images have none; data.textures.missing=skip trains them without the "
                "texture loss)"
            )
        self._cache: dict[str, np.ndarray] = {}

    def _texture(self, key: str) -> np.ndarray:
        if key in self._cache:
            return self._cache[key]
        try:
            data = self.store.read(key)
        except OSError as e:
            raise TextureError(f"texture {self.store.where(key)} cannot be read ({e})") from e
        texture = decode_texture(data, self.store.where(key), self.size)
        if self.store.per_identity:
            self._cache[key] = texture
        return texture

    def textures(self, indices: np.ndarray) -> torch.Tensor:
        """(len(indices), 3, H, W) float32 in [-1, 1]; zeros where there is no texture."""
        out = np.zeros((len(indices), 3, *self.size), dtype=np.uint8)
        for j, i in enumerate(indices.tolist()):
            if self.valid[i]:
                out[j] = self._texture(self.keys[i]).transpose(2, 0, 1)
        x = torch.from_numpy(out).float()
        x.div_(255.0).sub_(0.5).div_(0.5)  # ToTensor + Normalize(0.5, 0.5), as the released loader
        x[torch.from_numpy(~self.valid[indices])] = 0.0
        return x


_bound: tuple[Config, Sequence[ImageRecord], TextureTargets] | None = None


def texture_targets(config: Config, records: Sequence[ImageRecord]) -> TextureTargets:
    """The :class:`TextureTargets` of a run's ``config`` and training ``records``, built at the
    first batch and kept while the run lasts (both fields share it)."""
    global _bound
    if _bound is None or _bound[0] is not config or _bound[1] is not records:
        _bound = None  # a failed build leaves nothing stale behind
        textures = config.data.textures
        store = texture_store(config)
        targets = TextureTargets(store, records, config.model.san.texture_size, textures.missing)
        _bound = (config, records, targets)
    return _bound[2]


@register_batch_field("texture", configured=True)
def _texture_field(config: Config, records: Sequence[ImageRecord], indices: np.ndarray):
    return texture_targets(config, records).textures(indices)


@register_batch_field("texture_valid", configured=True)
def _texture_valid_field(config: Config, records: Sequence[ImageRecord], indices: np.ndarray):
    return torch.from_numpy(texture_targets(config, records).valid[indices])


# ---------------------------------------------------------------------------- writing


class TextureWriter:
    """Writes pseudo textures for :class:`PseudoTextures`: a folder (``out`` without a .h5
    suffix) or an HDF5 texture pack (``out`` ending in .h5).

    Atomic: a folder's PNG is written under a temporary name and renamed; a pack is written to
    ``FILE.tmp`` and renamed to ``FILE`` by :meth:`close`, so a reader never sees part of one.
    Resumable: :meth:`exists` says what is already written, and a writer opened on an unfinished
    ``FILE.tmp`` (an interrupted run) continues it from its last flushed row (``count``). Ranks
    write disjoint images into one folder, or each its own pack file (:func:`texture_shard`: one
    per rank for ``world`` > 1), read back as one store. ``attrs`` (JSON-able) say what the
    textures are: pack attributes, or ``textures.json`` in a folder.
    """

    def __init__(
        self,
        out: str | Path,
        rank: int = 0,
        world: int = 1,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"TextureWriter: rank {rank} is not in 0..{world - 1}")
        self.out, self.attrs = Path(out).expanduser(), dict(attrs or {})
        self.h5 = self.out.suffix.lower() in (".h5", ".hdf5")
        self._file: h5py.File | None = None
        self._keys: set[str] = set()
        self._rows: list[tuple[str, bytes]] = []
        if not self.h5:
            self.out.mkdir(parents=True, exist_ok=True)
            return
        self.final = texture_shard(self.out, rank, world)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
        self.meta.update(shard=rank, num_shards=world)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            self._open_tmp()
        elif self.final.exists():  # finished earlier: reopened only if something is added
            count = int(_h5_attrs(self.final)["count"])
            with h5py.File(self.final, "r") as f:
                self._keys = set(f["relpaths"].asstr()[:count])
        else:
            self._open_tmp()

    def _open_tmp(self) -> None:
        """Create ``FILE.tmp`` or continue it (cut to its committed rows)."""
        new = not self.tmp.exists()
        try:
            f = h5py.File(self.tmp, "a")
        except OSError as e:
            raise TextureError(
                f"unfinished texture pack {self.tmp} cannot be opened ({e}); delete it to write "
                "this shard again"
            ) from e
        if new:
            string, data = h5py.string_dtype("utf-8"), h5py.vlen_dtype(np.uint8)
            f.create_dataset("relpaths", (0,), string, maxshape=(None,), chunks=(256,))
            f.create_dataset("textures", (0,), data, maxshape=(None,), chunks=(256,))
            f.attrs.update({**self.meta, "count": 0})
        for k in ("shard", "num_shards"):
            if (found := int(f.attrs.get(k, -1))) != self.meta[k]:
                f.close()
                raise TextureError(
                    f"unfinished texture pack {self.tmp} was written as {k}={found}, not "
                    f"{self.meta[k]}; delete it or resume with the same ranks"
                )
        count = int(f.attrs["count"])
        for name in ("relpaths", "textures"):
            f[name].resize((count,))
        self._keys = set(f["relpaths"].asstr()[:count])
        self._file = f

    def exists(self, rel_path: str) -> bool:
        """Whether the texture of image ``rel_path`` (an :func:`image_key`) is already written."""
        if self.h5:
            return rel_path in self._keys
        return (self.out / Path(rel_path).with_suffix(".png")).is_file()

    def write(self, rel_path: str, texture: np.ndarray) -> None:
        """Write the (H, W, 3) uint8 ``texture`` of image ``rel_path`` as PNG."""
        _check_key(rel_path)
        if texture.dtype != np.uint8 or texture.ndim != 3 or texture.shape[2] != 3:
            raise ValueError(
                f"texture of {rel_path}: expected an (H, W, 3) uint8 array, got "
                f"{texture.dtype} {tuple(texture.shape)}"
            )
        buf = io.BytesIO()
        Image.fromarray(texture, "RGB").save(buf, "PNG")
        if not self.h5:
            target = self.out / Path(rel_path).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, buf.getvalue(), fsync=False)
            return
        if rel_path in self._keys:
            raise TextureError(f"texture of {rel_path} is already in {self.final}")
        if self._file is None:  # a finished shard gets more: continue it under FILE.tmp
            os.replace(self.final, self.tmp)
            self._open_tmp()
        self._keys.add(rel_path)
        self._rows.append((rel_path, buf.getvalue()))
        if len(self._rows) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Append the buffered rows to ``FILE.tmp`` and commit them (``count``) to disk."""
        if not self._rows or self._file is None:
            return
        f, n = self._file, len(self._rows)
        start = int(f.attrs["count"])
        for name in ("relpaths", "textures"):
            f[name].resize((start + n,))
        f["relpaths"][start:] = np.array([k for k, _ in self._rows], dtype=object)
        for i, (_, png) in enumerate(self._rows, start=start):
            # row by row: h5py turns PNGs of equal lengths into one 2-D array it cannot store
            f["textures"][i] = np.frombuffer(png, dtype=np.uint8)
        f.flush()
        f.attrs["count"] = start + n  # after the rows: a crash before it loses them, nothing else
        f.flush()
        self._rows = []

    def close(self) -> None:
        """Finish: the pack file renamed to its final name; a folder's ``textures.json``."""
        if not self.h5:
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.attrs}
            text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
            write_atomic(self.out / "textures.json", text)
            return
        if self._file is None:
            return
        self.flush()
        self._file.attrs.update({k: _attr(v) for k, v in self.attrs.items()})
        self._file.close()
        self._file = None
        os.replace(self.tmp, self.final)

    def __enter__(self) -> TextureWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        elif self._file is not None:  # interrupted: keep FILE.tmp's flushed rows to resume
            self.flush()
            self._file.close()
            self._file = None


def _attr(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) else json.dumps(value)
