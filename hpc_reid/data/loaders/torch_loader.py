"""The PIL + torch ``DataLoader`` backend: decode, augment and collate ReID batches on the CPU.

A training loader runs one batch per batch of its batch sampler (normally one of
:mod:`hpc_reid.data.samplers`: identity-balanced or plain random batches). Each index is tagged in
the main process, when the loader's iterator is created, with the sampler's current epoch and the
sample's position in the epoch's global plan; the dataset seeds the sample's augmentation from
(seed, epoch, position) (see :mod:`hpc_reid.data.transforms`). So

- images do not depend on ``num_workers`` (workers receive the tags with the indices);
- a new epoch needs only ``sampler.set_epoch(e)`` before ``for batch in loader``: the tags are read
  from the sampler at every new iterator, never from a dataset copy held by a worker;
- a run resumed with ``sampler.load_state_dict`` gets the very images of the uninterrupted run,
  and so does a run resumed at another world size with the same global batch.

Tracklets (video sets) go through the same machinery: a training sample is a tracklet
(:class:`ReidTrackletSet`: T frames, (T, C, H, W), collated to (B, T, C, H, W)) and the test
loader decodes dense clips' frames (:mod:`.tracklets` gives both semantics).

Decoding never skips: a missing, unreadable or truncated file raises :class:`CorruptImageError`
naming it, and PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from hpc_reid.config import LoaderConfig, VideoConfig
from hpc_reid.data.datasets.base import DatasetError, ImageRecord, Record, TrackletRecord
from hpc_reid.data.packed import image_file
from hpc_reid.data.transforms import TestTransform, TrainTransform, sample_rng

from .tracklets import ClipBatches, clip_frames, clips_per_batch, require_video, tracklet_sample

#: A transform: PIL image and the sample's generator (None at test time) to a (C, H, W) tensor.
Transform = Callable[[Image.Image, np.random.Generator | None], torch.Tensor]
#: A training index as the workers receive it: (dataset index, epoch, position in the epoch).
SampleKey = tuple[int, int, int]


class CorruptImageError(DatasetError):
    """An image file is missing, unreadable, truncated or not an image."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image, or raise :class:`CorruptImageError` naming it.

    ``path`` is an image file or a record path into an HDF5 pack (``PACK.h5::INDEX/RELPATH``,
    read through a handle opened in this process on first use; see :mod:`hpc_reid.data.packed`).
    """
    try:
        with Image.open(image_file(path)) as img:
            img.load()  # decode now: a truncated file fails here, not lazily later
            return img.convert("RGB")
    except FileNotFoundError:
        raise CorruptImageError(f"image file {path} not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


class ReidImageSet(Dataset):
    """Records plus a transform; an item is dict(images, pids, camids, index).

    A key is a dataset index, or a :data:`SampleKey` (index, epoch, position) from
    :class:`TaggedBatchSampler`. With a ``seed`` the transform gets the generator
    ``sample_rng(seed, epoch, position)`` (a plain index counts as epoch 0, position index);
    without one it gets None (test transforms).
    """

    def __init__(
        self, records: Sequence[ImageRecord], transform: Transform, seed: int | None = None
    ) -> None:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise ValueError(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some imported code): "
                "truncated images would be silently filled with grey; set it back to False"
            )
        self.records, self.transform, self.seed = list(records), transform, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        record = self.records[index]
        rng = None if self.seed is None else sample_rng(self.seed, epoch, position)
        image = self.transform(load_rgb(record.path), rng)
        return {"images": image, "pids": record.pid, "camids": record.camid, "index": index}


class ReidTrackletSet(ReidImageSet):
    """Training tracklets: an item is dict(images (T, C, H, W), pids, camids, index), the
    tracklet's T frames chosen and augmented from the sample's generator ``sample_rng(seed,
    epoch, position)`` by :func:`~.tracklets.tracklet_sample` (frames first, then the tracklet's
    or each frame's decisions). Keys as :class:`ReidImageSet`'s."""

    def __init__(
        self,
        records: Sequence[TrackletRecord],
        transform: TrainTransform,
        seed: int,
        video: VideoConfig,
    ) -> None:
        super().__init__(records, transform, seed)
        self.video = video

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        record = self.records[index]
        rng = sample_rng(self.seed, epoch, position)
        frames, params = tracklet_sample(record.num_frames, self.video, self.transform, rng)
        # A tracklet shorter than T repeats frames: each is decoded once.
        decoded = {f: load_rgb(record.frames[f]) for f in set(frames.tolist())}
        pairs = zip(frames.tolist(), params, strict=True)
        images = [self.transform.apply(decoded[f], p) for f, p in pairs]
        return {
            "images": torch.stack(images),
            "pids": record.pid,
            "camids": record.camid,
            "index": index,
        }


class TaggedBatchSampler(Sampler[list[SampleKey]]):
    """Batches of ``batch_sampler`` with every index tagged (index, epoch, position).

    Reads, when iteration starts, the sampler's ``epoch``, ``rank``, ``world_size`` and, for a
    resumed epoch, its start batch ``batches_per_epoch - len(sampler)`` (absent attributes mean 0,
    0, 1 and batch 0). Batch b of rank r holds positions ``(b * world + r) * B + slot``, its
    slots in the flattened global plan, where B is the sampler's ``batch_size`` if it has one,
    else the length of the first batch; positions are unique as long as no batch is longer.
    """

    def __init__(self, batch_sampler: Sampler[list[int]]) -> None:
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        s = self.batch_sampler
        epoch = int(getattr(s, "epoch", 0))
        rank, world = int(getattr(s, "rank", 0)), int(getattr(s, "world_size", 1))
        total = getattr(s, "batches_per_epoch", None)
        first = total - len(s) if total is not None else 0
        stride = getattr(s, "batch_size", None)
        for b, batch in enumerate(s, start=first):
            stride = stride or len(batch)
            if len(batch) > stride:
                raise ValueError(
                    f"batch {b} of the batch sampler has {len(batch)} indices, more than the "
                    f"{stride} of its first batch; augmentation positions would collide"
                )
            base = (b * world + rank) * stride
            yield [(int(i), epoch, base + slot) for slot, i in enumerate(batch)]


def collate_reid(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """dict(images (N, C, H, W), pids, camids, indices (N,) int64) from dataset items."""
    # default_collate stacks into shared memory inside a worker, saving a copy to the main process.
    batch = default_collate(samples)
    batch["indices"] = batch.pop("index")
    return batch


def _seed_worker_globals(worker_id: int) -> None:
    """Give Python's and numpy's global generators distinct per-worker seeds.

    Our transforms use only per-sample generators; this only keeps third-party code that draws
    from the global generators from repeating the same stream in every forked worker.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _loader_options(cfg: LoaderConfig, seed: int) -> dict[str, Any]:
    workers = cfg.num_workers
    return {
        "num_workers": workers,
        "collate_fn": collate_reid,
        "pin_memory": cfg.pin_memory and torch.cuda.is_available(),
        "prefetch_factor": cfg.prefetch if workers > 0 else None,
        # Workers are re-created per epoch: nothing they hold can go stale across epochs.
        "persistent_workers": False,
        "worker_init_fn": _seed_worker_globals if workers > 0 else None,
        "generator": torch.Generator().manual_seed(seed),
    }


def build_train_loader(
    records: Sequence[Record],
    batch_sampler: Sampler[list[int]],
    cfg_loader: LoaderConfig,
    height: int,
    width: int,
    seed: int,
    video: VideoConfig | None = None,
) -> DataLoader:
    """Training loader: one batch per ``batch_sampler`` batch, BoT augmentation seeded by ``seed``.

    Call ``batch_sampler.set_epoch(e)`` (or ``load_state_dict``) before each ``for batch in
    loader``; the sampler is read when the loop starts. Tracklet records need ``video`` (the
    run's ``data.video``): batches of (B, T, C, H, W) images (:class:`ReidTrackletSet`).
    """
    tracklets = require_video(records, video, "the torch training loader")
    num_records = getattr(batch_sampler, "num_records", len(records))
    if num_records != len(records):
        raise ValueError(
            f"the batch sampler was built over {num_records} records but the loader got "
            f"{len(records)}; build both from the same training split"
        )
    transform = TrainTransform(cfg_loader.augment, height, width)
    if tracklets:
        dataset = ReidTrackletSet(records, transform, seed, video)
    else:
        dataset = ReidImageSet(records, transform, seed)
    return DataLoader(
        dataset,
        batch_sampler=TaggedBatchSampler(batch_sampler),
        **_loader_options(cfg_loader, seed),
    )


def build_test_loader(
    records: Sequence[Record],
    cfg_loader: LoaderConfig,
    height: int,
    width: int,
    video: VideoConfig | None = None,
) -> DataLoader | ClipBatches:
    """Test loader: records in order, ``test_batch_size`` per batch (the last may be smaller).

    Tracklet records need ``video``: batches of their dense clips, (N, T, C, H, W) with each
    clip's tracklet index (:mod:`.tracklets`), decoded as this loader's images."""
    if require_video(records, video, "the torch test loader"):
        frames, owners = clip_frames(records, video)
        size = clips_per_batch(cfg_loader, video) * video.seq_len
        loader = _image_test_loader(frames, cfg_loader, height, width, size)
        return ClipBatches(loader, owners, video.seq_len)
    return _image_test_loader(records, cfg_loader, height, width, cfg_loader.test_batch_size)


def _image_test_loader(
    records: Sequence[ImageRecord], cfg_loader: LoaderConfig, height: int, width: int, size: int
) -> DataLoader:
    dataset = ReidImageSet(records, TestTransform(cfg_loader.augment, height, width))
    return DataLoader(
        dataset,
        batch_size=size,
        shuffle=False,
        drop_last=False,
        **_loader_options(cfg_loader, seed=0),
    )
