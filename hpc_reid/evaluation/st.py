"""Spatial-temporal scoring (st-ReID): appearance joined with when and where a person was seen.

Wang, Lai, Huang and Zheng, "Spatial-Temporal Person Re-identification", AAAI 2019; the definitions
are those of its released code (github.com/Wanggcong/Spatial-Temporal-Re-identification:
gen_st_model_market.py, evaluate_st.py, evaluate_rerank_market.py), which the fine-grained ReID
code reuses (tools/image_eval.py):

1. Frames: each image's frame on its camera's clock, from its file name (the parsers' ``frame``:
   Market-1501's sequences laid end to end, DukeMTMC-reID's and VeRi-776's as named).
2. Histogram, from the training set only (:func:`camera_histogram`): for each identity i and
   camera c, the mean frame of i's training images in c; for each camera pair j < k that both saw
   i, the bin ``int(|mean_j - mean_k| / bin_frames)`` is counted once in ``H[later][earlier]``
   (the camera whose mean is larger first; a tie goes to ``H[k][j]``). Each ``H[a][b]`` is then
   normalised to sum 1 (``/ (sum + 1e-7)``). Written at training time beside the run's
   checkpoints (:data:`ST_HISTOGRAM`) as counts.
3. Parzen window, at evaluation (:func:`parzen_smooth`): ``H[a][b] <- K H[a][b]`` with
   ``K[i][j] = N(|i - j|; 0, sigma)`` (sigma in bins) for ``|i - j| <= 3 sigma``, 0 beyond, then
   normalised again as in 2.
4. Lookup (:func:`st_probability`): for query (qc, qf) and gallery item (gc, gf),
   ``p = H[qc][gc][int((qf - gf) / bin_frames)]`` if qf > gf, else
   ``H[gc][qc][int((gf - qf) / bin_frames)]``; 0 beyond the last bin (where the reference code
   would fail with an IndexError) and for a camera the histogram does not have.
5. Joint score (:func:`joint_score`), with the logistic ``f(x; l, g) = 1 / (1 + l e^(-g x))``:
   ``score = f(s; lambda0, gamma0) f(p; lambda1, gamma1)``, s the cosine similarity of the
   features (defaults 1, 5, 2, 5, the released code's ``alpha 5``). Only cosine: the code's
   similarity, and the logistic's range expects s in [-1, 1]; a euclidean or multi-part
   ``evaluation.distance`` is refused.
6. Ranking by descending score, as the ascending distance ``d = sqrt(2 - 2 score)``: re-ranking
   (which squares d and scales each row by its maximum) then starts from
   ``(2 - 2 score) / max``, the released code's re-ranking input (evaluate_rerank_market.py).

Inside the evaluation (:class:`SpatialTemporalDistance`): the score is an element-wise function of
a distance tile and the cameras and frames of its rows and columns, so it runs wherever a
:class:`~hpc_reid.evaluation.distances.RowDistance` runs (tiled, sharded over ranks, re-ranked,
the ranked-list plot) without a Q x G matrix: each feature row carries its camera and frame in
:data:`ST_COLUMNS` trailing float32 columns (exact: the frame split in two 16-bit halves).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from hpc_reid.atomic import write_atomic
from hpc_reid.config import ConfigError
from hpc_reid.data.datasets.base import Record, TrackletRecord
from hpc_reid.evaluation.distances import RowDistance, pairwise_distance

if TYPE_CHECKING:
    from hpc_reid.config import Config, SpatialTemporalConfig

__all__ = [
    "ST_COLUMNS",
    "ST_HISTOGRAM",
    "CameraHistogram",
    "SpatialTemporalDistance",
    "SpatialTemporalError",
    "camera_histogram",
    "joint_score",
    "load_histogram",
    "parzen_smooth",
    "record_frames",
    "run_histogram",
    "save_run_histogram",
    "st_probability",
]

ST_HISTOGRAM = "st_histogram.npz"  # in the run folder, beside checkpoints/
ST_COLUMNS = 3  # a row's trailing columns: camera, frame // 2^16, frame % 2^16
EPS = 1e-7  # the released code's guard in each normalisation
FILE_VERSION = 1
_HALF = 1 << 16  # float32 holds both halves exactly (frames below 2^40)
_CHUNK = 1 << 20  # pairs scored at once: bounds the (8-byte) temporaries of a tile


class SpatialTemporalError(ConfigError):
    """st-ReID cannot run as configured: a set without frame numbers, no histogram, a mismatch."""


def record_frames(
    records: Sequence[Record], dataset: str, note: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(camera ids, frames), int64, of image records; a :class:`SpatialTemporalError` naming
    ``dataset`` (and ``note``, why its frames are unknown) when any frame is unknown."""
    if records and isinstance(records[0], TrackletRecord):
        raise SpatialTemporalError(
            f"evaluation.st: data set {dataset!r} holds tracklets, which carry no frame numbers; "
            "spatial-temporal scoring is for image sets whose file names give each image's frame "
            "(market1501, dukemtmcreid, veri776, the synthetic set)"
        )
    missing = sum(r.frame is None for r in records)
    if missing:
        raise SpatialTemporalError(
            f"evaluation.st: data set {dataset!r} has no frame numbers ({missing} of "
            f"{len(records)} images without one); spatial-temporal scoring needs each image's "
            "frame from its file name (market1501, dukemtmcreid, veri776, the synthetic set)"
            + (f": {note}" if note else "")
        )
    cams = np.array([r.camid for r in records], dtype=np.int64)
    frames = np.array([r.frame for r in records], dtype=np.int64)
    if frames.size and frames.min() < 0:
        raise SpatialTemporalError(f"evaluation.st: data set {dataset!r} has negative frames")
    return cams, frames


