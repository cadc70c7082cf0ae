"""The NVIDIA DALI backend: decode and augment ReID batches with DALI, on the GPU when there is one.

The pipeline is fed by ``fn.external_source`` in batch mode. Its callback (:class:`RankBatches`)
maps DALI's (epoch index, iteration) to one batch of the :class:`~hpc_reid.data.samplers.
IdentitySampler`'s index stream for this rank, and returns the encoded JPEG bytes of the batch,
its pids, camids and dataset indices, and every sample's random decisions. The decisions are
drawn on the CPU by :meth:`~hpc_reid.data.transforms.TrainTransform.sample_params` from
``sample_rng(seed, epoch, position)``, exactly as the torch loader draws them, and fed to the DALI
operators as per-sample arguments. So both backends flip, crop and erase the same samples the
same way, and pixels differ only by the JPEG decoder's and the resizer's rounding
(:mod:`hpc_reid.data.transforms` gives the semantics; DALI's own random generators are not used).

Graph: decode (``mixed``, nvJPEG, with CUDA; ``cpu`` with ``device_id=None`` without) ->
bilinear resize with antialiasing -> slice with zero fill (the pad-then-crop, its window
mirrored for flipped samples) -> flip, normalise to float CHW (one operator) -> erase with 0 in
normalised space (the mean pixel). Colour jitter is
not implemented here: :func:`build_train_loader` rejects it, and ``loader.backend=auto`` falls
back to the torch loader when it is on.

Epochs and resume. :class:`DaliTrainLoader` has ``len(loader) == len(sampler)`` and reads the
sampler's epoch and start batch whenever a loop starts, like the torch loader. A DALI pipeline
ends an epoch when the callback raises ``StopIteration`` and must be ``reset()`` before the next;
DALI then counts its epoch index up, and the callback maps it to sampler epoch ``first + index``
(starting at the resumed batch only in the first). A loop that continues exactly there (the
trainer's ``set_epoch(e + 1)`` after a full epoch) reuses the pipeline; anything else (a loop
left early, ``load_state_dict``, ``set_epoch`` to another epoch) builds a new one. With
``loader.num_workers > 0`` the callback runs in that many DALI Python worker processes
(``parallel=True``), which receive a copy of the sampler: the plan is a pure function of (seed,
epoch), so workers need no messages. ``loader.prefetch`` is the pipeline's prefetch queue depth.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from hpc_reid.config import ConfigError, LoaderConfig
from hpc_reid.data.datasets.base import ImageRecord
from hpc_reid.data.pack import read_image_bytes
from hpc_reid.data.samplers import IdentitySampler
from hpc_reid.data.transforms import TrainTransform, sample_rng

from .torch_loader import CorruptImageError

_OUTPUTS = ("images", "pids", "camids", "indices")


def _read_bytes(path: str) -> np.ndarray:
    """Encoded bytes of an image file or of a pack row (``FILE.h5::INDEX/...``, checksummed)."""
    try:
        return np.frombuffer(read_image_bytes(path), dtype=np.uint8)
    except FileNotFoundError:
        raise CorruptImageError(f"image file {path} not found") from None
    except OSError as e:
        raise CorruptImageError(f"cannot read image {path}: {e}") from e


class RankBatches:
    """External-source callback: DALI (epoch index, iteration) -> this rank's batch, or stop.

    DALI epoch index k is sampler epoch ``epoch + k``, starting at batch ``first`` when k = 0 and
    at batch 0 after. With ``transform`` None (test time) batches are ``records`` in order.
    Picklable: DALI's parallel workers receive a copy.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        sampler: IdentitySampler | None,
        transform: TrainTransform | None,
        *,
        epoch: int = 0,
        first: int = 0,
        seed: int = 0,
        batch_size: int = 1,
    ) -> None:
        self.paths = [str(r.path) for r in records]
        self.pids = np.array([r.pid for r in records], dtype=np.int64)
        self.camids = np.array([r.camid for r in records], dtype=np.int64)
        self.sampler = copy.deepcopy(sampler)
        self.transform, self.epoch, self.first = transform, int(epoch), int(first)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self._cached: tuple[int, list[list[int]]] | None = None

    def _batches(self, k: int) -> tuple[int, int, list[list[int]]]:
        """(sampler epoch, first batch, batches from there) of DALI epoch index ``k``."""
        epoch, first = self.epoch + k, self.first if k == 0 else 0
        if self._cached is None or self._cached[0] != k:
            s = self.sampler
            if s is None:
                n, b = len(self.paths), self.batch_size
                batches = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
            else:
                s.set_epoch(epoch)
                s._start = first  # same effect as load_state_dict at batch `first`
                batches = list(s)
            self._cached = (k, batches)
        return epoch, first, self._cached[1]

    def __call__(self, info: Any) -> tuple[Any, ...]:
        epoch, first, batches = self._batches(info.epoch_idx)
        if info.iteration >= len(batches):
            raise StopIteration
        batch = np.asarray(batches[info.iteration], dtype=np.int64)
        jpegs = [_read_bytes(self.paths[i]) for i in batch]
        out = (jpegs, self.pids[batch], self.camids[batch], batch)
        if self.transform is None:
            return out
        # Positions in the global plan, as TaggedBatchSampler numbers them.
        s, n = self.sampler, len(batch)
        stride = s.num_identities * s.num_instances
        base = ((first + info.iteration) * s.world_size + s.rank) * stride
        pad = self.transform.augment.pad
        flip = np.zeros(n, dtype=np.int32)
        start = np.zeros((n, 2), dtype=np.int32)
        erase_at = np.zeros((n, 2), dtype=np.float32)
        erase_shape = np.zeros((n, 2), dtype=np.float32)  # (0, 0) erases nothing
        for j in range(n):
            p = self.transform.sample_params(sample_rng(self.seed, epoch, base + j))
            flip[j] = p.flip
            # The pipeline crops first and mirrors in crop_mirror_normalize: the flipped image's
            # window at column c is the mirror of the original's window at column -c.
            left = p.crop_left - pad
            start[j] = (p.crop_top - pad, -left if p.flip else left)
            if p.erase is not None:
                erase_at[j], erase_shape[j] = p.erase[:2], p.erase[2:]
        return (*out, flip, start, erase_at, erase_shape)


