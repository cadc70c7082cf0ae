"""MARS: tracklets of 1,261 people from 6 cameras, cut by the release's track info .mat files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import scipy.io

from .base import (
    DatasetError,
    ReidDataset,
    TrackletRecord,
    register_dataset,
    require_dir,
    require_file,
)

NUM_CAMERAS = 6
# PPPP C cam T tracklet F frame: pid 0000 marks distractors, 00-1 junk (as torchreid reads it,
# the person is the name's first 4 characters and the camera its 6th).
FRAME_NAME = re.compile(r"(\d{4}|00-1)C(\d)T\d+F\d+\.jpe?g")
INFO_FILES = {
    "train_names": "train_name.txt",
    "test_names": "test_name.txt",
    "track_train": "tracks_train_info.mat",
    "track_test": "tracks_test_info.mat",
    "query_idx": "query_IDX.mat",
}
MAT_KEYS = {"track_train": "track_train_info", "track_test": "track_test_info"}


@register_dataset("mars")
class MARS(ReidDataset):
    """MARS (Zheng et al., "MARS: A Video Benchmark for Large-Scale Person Re-identification",
    ECCV 2016).

    Source: the ``MARS`` release (``bbox_train/``, ``bbox_test/``: 1,191,003 frames of 256x128
    boxes found by DPM and tracked by GMMCP, 6 cameras on the Tsinghua campus) and ``info/`` from
    github.com/liangzheng06/MARS-evaluation. Frames are ``bbox_*/PPPP/PPPPC{cam}T{tracklet}
    F{frame}.jpg``. Train: 625 ids / 8,298 tracklets / 509,914 frames; query: 1,980 tracklets;
    gallery: 9,330 tracklets, distractors (pid 0) among them.

    Protocol: ``info/train_name.txt`` and ``test_name.txt`` list the frame names in order;
    ``tracks_{train,test}_info.mat`` hold one row per tracklet, ``[start, end, pid, camera]``,
    1-based and inclusive into the name list; ``query_IDX.mat`` holds the 1-based test rows that
    are queries, and the gallery is every other test row. Rows of pid -1 (junk) are left out
    (counted in ``skipped``); pid 0 distractors are kept. A tracklet's ``tid`` is its 0-based row
    in its track info (train rows for train, test rows for query and gallery); its frames are
    sorted by name, which is temporal order. At evaluation, gallery tracklets of the query's
    identity and camera are removed (cross-camera, as Market-1501).
    """

    name = "mars"
    layout = (
        "  ROOT/bbox_train/0001/0001C1T0001F001.jpg ...\n"
        "  ROOT/bbox_test/0000/0000C1T0001F001.jpg ...\n"
        "  ROOT/info/train_name.txt, test_name.txt  (one frame name a line)\n"
        "  ROOT/info/tracks_train_info.mat  (key track_train_info: N x 4 [start, end, pid, cam])\n"
        "  ROOT/info/tracks_test_info.mat  (key track_test_info: N x 4)\n"
        "  ROOT/info/query_IDX.mat  (key query_IDX: 1-based rows of track_test_info)\n"
        "(ROOT may also hold a folder mars/ or MARS/ laid out as above)"
    )

    def __init__(self, root: str | Path):
        self.root = find_root(Path(root).expanduser())
        require_dir(self.root, self.name, self.layout)
        info = require_dir(self.root / "info", self.name, self.layout)
        files = {k: require_file(info / f, self.name, self.layout) for k, f in INFO_FILES.items()}
        train_names = read_names(files["train_names"])
        test_names = read_names(files["test_names"])
        track_train = self.read_tracks(files["track_train"], MAT_KEYS["track_train"])
        track_test = self.read_tracks(files["track_test"], MAT_KEYS["track_test"])
        query_rows = self.read_query_rows(files["query_idx"], len(track_test))

        folders = {
            s: str(require_dir(self.root / s, self.name, self.layout))
            for s in ("bbox_train", "bbox_test")
        }
        train, junk = self.tracklets(
            track_train, range(len(track_train)), train_names, files, "train", folders
        )
        is_query = np.zeros(len(track_test), dtype=bool)
        is_query[query_rows] = True
        query, junk_query = self.tracklets(
            track_test, query_rows.tolist(), test_names, files, "test", folders
        )
        gallery_rows = np.flatnonzero(~is_query).tolist()
        gallery, junk_gallery = self.tracklets(
            track_test, gallery_rows, test_names, files, "test", folders
        )
        for split, records in (("train", train), ("test", query + gallery)):
            if records and not os.path.isfile(records[0].frames[0]):
                raise DatasetError(
                    f"{self.name}: frame {records[0].frames[0]}, the first of {split} tracklet "
                    f"{records[0].tid}, not found; expected layout:\n{self.layout}"
                )
        skipped = {"junk tracklets": junk + junk_query + junk_gallery}
        self._finish(train, query, gallery, skipped)

    def read_tracks(self, path: Path, key: str) -> np.ndarray:
        """The N x 4 integer rows [start, end, pid, camera] of a track info file."""
        tracks = integer_array(load_mat(path, key, self.name), path, key, self.name)
        if tracks.ndim != 2 or tracks.shape[1] != 4:
            raise DatasetError(
                f"{self.name}: {path} key {key!r} has shape {tracks.shape}; expected N x 4 rows "
                "[start, end, pid, camera]"
            )
        return tracks

    def read_query_rows(self, path: Path, num_test: int) -> np.ndarray:
        """The 0-based test rows that are queries, in the file's order."""
        rows = integer_array(
            load_mat(path, "query_IDX", self.name), path, "query_IDX", self.name
        ).ravel()
        bad = np.flatnonzero((rows < 1) | (rows > num_test))
        if bad.size:
            raise DatasetError(
                f"{self.name}: {path} key 'query_IDX' holds {rows[bad[0]]}, outside 1..{num_test} "
                f"(1-based rows of {INFO_FILES['track_test']})"
            )
        if len(np.unique(rows)) != len(rows):
            raise DatasetError(f"{self.name}: {path} key 'query_IDX' names a test row twice")
        return rows - 1

    def tracklets(
        self,
        tracks: np.ndarray,
        rows: range | list[int],
        names: list[str],
        files: dict[str, Path],
        part: str,
        folders: dict[str, str],
    ) -> tuple[list[TrackletRecord], int]:
        """The tracklets of ``rows`` of ``tracks`` (names from ``{part}_name.txt``) and how many
        junk rows (pid -1) were left out."""
        names_file, tracks_file = files[f"{part}_names"], files[f"track_{part}"]
        folder = folders[f"bbox_{part}"]
        records, junk = [], 0
        for row in rows:
            start, end, pid, cam = (int(v) for v in tracks[row])
            where = f"{self.name}: {tracks_file} row {row + 1} [{start}, {end}, {pid}, {cam}]"
            if not 1 <= start <= end <= len(names):
                raise DatasetError(
                    f"{where} spans names {start}..{end}, but {names_file} has {len(names)} "
                    "names (expected 1 <= start <= end <= the name count)"
                )
            if pid == -1:
                junk += 1
                continue
            if not 1 <= cam <= NUM_CAMERAS:
                raise DatasetError(f"{where}: camera {cam} is outside 1..{NUM_CAMERAS}")
            frames = sorted(names[start - 1 : end])
            for frame in frames:
                m = FRAME_NAME.fullmatch(frame)
                if m is None:
                    raise DatasetError(
                        f"{self.name}: frame name {frame!r} in {names_file} does not match "
                        f"{FRAME_NAME.pattern!r}"
                    )
                name_pid = -1 if m.group(1) == "00-1" else int(m.group(1))
                if name_pid != pid or int(m.group(2)) != cam:
                    raise DatasetError(
                        f"{where}: its frame {frame} in {names_file} is of person "
                        f"{m.group(1)}, camera {m.group(2)} (the name list and track info "
                        "disagree)"
                    )
            paths = tuple(f"{folder}{os.sep}{f[:4]}{os.sep}{f}" for f in frames)
            records.append(TrackletRecord(paths, pid, cam - 1, row))
        return records, junk