# --- the histogram: counted at training time, smoothed at evaluation ----------------------------


@dataclass(frozen=True)
class CameraHistogram:
    """``counts[later camera, earlier camera, bin]`` (int64, C x C x bins): training identities
    whose mean frames in the two cameras differ by that many ``bin_frames`` (step 2 of the module
    docstring); ``beyond`` counts the identity camera pairs past the last bin, left out."""

    counts: np.ndarray
    bin_frames: int
    dataset: str
    beyond: int = 0

    @property
    def num_cameras(self) -> int:
        return self.counts.shape[0]

    @property
    def bins(self) -> int:
        return self.counts.shape[2]

    def normalised(self) -> np.ndarray:
        """Each camera pair's counts over their sum (+ 1e-7): float64, C x C x bins."""
        return _normalise(self.counts.astype(np.float64))

    def smoothed(self, sigma: float) -> np.ndarray:
        """The evaluation's table: :meth:`normalised` through :func:`parzen_smooth`."""
        return parzen_smooth(self.normalised(), sigma)

    def checksum(self) -> int:
        return zlib.crc32(self.counts.tobytes(), self.bin_frames)

    def save(self, path: str | Path) -> Path:
        """Written under a temporary name and renamed (``np.savez_compressed``)."""
        arrays = {
            "counts": self.counts,
            "bin_frames": np.int64(self.bin_frames),
            "beyond": np.int64(self.beyond),
            "dataset": np.str_(self.dataset),
            "version": np.int64(FILE_VERSION),
        }
        return write_atomic(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> CameraHistogram:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                if int(f["version"]) != FILE_VERSION:
                    raise SpatialTemporalError(
                        f"{path}: st histogram version {int(f['version'])}, this hpc-reid reads "
                        f"{FILE_VERSION}"
                    )
                counts = f["counts"].astype(np.int64)
                return cls(counts, int(f["bin_frames"]), str(f["dataset"]), int(f["beyond"]))
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, SpatialTemporalError):
                raise
            raise SpatialTemporalError(
                f"{path} is not an st histogram written by hpc-reid train ({exc})"
            ) from exc


