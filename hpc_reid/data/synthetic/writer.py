"""Writing the synthetic set: the spec, the Market-1501 split plan, the files, the cache.

The output is read unchanged by :class:`hpc_reid.data.datasets.market1501.Market1501` (Zheng et
al., ICCV 2015): ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` with names
``PPPP_cCsS_FFFFFF_BB.jpg``. As in Market-1501, train and test identities are disjoint, every test
identity gives one query per camera that saw it and the rest of its images to the gallery, pid 0
images are distractors in the gallery and pid -1 images are junk the protocol leaves out.

Every random choice comes from a generator seeded by ``SeedSequence([seed, stream, key...])``: the
plan by identity, each person by identity, each camera by camera, each image by its identity and
index. So an image's bytes depend only on the spec and the image, whichever process draws it.

Frame numbers: by default each identity's track in a camera starts at a random frame, in a random
sequence (``sS`` of the name). With ``transit`` they follow identities walking around a ring of
cameras (:mod:`.transit`; one sequence per camera), for spatial-temporal scoring; the images, the
splits and every other name part are those of the same spec without it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from hpc_reid.data.datasets.base import DatasetError

from .camera import make_camera, sample_shot
from .people import TEXTURE_LAYOUT, Identity, make_identity
from .render import KEYPOINTS, draw
from .transit import camera_network, walk

GENERATOR_VERSION = "1"
JPEG_QUALITY = 90
_PLAN, _IDENTITY, _DISTRACTOR, _JUNK, _CAMERA, _SHOT, _TRANSIT = range(1, 8)
IDENTITY, DISTRACTOR, JUNK = 0, 1, 2
_LIMITS = {
    "ids": (4, 9999),  # pids are 4 digits
    "cams": (2, 6),  # Market names allow cameras 1..6
    "images_per_id": (2, 1000),
    "distractors": (0, 100_000),
    "junk": (0, 100_000),
    "height": (32, 1024),
    "width": (32, 1024),
    "seed": (0, 2**63 - 1),
}


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. The first half of the identities (rounded up) is train, the rest test."""

    ids: int = 200
    cams: int = 6
    images_per_id: int = 16  # mean; each identity's count varies by up to 25 %
    distractors: int = 100  # pid 0 gallery images: pedestrians of no identity
    junk: int = 30  # pid -1 gallery images: bad crops, dropped by the parser
    height: int = 128
    width: int = 64
    seed: int = 0
    transit: bool = False  # frames from a camera-network walk (.transit); off: random frames

    def __post_init__(self) -> None:
        if not isinstance(self.transit, bool | np.bool_):
            raise DatasetError(f"SynthSpec.transit={self.transit!r} must be true or false")
        for f in fields(self):
            if f.name == "transit":
                continue
            value, (lo, hi) = getattr(self, f.name), _LIMITS[f.name]
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise DatasetError(f"SynthSpec.{f.name}={value!r} must be an integer in {lo}..{hi}")
            if not lo <= value <= hi:
                raise DatasetError(
                    f"SynthSpec.{f.name}={value!r} is outside the allowed range {lo}..{hi}"
                )

    def to_dict(self) -> dict[str, int | bool]:
        """The spec as JSON values; ``transit`` only when on, so that a spec without it keeps the
        cache key and ``meta.json`` it had before transit existed."""
        out: dict[str, int | bool] = {k: int(v) for k, v in asdict(self).items() if k != "transit"}
        if self.transit:
            out["transit"] = True
        return out

    def key(self) -> str:
        """A hash of the spec and the generator version: the cache folder's name."""
        text = json.dumps({"spec": self.to_dict(), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Job(NamedTuple):
    """One image to draw: where it goes, whose it is, which camera, which random stream."""

    relpath: str
    pid: int
    cam: int  # 0-based
    kind: int  # IDENTITY, DISTRACTOR or JUNK
    key: int  # the person: pid, or the distractor / junk number
    index: int  # the image of that person


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def plan(spec: SynthSpec) -> list[Job]:
    """Every image of the set, in a fixed order: identities by pid, then distractors, then junk."""
    num_train = (spec.ids + 1) // 2
    jobs: list[Job] = []
    network = camera_network(_rng(spec.seed, _TRANSIT, 0), spec.cams) if spec.transit else None
    for pid in range(1, spec.ids + 1):
        rng = _rng(spec.seed, _PLAN, pid)
        test = pid > num_train
        # a test identity needs 2 images per camera: one query, one cross-camera positive
        per_cam = 2 if test else 1
        n = max(round(spec.images_per_id * rng.uniform(0.75, 1.25)), 2 * per_cam)
        n_cams = int(rng.integers(2, min(spec.cams, n // per_cam) + 1))
        cams = np.sort(rng.choice(spec.cams, n_cams, replace=False))
        counts = per_cam + rng.multinomial(n - per_cam * n_cams, rng.dirichlet(np.ones(n_cams)))
        index, split = 0, "bounding_box_test" if test else "bounding_box_train"
        tracks = []
        for cam, count in zip(cams.tolist(), counts.tolist(), strict=True):
            # one track per camera: a sequence, and frames increasing from a random start
            seq = int(rng.integers(1, 7))
            frames = int(rng.integers(0, 150_000)) + np.cumsum(rng.integers(5, 40, count))
            query = int(rng.integers(count)) if test else -1
            boxes = [int(rng.integers(8)) for _ in range(count)]
            tracks.append([cam, seq, frames, query, boxes])
        if network is not None:  # the same draws above, then the walk's frames, one sequence
            walked = walk(network, _rng(spec.seed, _TRANSIT, pid), [(t[0], t[2]) for t in tracks])
            for track, frames in zip(tracks, walked, strict=True):
                track[1:3] = 1, frames
        for cam, seq, frames, query, boxes in tracks:
            for i, (frame, box) in enumerate(zip(frames.tolist(), boxes, strict=True)):
                folder = "query" if i == query else split
                name = f"{pid:04d}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}.jpg"
                jobs.append(Job(f"{folder}/{name}", pid, cam, IDENTITY, pid, index))
                index += 1
    used: set[str] = set()
    rng = _rng(spec.seed, _PLAN, 0)
    for kind, pid, count in ((DISTRACTOR, 0, spec.distractors), (JUNK, -1, spec.junk)):
        for k in range(count):
            cam, seq = int(rng.integers(spec.cams)), int(rng.integers(1, 7))
            frame, box = int(rng.integers(1, 200_000)), int(rng.integers(8))
            seq = 1 if spec.transit else seq  # one sequence per camera; frames over the span
            prefix = "0000" if pid == 0 else "-1"
            while (name := f"{prefix}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}.jpg") in used:
                box += 1  # another detection in the same frame
            used.add(name)
            jobs.append(Job(f"bounding_box_test/{name}", pid, cam, kind, k, 0))
    return jobs


def counts(spec: SynthSpec, jobs: list[Job]) -> dict[str, int]:
    """Split sizes as the Market-1501 parser reports them (pid 0 counts as a gallery id)."""

    def of(folder: str, kinds=(IDENTITY, DISTRACTOR)) -> list[Job]:
        return [j for j in jobs if j.relpath.startswith(folder + "/") and j.kind in kinds]

    train, query, gallery = of("bounding_box_train"), of("query"), of("bounding_box_test")
    return {
        "cameras": spec.cams,
        "train_ids": len({j.pid for j in train}),
        "train_images": len(train),
        "query_ids": len({j.pid for j in query}),
        "query_images": len(query),
        "gallery_ids": len({j.pid for j in gallery}),
        "gallery_images": len(gallery),
        "distractor_images": sum(j.kind == DISTRACTOR for j in jobs),
        "junk_images": sum(j.kind == JUNK for j in jobs),
        "textures": spec.ids,
        "images": len(jobs),
    }


class Renderer:
    """Draws and writes the images of one spec; cheap to build in every worker process."""

    def __init__(self, spec: SynthSpec, root: str | Path | None = None):
        self.spec = spec
        self.root = Path(root) if root is not None else None
        self.cameras = [
            make_camera(_rng(spec.seed, _CAMERA, c), spec.height, spec.width)
            for c in range(spec.cams)
        ]
        self._people: dict[tuple[int, int], Identity] = {}

    def person(self, kind: int, key: int) -> Identity:
        if (kind, key) not in self._people:
            stream = (_IDENTITY, _DISTRACTOR, _JUNK)[kind]
            self._people[kind, key] = make_identity(_rng(self.spec.seed, stream, key))
        return self._people[kind, key]

    def render(self, job: Job) -> tuple[Image.Image, dict]:
        s = self.spec
        ident = self.person(job.kind, job.key)
        rng = _rng(s.seed, _SHOT, job.kind, job.key, job.index)
        shot = sample_shot(rng, ident, self.cameras[job.cam], s.height, s.width, job.kind == JUNK)
        return draw(ident, self.cameras[job.cam], shot, s.height, s.width)

    def write(self, jobs: list[Job]) -> list[tuple[str, dict]]:
        out = []
        for job in jobs:
            img, keypoints = self.render(job)
            img.save(self.root / job.relpath, "JPEG", quality=JPEG_QUALITY, subsampling=2)
            out.append((job.relpath, keypoints))
        return out


_WORKER = None  # this worker process's renderer: a Renderer or a TrackletRenderer


def _init_worker(factory, spec, root: str) -> None:
    global _WORKER
    _WORKER = factory(spec, root)


def _write_chunk(jobs: list) -> list:
    assert _WORKER is not None
    return _WORKER.write(jobs)


def write_jobs(renderer, jobs: list, workers: int, progress: bool, unit: str) -> list:
    """``renderer.write`` over ``jobs`` in chunks, here or in ``workers`` processes (each building
    its own ``type(renderer)(spec, root)``); the results in the order of ``jobs``."""
    size = max(1, min(64, len(jobs) // (4 * max(workers, 1))))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    out: list = []

    def collect(results: list) -> None:
        out.extend(results)
        if progress:
            print(f"\rsynthetic set: {len(out)}/{len(jobs)} {unit}", end="", file=sys.stderr)

    if workers <= 1:
        for chunk in chunks:
            collect(renderer.write(chunk))
    else:
        # spawn: forking a process that holds threads (torch, loaders) is unsafe
        args = (type(renderer), renderer.spec, str(renderer.root))
        with get_context("spawn").Pool(workers, _init_worker, args) as pool:
            for results in pool.imap(_write_chunk, chunks):
                collect(results)
    if progress:
        print(file=sys.stderr)
    return out


def _dump(path: Path, data, indent: int | None = None) -> None:
    separators = None if indent else (",", ":")
    path.write_text(json.dumps(data, sort_keys=True, indent=indent, separators=separators) + "\n")


def _write_set(root: Path, spec: SynthSpec, workers: int, progress: bool) -> dict:
    root.chmod(0o755)  # mkdtemp makes it private; the set is meant to be shared (a cache)
    jobs = plan(spec)
    for folder in ("bounding_box_train", "bounding_box_test", "query", "textures"):
        (root / folder).mkdir()
    renderer = Renderer(spec, root)
    for pid in range(1, spec.ids + 1):
        texture = renderer.person(IDENTITY, pid).texture
        Image.fromarray(texture).save(root / "textures" / f"{pid:04d}.png")
    keypoints = dict(write_jobs(renderer, jobs, workers, progress, "images"))
    _dump(root / "keypoints.json", keypoints)
    meta = {
        "generator": "hpc_reid.data.synthetic",
        "version": GENERATOR_VERSION,
        "spec": spec.to_dict(),
        "counts": counts(spec, jobs),
        "jpeg_quality": JPEG_QUALITY,
        "keypoints": list(KEYPOINTS),
        "keypoint_format": "[x, y, visible] in continuous pixel coordinates (the image's top-left "
        "corner is (0, 0)); left/right are the person's own sides: in a front view left_shoulder "
        "has the larger x, in a back view the smaller; visible is false when out of frame, under "
        "an occluder or turned away from the camera",
        "texture_layout": {k: list(v) for k, v in TEXTURE_LAYOUT.items()},
    }
    _dump(root / "meta.json", meta, indent=2)  # written last: its presence marks a complete set
    return meta


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _refuse(out: Path) -> DatasetError:
    return DatasetError(
        f"synthetic data set: output folder {out} exists and is not empty; "
        "pass overwrite=True (hpc-reid data synth --overwrite) to replace it"
    )


def publish(out: Path, write: Callable[[Path], dict], *, overwrite: bool = False) -> dict:
    """``write(tmp)`` into a temporary sibling folder ``OUT.tmp-XXXX``, renamed to ``out`` when
    complete, so ``out`` is never seen half-written; returns what ``write`` returned."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"synthetic data set: output path {out} is a file, not a folder")
    if _is_nonempty(out) and not overwrite:
        raise _refuse(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        meta = write(tmp)
        try:
            os.rename(tmp, out)  # replaces an empty folder, fails on a non-empty one
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not overwrite:
                raise _refuse(out) from None
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def generate(
    out: str | Path,
    spec: SynthSpec,
    workers: int = 1,
    progress: bool = False,
    *,
    overwrite: bool = False,
) -> dict:
    """Write the synthetic set to ``out`` atomically (:func:`publish`) and return a summary
    (spec, counts, speed). The files are identical for any ``workers``."""
    out = Path(out).expanduser()
    start = time.perf_counter()
    meta = publish(out, lambda tmp: _write_set(tmp, spec, workers, progress), overwrite=overwrite)
    seconds = time.perf_counter() - start
    return {
        "out": str(out),
        "version": GENERATOR_VERSION,
        "spec": meta["spec"],
        "counts": meta["counts"],
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_second": round(meta["counts"]["images"] / seconds, 1),
    }


def default_cache_dir() -> Path:
    """``$HPC_REID_CACHE/synthetic``, or ``~/.cache/hpc_reid/synthetic``."""
    base = os.environ.get("HPC_REID_CACHE") or Path.home() / ".cache" / "hpc_reid"
    return Path(base).expanduser() / "synthetic"


def _matches(folder: Path, spec: dict, version: str) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == version and meta.get("spec") == spec


def ensure_cached(folder: Path, spec: dict, version: str, write: Callable[[Path], object]) -> Path:
    """``folder``, written by ``write(tmp)`` unless its ``meta.json`` already holds ``spec`` and
    ``version``. Concurrent callers (several ranks) may each write a copy; the first rename wins
    and the others discard theirs, so nobody ever reads a partial set."""
    if _matches(folder, spec, version):
        return folder
    if _is_nonempty(folder):
        raise DatasetError(
            f"synthetic data set: cache folder {folder} exists but its meta.json does not match "
            f"the spec {spec} (generator version {version}); delete the folder"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)
        except OSError as exc:
            finished = exc.errno in (errno.ENOTEMPTY, errno.EEXIST)
            if not (finished and _matches(folder, spec, version)):
                raise
            shutil.rmtree(tmp)  # another process finished first; its copy is identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def ensure_synthetic(
    spec: SynthSpec, cache_dir: str | Path | None = None, workers: int = 1
) -> Path:
    """The folder of the synthetic set for ``spec``, generated on first use
    (:func:`ensure_cached`) into ``cache_dir/market_synth_<hash of spec and generator version>``.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return ensure_cached(
        cache / f"market_synth_{spec.key()}",
        spec.to_dict(),
        GENERATOR_VERSION,
        lambda tmp: _write_set(tmp, spec, workers, progress=False),
    )
