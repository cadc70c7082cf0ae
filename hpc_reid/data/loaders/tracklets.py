"""Tracklets through the loaders (video ReID): what a training sample and a test clip hold, the same
for the torch and the DALI backend.

Training. A sample is one tracklet (:class:`~hpc_reid.data.datasets.base.TrackletRecord`). Its
generator ``sample_rng(seed, epoch, position)`` (:mod:`hpc_reid.data.transforms`) first draws its
T frame indices (:func:`hpc_reid.data.video.train_frames`), then its augmentation: with
``data.video.augment_per: tracklet`` one :class:`~hpc_reid.data.transforms.TrainParams` for all T
frames (one flip, one crop, one erasing per tracklet, as the video ReID references' transforms
applied to a whole clip), with ``frame`` one per frame, drawn in temporal order.
:func:`tracklet_sample` is that draw; both backends call it, so they pick the same frames and
make the same decisions. A batch is ``images`` (B, T, C, H, W) float32 and ``pids``, ``camids``,
``indices`` (B,) per tracklet.

Test. A tracklet's feature is the mean of its dense clips' features
(:func:`hpc_reid.data.video.dense_clips`: consecutive, non-overlapping clips of T frames, the last
padded by cycling, at most ``data.video.max_clips``). The test loader yields the clips of the
tracklets in order (:func:`clip_plan`), ``max(1, test_batch_size // T)`` clips a batch, so that a
batch holds about as many frames as an image set's test batch holds images: ``images``
(N, T, C, H, W), and ``pids``, ``camids`` and ``indices`` (N,), ``indices`` being each clip's
tracklet's index in the records. A tracklet's clips are consecutive and may straddle two batches;
its feature is the mean of the rows with its index (e.g. ``sums.index_add_(0, indices, rows)``
divided by ``torch.bincount(indices)``). Each backend decodes the clips' frames with its image test
loader (resize and normalise; :class:`ClipBatches` reshapes its batches into clips).

Memory format. ``channels_last`` for (B, T, C, H, W) images means channels_last frames: the
(B * T, C, H, W) batch the backbone sees is channels_last, i.e. strides (T H W C, H W C, 1, W C, C),
so that ``images.flatten(0, 1)`` is a channels_last view, no copy (:func:`frames_channels_last`;
DALI writes that layout directly). torch's own ``channels_last_3d`` is another layout, for
(N, C, D, H, W) volumes, and would not give channels_last frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from hpc_reid.config import LoaderConfig, VideoConfig
from hpc_reid.data.datasets.base import ImageRecord, Record, TrackletRecord, are_tracklets
from hpc_reid.data.transforms import TrainParams, TrainTransform
from hpc_reid.data.video import dense_clips, train_frames


def tracklet_sample(
    num_frames: int, video: VideoConfig, transform: TrainTransform, rng: np.random.Generator
) -> tuple[np.ndarray, list[TrainParams]]:
    """A training tracklet's T frame indices and each frame's augmentation decisions, drawn from
    the sample's generator ``rng`` in this order: the frames (:func:`train_frames`), then one
    :class:`TrainParams` shared by all frames (``video.augment_per: tracklet``) or one per frame
    in temporal order (``frame``)."""
    frames = train_frames(num_frames, video, rng)
    if video.augment_per == "tracklet":
        return frames, [transform.sample_params(rng)] * len(frames)
    return frames, [transform.sample_params(rng) for _ in frames]


def require_video(records: Sequence[Record], video: VideoConfig | None, where: str) -> bool:
    """Whether ``records`` are tracklets; tracklets without ``video`` (T, the sampling) are an
    error naming the caller ``where``."""
    tracklets = are_tracklets(records)
    if tracklets and video is None:
        raise ValueError(
            f"{where}: the records are tracklets, which need the run's data.video (seq_len, "
            "sampling, max_clips, augment_per); pass video=config.data.video"
        )
    return tracklets


def clip_plan(records: Sequence[TrackletRecord], video: VideoConfig) -> tuple[np.ndarray, ...]:
    """The test clips of ``records`` in order: (tracklet index of each clip (N,), the clips'
    frame indices in their tracklets (N, T)), by :func:`dense_clips` with ``video.seq_len`` and
    ``video.max_clips``."""
    owners, frames = [], []
    for i, record in enumerate(records):
        clips = dense_clips(record.num_frames, video.seq_len, video.max_clips)
        owners.append(np.full(len(clips), i, dtype=np.int64))
        frames.append(clips)
    if not frames:
        return np.zeros(0, np.int64), np.zeros((0, video.seq_len), np.int64)
    return np.concatenate(owners), np.concatenate(frames)


def clip_frames(
    records: Sequence[TrackletRecord], video: VideoConfig
) -> tuple[list[ImageRecord], np.ndarray]:
    """The frames of the test clips as image records, clip after clip (clip c's T frames are
    records ``c T .. c T + T - 1``, with their tracklet's pid and camid), and each clip's tracklet
    index (:func:`clip_plan`): what an image test loader decodes for :class:`ClipBatches`."""
    owners, frames = clip_plan(records, video)
    images = [
        ImageRecord(records[t].frames[f], records[t].pid, records[t].camid)
        for t, clip in zip(owners.tolist(), frames.tolist(), strict=True)
        for f in clip
    ]
    return images, owners


def clips_per_batch(cfg_loader: LoaderConfig, video: VideoConfig) -> int:
    """Clips in a test batch: ``test_batch_size // T`` (at least 1), about as many frames as an
    image set's test batch holds images (and so about as much memory)."""
    return max(1, cfg_loader.test_batch_size // video.seq_len)


class ClipBatches:
    """An image test loader over :func:`clip_frames`' records (batches of whole clips: a multiple
    of T frames each) seen as batches of clips: dict(images (N, T, C, H, W), pids, camids,
    indices (N,)), ``indices`` each clip's tracklet's index."""

    def __init__(self, frame_loader: Iterable[dict[str, Any]], owners: np.ndarray, seq_len: int):
        self.frame_loader, self.seq_len = frame_loader, int(seq_len)
        self.owners = torch.from_numpy(np.asarray(owners, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.frame_loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        t = self.seq_len
        for batch in self.frame_loader:
            images, first = batch["images"], batch["indices"][::t].cpu()
            if len(images) % t or not torch.equal(first % t, torch.zeros_like(first)):
                raise RuntimeError(
                    f"a test batch of {len(images)} frames starting at frame record "
                    f"{int(first[0])} is not made of whole clips of {t} frames"
                )
            yield {
                "images": images.unflatten(0, (-1, t)),
                "pids": batch["pids"][::t].contiguous(),
                "camids": batch["camids"][::t].contiguous(),
                "indices": self.owners[first // t],
            }


def frames_channels_last(images: torch.Tensor) -> torch.Tensor:
    """``images`` in channels_last: an image batch (N, C, H, W) as torch's channels_last; a
    tracklet batch (B, T, C, H, W) with channels_last frames, so that ``flatten(0, 1)`` is a
    channels_last (B T, C, H, W) view (the module docstring). No copy when they already are."""
    if images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    if images.dim() != 5:
        raise ValueError(
            f"expected images (N, C, H, W) or tracklets (B, T, C, H, W), got shape "
            f"{tuple(images.shape)}"
        )
    b, t = images.shape[:2]
    frames = images.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    return frames.unflatten(0, (b, t))