def _normalise(h: np.ndarray) -> np.ndarray:
    return h / (h.sum(axis=-1, keepdims=True) + EPS)


def camera_histogram(
    records: Sequence[Record], num_cameras: int, bin_frames: int, bins: int, dataset: str
) -> CameraHistogram:
    """The training records' camera-pair histogram of frame differences (step 2 of the module
    docstring; means computed exactly, where the released code divides by count + 1e-7)."""
    cams, frames = record_frames(records, dataset)
    if cams.size and not 0 <= cams.min() <= cams.max() < num_cameras:
        raise ValueError(f"camera ids {cams.min()}..{cams.max()} outside 0..{num_cameras - 1}")
    _, person = np.unique(np.array([r.pid for r in records], dtype=np.int64), return_inverse=True)
    shape = (int(person.max()) + 1 if person.size else 0, num_cameras)
    seen, total = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    np.add.at(seen, (person, cams), 1)
    np.add.at(total, (person, cams), frames)
    mean = np.divide(total, seen, out=np.zeros(shape), where=seen > 0)
    counts = np.zeros((num_cameras, num_cameras, bins), dtype=np.int64)
    beyond = 0
    for j in range(num_cameras - 1):
        for k in range(j + 1, num_cameras):
            both = (seen[:, j] > 0) & (seen[:, k] > 0)
            a, b = mean[both, j], mean[both, k]
            j_later = a > b
            bin_ = (np.where(j_later, a - b, b - a) / bin_frames).astype(np.int64)  # int(): floor
            inside = bin_ < bins
            beyond += int((~inside).sum())
            np.add.at(counts[j, k], bin_[j_later & inside], 1)
            np.add.at(counts[k, j], bin_[~j_later & inside], 1)
    return CameraHistogram(counts, bin_frames, dataset, beyond)


def parzen_kernel(sigma: float) -> np.ndarray:
    """The window's weights at distances 0..floor(3 sigma) bins: the Gaussian density
    ``exp(-d^2 / (2 sigma^2)) / (sigma sqrt(2 pi))`` (the released code's gaussian_func2)."""
    d = np.arange(math.floor(3 * sigma) + 1, dtype=np.float64)
    return np.exp(-(d**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))


def parzen_smooth(hist: np.ndarray, sigma: float) -> np.ndarray:
    """``K h`` along the last axis of ``hist`` (... x bins), ``K[i][j]`` the window at
    ``|i - j| <= 3 sigma`` (the released code's banded bins x bins matrix, as a convolution with
    zeros past both ends), each row then normalised to sum 1 (+ 1e-7). float64."""
    half = parzen_kernel(sigma)
    window = torch.from_numpy(np.concatenate([half[:0:-1], half])).view(1, 1, -1)
    rows = torch.from_numpy(np.ascontiguousarray(hist, dtype=np.float64))
    flat = rows.reshape(-1, 1, hist.shape[-1])
    smoothed = F.conv1d(flat, window, padding=len(half) - 1)  # symmetric: convolution = K h
    return _normalise(smoothed.reshape(hist.shape).numpy())


# --- the joint score, element-wise on a tile ---------------------------------------------------


def st_probability(
    table: torch.Tensor,
    q_cams: torch.Tensor,
    q_frames: torch.Tensor,
    g_cams: torch.Tensor,
    g_frames: torch.Tensor,
    bin_frames: int,
) -> torch.Tensor:
    """(tq, tg) p of every query-gallery pair from the C x C x bins ``table`` (step 4 of the
    module docstring; int64 cameras and frames on the table's device)."""
    num_cams, _, bins = table.shape
    delta = q_frames[:, None] - g_frames[None, :]
    q_later = delta > 0
    later = torch.where(q_later, q_cams[:, None], g_cams[None, :])
    earlier = torch.where(q_later, g_cams[None, :], q_cams[:, None])
    bin_ = delta.abs_().div_(bin_frames, rounding_mode="floor")
    known = (bin_ < bins) & (later < num_cams) & (earlier < num_cams)
    index = (later.clamp_(max=num_cams - 1) * num_cams + earlier.clamp_(max=num_cams - 1)) * bins
    p = table.flatten()[index.add_(bin_.clamp_(max=bins - 1))]
    return p.masked_fill_(~known, 0.0)


