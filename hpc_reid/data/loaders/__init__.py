"""Training and test loaders: the torch (PIL) backend, and the choice of backend.

Both backends implement the augmentation of :mod:`hpc_reid.data.transforms` with the same random
decisions per sample; DALI decodes and augments on the GPU, the torch backend on CPU workers.
Tracklets (video sets) pass ``video``, the run's ``data.video``: training batches of
(B, T, C, H, W), test batches of dense clips (:mod:`.tracklets`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence

import torch
from torch.utils.data import Sampler

from hpc_reid.config import ConfigError, LoaderConfig, VideoConfig
from hpc_reid.data.datasets.base import Record

from .torch_loader import (
    CorruptImageError,
    ReidImageSet,
    ReidTrackletSet,
    TaggedBatchSampler,
    build_test_loader,
    build_train_loader,
    collate_reid,
    load_rgb,
)
from .tracklets import ClipBatches, clip_plan, frames_channels_last, tracklet_sample

BACKENDS = ("auto", "dali", "torch")


def resolve_backend(name: str) -> str:
    """The loader backend to use for ``loader.backend = name``: "dali" or "torch".

    "auto" picks DALI when ``nvidia.dali`` imports, else torch; "dali" without DALI installed is
    an error rather than a silent fallback.
    """
    if name not in BACKENDS:
        raise ConfigError(f"loader.backend: unknown backend {name!r}; expected one of {BACKENDS}")
    if name == "torch":
        return "torch"
    try:
        importlib.import_module("nvidia.dali")
    except ImportError as e:
        if name == "dali":
            raise ConfigError(
                f"loader.backend: 'dali' needs NVIDIA DALI, which does not import ({e}); install "
                "it with `pip install hpc-reid[dali]` (nvidia-dali-cuda130; nvidia-dali-cuda120 "
                "on CUDA 12), or set loader.backend to 'torch' or 'auto'"
            ) from e
        return "torch"
    return "dali"


def build_backend_train_loader(
    records: Sequence[Record],
    batch_sampler: Sampler[list[int]],
    cfg_loader: LoaderConfig,
    height: int,
    width: int,
    seed: int,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    video: VideoConfig | None = None,
) -> Iterable[dict[str, torch.Tensor]]:
    """The training loader of ``loader.backend``, with :func:`build_train_loader`'s arguments.

    "auto" picks DALI when it imports, else the torch loader. ``device`` is the training
    device: DALI decodes there (None: CUDA when available); the torch loader ignores it.
    ``channels_last``: DALI returns images in that memory format (the torch loader's stay
    contiguous; the trainer converts them, :func:`frames_channels_last`). ``video``: the run's
    ``data.video``, needed for tracklet records (batches of (B, T, C, H, W)), ignored for images.
    """
    backend = resolve_backend(cfg_loader.backend)
    if backend == "torch":
        return build_train_loader(records, batch_sampler, cfg_loader, height, width, seed, video)
    from . import dali_loader  # imports nvidia.dali: only when chosen

    return dali_loader.build_train_loader(
        records, batch_sampler, cfg_loader, height, width, seed, device, channels_last, video
    )


def build_backend_test_loader(
    records: Sequence[Record],
    cfg_loader: LoaderConfig,
    height: int,
    width: int,
    device: torch.device | str | None = None,
    video: VideoConfig | None = None,
) -> Iterable[dict[str, torch.Tensor]]:
    """The test loader of ``loader.backend`` (records in order, ``test_batch_size`` each, resize
    and normalise): DALI's decodes on ``device`` (None: CUDA when available). Tracklet records
    need ``video``: batches of dense clips, dict(images (N, T, C, H, W), pids, camids, indices
    (N,) each clip's tracklet index), ``test_batch_size // T`` clips each (:mod:`.tracklets`)."""
    if resolve_backend(cfg_loader.backend) == "torch":
        return build_test_loader(records, cfg_loader, height, width, video)
    from . import dali_loader  # imports nvidia.dali: only when chosen

    return dali_loader.build_test_loader(records, cfg_loader, height, width, device, video)


__all__ = [
    "BACKENDS",
    "ClipBatches",
    "CorruptImageError",
    "ReidImageSet",
    "ReidTrackletSet",
    "TaggedBatchSampler",
    "build_backend_test_loader",
    "build_backend_train_loader",
    "build_test_loader",
    "build_train_loader",
    "clip_plan",
    "collate_reid",
    "frames_channels_last",
    "load_rgb",
    "resolve_backend",
    "tracklet_sample",
]