def _dali_device(device: torch.device | str | None) -> tuple[bool, int | None]:
    """(use the GPU, device id) for the training device; None means CUDA if available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return False, None
    return True, device.index if device.index is not None else torch.cuda.current_device()


def _build_pipeline(
    source: RankBatches,
    cfg: LoaderConfig,
    height: int,
    width: int,
    batch_size: int,
    gpu: bool,
    device_id: int | None,
):
    workers = cfg.num_workers
    threads = max(1, len(os.sched_getaffinity(0)))
    train = source.transform is not None
    mean = [255.0 * m for m in cfg.augment.mean]
    std = [255.0 * s for s in cfg.augment.std]

    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=cfg.prefetch,
        py_num_workers=max(workers, 1),
        # fork is not allowed once CUDA is initialised in this process
        py_start_method="spawn" if gpu else "fork",
    )
    def pipeline():
        outs = fn.external_source(
            source=source,
            num_outputs=8 if train else 4,
            batch=True,
            batch_info=True,
            parallel=workers > 0,
        )
        jpegs, pids, camids, indices = outs[:4]
        x = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        # Bilinear with antialiasing when shrinking, as PIL's resize.
        x = fn.resize(
            x, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR, antialias=True
        )
        flip = 0
        if train:
            flip, start, erase_at, erase_shape = outs[4:]
            # Zero padding then crop == a window starting at (top - pad, left - pad), zeros
            # outside the image (black in pixel space, before normalising, as BoT); the flip is
            # applied after it by crop_mirror_normalize, one pass less over the pixels.
            x = fn.slice(
                x,
                start=start,
                shape=[height, width],
                axis_names="HW",
                out_of_bounds_policy="pad",
                fill_values=0,
            )
        x = fn.crop_mirror_normalize(
            x, mirror=flip, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std
        )
        if train:
            x = fn.erase(x, anchor=erase_at, shape=erase_shape, axis_names="HW", fill_value=0.0)
        return x, pids, camids, indices

    pipe = pipeline()
    pipe.build()
    return pipe


def _to_torch(dali_out, device: torch.device) -> torch.Tensor:
    t = dali_out.as_tensor()
    dtype = torch.float32 if t.dtype == types.FLOAT else torch.int64
    arr = torch.empty(t.shape(), dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    feed_ndarray(t, arr, cuda_stream=stream)
    return arr


class _DaliLoader:
    def __init__(self, records, cfg, height, width, device, batch_size) -> None:
        self.records, self.cfg = list(records), cfg
        self.height, self.width, self.batch_size = int(height), int(width), int(batch_size)
        self.gpu, self.device_id = _dali_device(device)
        self.device = torch.device("cuda", self.device_id) if self.gpu else torch.device("cpu")

    def _pipeline(self, source: RankBatches):
        return _build_pipeline(
            source, self.cfg, self.height, self.width, self.batch_size, self.gpu, self.device_id
        )

    def _epoch(self, pipe) -> Iterator[dict[str, torch.Tensor]]:
        """Batches until the source stops, then reset the pipeline for its next epoch."""
        cpu = torch.device("cpu")
        while True:
            try:
                outs = pipe.run()
            except StopIteration:
                pipe.reset()
                return
            images = _to_torch(outs[0], self.device)
            labels = [_to_torch(o, cpu) for o in outs[1:]]
            yield {"images": images, **dict(zip(_OUTPUTS[1:], labels, strict=True))}


class DaliTrainLoader(_DaliLoader):
    """Training batches of ``sampler`` decoded and augmented by DALI; see the module docstring."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        sampler: IdentitySampler,
        cfg: LoaderConfig,
        height: int,
        width: int,
        seed: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            records, cfg, height, width, device, sampler.num_identities * sampler.num_instances
        )
        self.sampler, self.seed = sampler, int(seed)
        self.transform = TrainTransform(cfg.augment, height, width)
        self._pipe = None
        self._next: tuple[int, int] | None = None  # (epoch, first) the pipeline continues with

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        s = self.sampler
        epoch, first = s.epoch, s.batches_per_epoch - len(s)
        if len(s) == 0:
            return iter(())
        if self._pipe is None or self._next != (epoch, first):
            self._pipe = None  # release the old pipeline (and its workers) first
            source = RankBatches(
                self.records,
                s,
                self.transform,
                epoch=epoch,
                first=first,
                seed=self.seed,
                batch_size=self.batch_size,
            )
            self._pipe = self._pipeline(source)
        return self._run(self._pipe, epoch)

    def _run(self, pipe, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        self._next = None  # until the epoch ends, the pipeline cannot continue elsewhere
        yield from self._epoch(pipe)
        if pipe is self._pipe:
            self._next = (epoch + 1, 0)


class DaliTestLoader(_DaliLoader):
    """Test batches: records in order, ``test_batch_size`` each (the last may be smaller)."""

    def __init__(self, records, cfg, height, width, device=None) -> None:
        super().__init__(records, cfg, height, width, device, cfg.test_batch_size)

    def __len__(self) -> int:
        return -(-len(self.records) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.records:
            return iter(())
        source = RankBatches(self.records, None, None, batch_size=self.batch_size)
        return self._epoch(self._pipeline(source))


def build_train_loader(
    records: Sequence[ImageRecord],
    batch_sampler: IdentitySampler,
    cfg_loader: LoaderConfig,
    height: int,
    width: int,
    seed: int,
    device: torch.device | str | None = None,
) -> DaliTrainLoader:
    """DALI training loader with the torch loader's arguments, batches and augmentation.

    ``device``: where images are decoded and returned; None means CUDA when available.
    """
    if not isinstance(batch_sampler, IdentitySampler):
        raise TypeError(
            f"the DALI loader needs an IdentitySampler (its plan is recomputed in DALI's "
            f"workers), got {type(batch_sampler).__name__}"
        )
    if batch_sampler.num_records != len(records):
        raise ValueError(
            f"the batch sampler was built over {batch_sampler.num_records} records but the "
            f"loader got {len(records)}; build both from the same training split"
        )
    if cfg_loader.augment.color_jitter:
        raise ConfigError(
            "loader.augment.color_jitter: not implemented by the DALI loader; set "
            "loader.backend to 'torch' (or 'auto', which then picks torch)"
        )
    return DaliTrainLoader(records, batch_sampler, cfg_loader, height, width, seed, device)


def build_test_loader(
    records: Sequence[ImageRecord],
    cfg_loader: LoaderConfig,
    height: int,
    width: int,
    device: torch.device | str | None = None,
) -> DaliTestLoader:
    """DALI test loader: resize and normalise, records in order, last batch included."""
    return DaliTestLoader(records, cfg_loader, height, width, device)