def joint_score(s: torch.Tensor, p: torch.Tensor, st: SpatialTemporalConfig) -> torch.Tensor:
    """``1 / (1 + lambda0 e^(-gamma0 s)) * 1 / (1 + lambda1 e^(-gamma1 p))`` (step 5)."""
    appearance = torch.exp(-st.gamma0 * s).mul_(st.lambda0).add_(1.0).reciprocal_()
    return appearance.mul_(torch.exp(-st.gamma1 * p).mul_(st.lambda1).add_(1.0).reciprocal_())


class SpatialTemporalDistance(RowDistance):
    """The st-ReID distance ``sqrt(2 - 2 score)`` of rows ``[feature | camera | frame // 2^16 |
    frame % 2^16]`` (:meth:`rows`): a :class:`~hpc_reid.evaluation.distances.RowDistance` that
    every evaluation path (tiled, sharded, re-ranked) computes tile by tile. Never the fused
    CUDA kernel's (``whole_row_metric`` is None): the kernel ranks plain distances only."""

    def __init__(self, histogram: CameraHistogram, st: SpatialTemporalConfig):
        super().__init__(None, "global", None, "cosine")
        if histogram.bin_frames != st.bin_frames:
            raise SpatialTemporalError(
                f"evaluation.st.bin_frames={st.bin_frames}, but the histogram counts "
                f"{histogram.bin_frames} frames a bin; set evaluation.st.bin_frames="
                f"{histogram.bin_frames}"
            )
        self.histogram, self.st = histogram, st
        self.table = torch.from_numpy(histogram.smoothed(st.smooth_sigma))
        self._tables = {self.table.device: self.table}  # a copy per device the tiles are on
        self.spec = (
            f"st(cosine; bin {st.bin_frames} frames, sigma {st.smooth_sigma:g} bins, lambda "
            f"{st.lambda0:g}/{st.lambda1:g}, gamma {st.gamma0:g}/{st.gamma1:g})"
        )

    def __repr__(self) -> str:
        return f"SpatialTemporalDistance({self.spec}, histogram {self.histogram.checksum():08x})"

    @property
    def whole_row_metric(self) -> None:
        return None

    def restrict(self, qf, gf):
        return qf, gf, self

    @staticmethod
    def rows(features: torch.Tensor, cams: np.ndarray, frames: np.ndarray) -> torch.Tensor:
        """``features`` (n, D) followed by the :data:`ST_COLUMNS` of each row's camera and frame,
        float32 on the features' device; an empty shard stays as it is."""
        if len(features) == 0:
            return features
        if len(cams) != len(features) or len(frames) != len(features):
            raise ValueError(f"{len(features)} rows, {len(cams)} cameras, {len(frames)} frames")
        frames = np.asarray(frames, dtype=np.int64)
        extra = np.stack([np.asarray(cams), frames // _HALF, frames % _HALF], axis=1)
        extra = torch.from_numpy(extra.astype(np.float32)).to(features.device)
        return torch.cat([features.float(), extra], dim=1)

    def __call__(self, q, g, *, tile: int = 4096, gallery_chunk: int = 16384, out=None):
        for name, rows in (("query", q), ("gallery", g)):
            if rows.dim() != 2 or rows.shape[1] <= ST_COLUMNS:
                raise ValueError(
                    f"st-ReID {name} rows must be (n, D + {ST_COLUMNS}) (SpatialTemporalDistance."
                    f"rows), got {tuple(rows.shape)}"
                )
        d = pairwise_distance(
            q[:, :-ST_COLUMNS], g[:, :-ST_COLUMNS], "cosine", tile, gallery_chunk, out
        )
        if not d.numel():
            return d
        q_cams, q_frames = _decode(q)
        g_cams, g_frames = _decode(g)
        if d.device not in self._tables:
            self._tables[d.device] = self.table.to(d.device)
        table = self._tables[d.device]
        step = max(1, _CHUNK // d.shape[1])
        for s in range(0, d.shape[0], step):
            block = d[s : s + step]
            p = st_probability(
                table,
                q_cams[s : s + step],
                q_frames[s : s + step],
                g_cams,
                g_frames,
                self.st.bin_frames,
            )
            score = joint_score(block.double().neg_().add_(1.0), p, self.st)  # s = 1 - (1 - cos)
            block.copy_(score.mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_())
        return d


def _decode(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cameras, frames) int64 from the trailing columns of :meth:`SpatialTemporalDistance.rows`."""
    extra = rows[:, -ST_COLUMNS:].long()
    return extra[:, 0], extra[:, 1] * _HALF + extra[:, 2]


# --- the run's histogram ------------------------------------------------------------------------


def run_histogram(dataset, config: Config) -> CameraHistogram | None:
    """The histogram of ``dataset``'s training records when they all have frame numbers (cameras
    sized by every split), else None; with ``evaluation.st.enabled`` a set without them is a
    :class:`SpatialTemporalError` naming it."""
    st, train = config.evaluation.st, dataset.train
    has_frames = not dataset.is_video and all(r.frame is not None for r in train)
    if not has_frames:
        if st.enabled:
            record_frames(train, dataset.name, getattr(dataset, "frames_note", None))
        return None
    every = (*train, *dataset.query, *dataset.gallery)
    num_cameras = max(r.camid for r in every) + 1
    return camera_histogram(train, num_cameras, st.bin_frames, st.bins, dataset.name)


def save_run_histogram(dataset, config: Config, run_dir: str | Path, main: bool) -> Path | None:
    """At the start of training, ``run_dir/st_histogram.npz`` (:func:`run_histogram`) for a set
    with frame numbers, so that ``hpc-reid eval --set evaluation.st.enabled=true`` can score any
    run of it. Collective: every rank computes it (a refusal is raised on every rank alike), rank
    0 (``main``) writes it, and all wait until it is there for their evaluations to read."""
    from hpc_reid.launch.distributed import barrier

    histogram = run_histogram(dataset, config)
    path = None if histogram is None else Path(run_dir) / ST_HISTOGRAM
    if main and histogram is not None:
        histogram.save(path)
    barrier()
    return path


def load_histogram(path: str | Path, dataset, st: SpatialTemporalConfig) -> CameraHistogram:
    """The histogram file ``path`` for evaluating ``dataset`` with ``evaluation.st`` settings
    ``st``: a :class:`SpatialTemporalError` naming the file when it is missing, or counts another
    data set, other bins or fewer cameras than ``dataset`` has."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpatialTemporalError(
            f"evaluation.st: no histogram file {path}; hpc-reid train writes {ST_HISTOGRAM} into "
            "the run folder (a set with frame numbers), or give one as "
            "evaluation.st.histogram=FILE"
        )
    histogram = CameraHistogram.load(path)
    if histogram.dataset != dataset.name:
        raise SpatialTemporalError(
            f"evaluation.st.histogram {path} counts data set {histogram.dataset!r}, not the "
            f"evaluated {dataset.name!r}: camera networks differ between sets"
        )
    if histogram.bins != st.bins:
        raise SpatialTemporalError(
            f"evaluation.st.bins={st.bins}, but {path} has {histogram.bins} bins; set "
            f"evaluation.st.bins={histogram.bins}"
        )
    cameras = max(r.camid for r in (*dataset.query, *dataset.gallery)) + 1
    if cameras > histogram.num_cameras:
        raise SpatialTemporalError(
            f"evaluation.st.histogram {path} knows {histogram.num_cameras} cameras, the test "
            f"split of {dataset.name!r} has {cameras}"
        )
    return histogram
