"""Synthetic tracklets of walking people in the MARS layout (``hpc-reid data synth --tracklets``).

The output is the layout of MARS (Zheng et al., "MARS: A Video Benchmark for Large-Scale Person
Re-identification", ECCV 2016; info files of github.com/liangzheng06/MARS-evaluation):

    bbox_train/PPPP/PPPPCcTttttFfff.jpg   bbox_test/...   (pid, camera 1-6, tracklet, frame)
    info/train_name.txt, info/test_name.txt               every frame's name, one a line
    info/tracks_train_info.mat  track_train_info          rows [start, end, pid, camera]:
    info/tracks_test_info.mat   track_test_info           1-based, inclusive, into the name list
    info/query_IDX.mat          query_IDX                 1-based rows of track_test_info

The people and cameras are the image set's (same seed, same people and cameras); each frame is
drawn by the same renderer from the shots of :func:`~hpc_reid.data.synthetic.walking.walk`. As in
MARS, train and test identities are disjoint (the first half of the pids, rounded up, is train),
each identity is seen by 2 or more cameras with ``tracklets_per_camera`` tracklets in each, and the
query holds one tracklet per (test identity, camera), the gallery every other test row; with one
tracklet per camera, an identity's last camera keeps its tracklet in the gallery, so every query
has a positive in another camera. pid 0 rows (folder ``0000``) are distractors, walking people of
no identity, kept by the protocol; pid -1 rows (folder ``00-1``, as MARS names them) are junk,
bad detections the protocol drops. Rows follow the name lists, which are sorted.

Every random choice comes from a generator seeded by ``SeedSequence([seed, stream, key...])``: the
plan by identity, each tracklet by its person, camera and number. The same spec gives the same
bytes, written atomically, cached in ``mars_synth_<hash of spec and version>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from hpc_reid.data.datasets.base import DatasetError

from .render import draw
from .walking import walk
from .writer import (
    DISTRACTOR,
    IDENTITY,
    JPEG_QUALITY,
    JUNK,
    Renderer,
    _dump,
    _rng,
    default_cache_dir,
    ensure_cached,
    publish,
    write_jobs,
)

TRACKLET_VERSION = "1"
_PLAN, _WALK = 11, 12  # seed streams of their own: the image set's are 1-6
TRAIN, TEST = "bbox_train", "bbox_test"
# the .mat header's text holds the creation time; a fixed one keeps the files byte-identical
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by hpc_reid.data.synthetic.tracklets"
_LIMITS = {
    "ids": (4, 9999),  # pids are 4 digits
    "cams": (2, 6),  # MARS names hold one camera digit, 1..6
    "tracklets_per_camera": (1, 99),
    "min_frames": (1, 999),  # frame numbers are 3 digits
    "max_frames": (1, 999),
    "distractors": (0, 10_000),
    "junk": (0, 10_000),
    "height": (32, 1024),
    "width": (32, 1024),
    "seed": (0, 2**63 - 1),
}


@dataclass(frozen=True)
class TrackletSpec:
    """What to generate. The default, 5,514 frames, takes 11-18 s on one core of a busy 2-core
    machine."""

    ids: int = 60
    cams: int = 6
    tracklets_per_camera: int = 2
    min_frames: int = 8  # a tracklet's frame count is uniform in [min_frames, max_frames]
    max_frames: int = 16
    distractors: int = 6  # pid 0 test tracklets: walking people of no identity
    junk: int = 4  # pid -1 test tracklets: bad detections, dropped by the protocol
    height: int = 128
    width: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value, (lo, hi) = getattr(self, f.name), _LIMITS[f.name]
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise DatasetError(
                    f"TrackletSpec.{f.name}={value!r} must be an integer in {lo}..{hi}"
                )
            if not lo <= value <= hi:
                raise DatasetError(
                    f"TrackletSpec.{f.name}={value!r} is outside the allowed range {lo}..{hi}"
                )
        if self.min_frames > self.max_frames:
            raise DatasetError(
                f"TrackletSpec.min_frames={self.min_frames} exceeds max_frames={self.max_frames}"
            )

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}

    def key(self) -> str:
        """A hash of the spec and the generator version: the cache folder's name."""
        text = json.dumps(
            {"kind": "tracklets", "spec": self.to_dict(), "version": TRACKLET_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Tracklet(NamedTuple):
    """One row of the track info: where its frames go, whose it is, which random stream."""

    split: str  # TRAIN or TEST
    pid: int
    cam: int  # 0-based
    number: int  # the names' T: 1-based within the person's folder and camera
    frames: int
    kind: int  # IDENTITY, DISTRACTOR or JUNK
    key: int  # the person: pid, or the distractor / junk number
    query: bool

    @property
    def folder(self) -> str:
        return "00-1" if self.pid == -1 else f"{self.pid:04d}"

    def names(self) -> list[str]:
        """The frames' file names, in temporal order."""
        stem = f"{self.folder}C{self.cam + 1}T{self.number:04d}"
        return [f"{stem}F{f:03d}.jpg" for f in range(1, self.frames + 1)]


def plan(spec: TrackletSpec) -> list[Tracklet]:
    """Every tracklet: the train rows, then the test rows, each in the order of its names."""
    num_train = (spec.ids + 1) // 2
    per_cam = spec.tracklets_per_camera
    tracks: list[Tracklet] = []
    for pid in range(1, spec.ids + 1):
        rng = _rng(spec.seed, _PLAN, pid)
        test = pid > num_train
        cams = np.sort(rng.choice(spec.cams, int(rng.integers(2, spec.cams + 1)), replace=False))
        for c, cam in enumerate(cams.tolist()):
            frames = rng.integers(spec.min_frames, spec.max_frames, per_cam, endpoint=True)
            query = int(rng.integers(per_cam)) if test else -1
            if per_cam == 1 and c == len(cams) - 1:
                query = -1  # the only tracklet of the last camera: a cross-camera positive
            for t, n in enumerate(frames.tolist()):
                split = TEST if test else TRAIN
                tracks.append(Tracklet(split, pid, cam, t + 1, n, IDENTITY, pid, t == query))
    rng = _rng(spec.seed, _PLAN, 0)
    for kind, pid, count in ((DISTRACTOR, 0, spec.distractors), (JUNK, -1, spec.junk)):
        numbers = [0] * spec.cams
        for k in range(count):
            cam = int(rng.integers(spec.cams))
            n = int(rng.integers(spec.min_frames, spec.max_frames, endpoint=True))
            numbers[cam] += 1
            tracks.append(Tracklet(TEST, pid, cam, numbers[cam], n, kind, k, False))
    return sorted(tracks, key=lambda t: (t.split != TRAIN, t.names()[0]))


def track_info(tracks: list[Tracklet]) -> np.ndarray:
    """MARS's rows [start, end, pid, camera] of ``tracks``: 1-based, inclusive, into the name list
    of their frames in this order; cameras 1-based."""
    rows, start = [], 1
    for t in tracks:
        rows.append((start, start + t.frames - 1, t.pid, t.cam + 1))
        start += t.frames
    return np.array(rows, np.int32).reshape(-1, 4)


def counts(spec: TrackletSpec, tracks: list[Tracklet]) -> dict[str, int]:
    """Split sizes as the MARS protocol reads them (pid -1 rows dropped, pid 0 a gallery id)."""
    train = [t for t in tracks if t.split == TRAIN]
    test = [t for t in tracks if t.split == TEST]
    query = [t for t in test if t.query]
    gallery = [t for t in test if not t.query and t.kind != JUNK]
    return {
        "cameras": spec.cams,
        "train_ids": len({t.pid for t in train}),
        "train_tracklets": len(train),
        "train_frames": sum(t.frames for t in train),
        "test_tracklets": len(test),  # the rows of track_test_info, junk included
        "test_frames": sum(t.frames for t in test),
        "query_ids": len({t.pid for t in query}),
        "query_tracklets": len(query),
        "gallery_ids": len({t.pid for t in gallery}),
        "gallery_tracklets": len(gallery),
        "distractor_tracklets": sum(t.kind == DISTRACTOR for t in tracks),
        "junk_tracklets": sum(t.kind == JUNK for t in tracks),
        "textures": spec.ids,
        "frames": sum(t.frames for t in tracks),
    }


class TrackletRenderer(Renderer):
    """Draws and writes the frames of tracklets; the image set's people and cameras."""

    def render_tracklet(self, track: Tracklet) -> list[Image.Image]:
        s = self.spec
        ident, cam = self.person(track.kind, track.key), self.cameras[track.cam]
        rng = _rng(s.seed, _WALK, track.kind, track.key, track.cam, track.number)
        shots = walk(rng, ident, cam, track.frames, s.height, s.width, track.kind == JUNK)
        return [draw(ident, cam, shot, s.height, s.width)[0] for shot in shots]

    def write(self, jobs: list[Tracklet]) -> list[int]:
        for track in jobs:
            folder = self.root / track.split / track.folder
            for name, img in zip(track.names(), self.render_tracklet(track), strict=True):
                img.save(folder / name, "JPEG", quality=JPEG_QUALITY, subsampling=2)
        return [track.frames for track in jobs]


def _savemat(path: Path, name: str, array: np.ndarray) -> None:
    from scipy.io import savemat  # here: importing the package stays light

    buf = io.BytesIO()
    savemat(buf, {name: array}, do_compression=False, oned_as="row")
    data = bytearray(buf.getvalue())
    data[:116] = MAT_HEADER.ljust(116)  # the text field of the 128-byte MAT 5 header
    path.write_bytes(bytes(data))


def _write_set(root: Path, spec: TrackletSpec, workers: int, progress: bool) -> dict:
    root.chmod(0o755)  # mkdtemp makes it private; the set is meant to be shared (a cache)
    tracks = plan(spec)
    for track in tracks:
        (root / track.split / track.folder).mkdir(parents=True, exist_ok=True)
    (root / "info").mkdir()
    (root / "textures").mkdir()
    renderer = TrackletRenderer(spec, root)
    for pid in range(1, spec.ids + 1):
        texture = renderer.person(IDENTITY, pid).texture
        Image.fromarray(texture).save(root / "textures" / f"{pid:04d}.png")
    write_jobs(renderer, tracks, workers, progress, "tracklets")
    train = [t for t in tracks if t.split == TRAIN]
    test = [t for t in tracks if t.split == TEST]
    for split, rows in (("train", train), ("test", test)):
        names = [name for t in rows for name in t.names()]
        (root / "info" / f"{split}_name.txt").write_text("".join(n + "\n" for n in names))
        _savemat(
            root / "info" / f"tracks_{split}_info.mat", f"track_{split}_info", track_info(rows)
        )
    query = np.array([i + 1 for i, t in enumerate(test) if t.query], np.int32)
    _savemat(root / "info" / "query_IDX.mat", "query_IDX", query)
    meta = {
        "generator": "hpc_reid.data.synthetic.tracklets",
        "layout": "mars",
        "version": TRACKLET_VERSION,
        "spec": spec.to_dict(),
        "counts": counts(spec, tracks),
        "jpeg_quality": JPEG_QUALITY,
    }
    _dump(root / "meta.json", meta, indent=2)  # written last: its presence marks a complete set
    return meta


def generate_tracklets(
    out: str | Path,
    spec: TrackletSpec,
    workers: int = 1,
    progress: bool = False,
    *,
    overwrite: bool = False,
) -> dict:
    """Write the tracklet set to ``out`` atomically and return a summary (spec, counts, speed).
    The files are identical for any ``workers``."""
    out = Path(out).expanduser()
    start = time.perf_counter()
    meta = publish(out, lambda tmp: _write_set(tmp, spec, workers, progress), overwrite=overwrite)
    seconds = time.perf_counter() - start
    return {
        "out": str(out),
        "version": TRACKLET_VERSION,
        "spec": meta["spec"],
        "counts": meta["counts"],
        "workers": workers,
        "seconds": round(seconds, 3),
        "frames_per_second": round(meta["counts"]["frames"] / seconds, 1),
    }


def ensure_tracklets(
    spec: TrackletSpec, cache_dir: str | Path | None = None, workers: int = 1
) -> Path:
    """The folder of the tracklet set for ``spec``, generated on first use into
    ``cache_dir/mars_synth_<hash of spec and generator version>`` (default: the image set's)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return ensure_cached(
        cache / f"mars_synth_{spec.key()}",
        spec.to_dict(),
        TRACKLET_VERSION,
        lambda tmp: _write_set(tmp, spec, workers, progress=False),
    )