def find_root(root: Path) -> Path:
    """The folder holding ``info/``: ``root`` or its child ``mars/`` or ``MARS/``."""
    for folder in (root, root / "mars", root / "MARS"):
        if (folder / "info").is_dir():
            return folder
    return root


def read_names(path: Path) -> list[str]:
    """The frame names of a name list, one a line (blank lines ignored)."""
    with path.open() as f:
        return [line.strip() for line in f if line.strip()]


def load_mat(path: Path, key: str, dataset: str) -> np.ndarray:
    """``key`` of a MATLAB (v5) file, or an error naming the file, the key and those present."""
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError as e:  # scipy reads v4 to v7.2; v7.3 is HDF5
        raise DatasetError(
            f"{dataset}: cannot read {path}: {e} (expected a MATLAB v5 file, as released)"
        ) from e
    except (scipy.io.matlab.MatReadError, ValueError, IndexError) as e:
        # IndexError: scipy's header check on a file shorter than a MATLAB header.
        raise DatasetError(f"{dataset}: cannot read {path} as a MATLAB file: {e}") from e
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise DatasetError(f"{dataset}: {path} lacks the key {key!r} (found: {found})")
    return np.asarray(mat[key])


def integer_array(values: np.ndarray, path: Path, key: str, dataset: str) -> np.ndarray:
    """``values`` as int64, refusing non-integers (MATLAB stores indices as doubles)."""
    if values.dtype.kind not in "iuf" or (
        values.dtype.kind == "f" and not np.array_equal(values, np.round(values))
    ):
        raise DatasetError(
            f"{dataset}: {path} key {key!r} holds non-integer values ({values.dtype})"
        )
    return values.astype(np.int64)
