"""Batch fields: per-sample targets beyond images, pids and camids, by name.

Both training loaders (torch and DALI) yield each batch's dataset ``indices`` with the same
semantics (the sampler's indices, in batch order), so a field is a function of the training records
and those indices, computed in the training process after the loader: its values cannot differ
between loaders, worker counts or ranks. A loss term that reads fields declares them
(:func:`hpc_reid.losses.register_loss` ``batch_fields=``); the trainer adds exactly the fields the
active terms need to the batch they receive (``batch[name]``, on the training device). Built in:
``frames`` (the record's frame number, -1 where the data set has none: st-ReID's spatial-temporal
scoring; -1 for a tracklet, whose record holds frame paths but no frame numbers). On a tracklet
set a field has one value per tracklet: ``indices`` are the batch's tracklets. A method whose
target is heavier than a lookup (SAN's texture image) registers a field that loads it from the
record's path; a field that also needs the run's settings (where SAN's textures are, their size)
is registered ``configured=True`` and called as
``fn(config, records, indices)`` with the run's :class:`~hpc_reid.config.Config`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hpc_reid.data.datasets.base import ImageRecord, Record, TrackletRecord

#: ``fn(records, indices) -> tensor`` whose first dimension is ``len(indices)``
BatchField = Callable[[Sequence[ImageRecord], np.ndarray], torch.Tensor]
_FIELDS: dict[str, Callable[..., torch.Tensor]] = {}
_CONFIGURED: set[str] = set()  # fields called as fn(config, records, indices)


def register_batch_field(name: str, *, configured: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn(records, indices) -> (len(indices), ...) tensor`` as batch field ``name``;
    with ``configured``, ``fn(config, records, indices)`` (the run's config first)."""

    def add(fn: Callable) -> Callable:
        if name in _FIELDS or name in ("images", "pids", "camids", "indices"):
            raise ValueError(f"batch field {name!r} is already defined")
        _FIELDS[name] = fn
        if configured:
            _CONFIGURED.add(name)
        return fn

    return add


def available_batch_fields() -> list[str]:
    return sorted(_FIELDS)


def batch_fields(
    names: Sequence[str],
    records: Sequence[ImageRecord],
    indices: torch.Tensor,
    device: torch.device | str = "cpu",
    config: Any = None,
) -> dict[str, torch.Tensor]:
    """The fields ``names`` of the samples at dataset ``indices`` (a loader batch's), on
    ``device``; ``config``: the run's, for the fields registered ``configured``."""
    unknown = sorted(set(names) - set(_FIELDS))
    if unknown:
        raise KeyError(f"unknown batch field(s) {unknown}; registered: {available_batch_fields()}")
    idx = indices.detach().cpu().numpy().astype(np.int64)
    out = {}
    for name in names:
        if name not in _CONFIGURED:
            value = _FIELDS[name](records, idx)
        elif config is None:
            raise ValueError(f"batch field {name!r} needs the run's config (config=)")
        else:
            value = _FIELDS[name](config, records, idx)
        if value.shape[:1] != (len(idx),):
            raise ValueError(
                f"batch field {name!r} gave shape {tuple(value.shape)} for {len(idx)} samples"
            )
        out[name] = value.to(device, non_blocking=True)
    return out


def with_fields(
    batch: Mapping[str, torch.Tensor],
    names: Sequence[str],
    records: Sequence[ImageRecord],
    device: torch.device | str,
    config: Any = None,
) -> Mapping[str, torch.Tensor]:
    """``batch`` plus the fields ``names``; ``batch`` itself when ``names`` is empty (every step
    of a run whose terms read none: nothing computed or copied)."""
    if not names:
        return batch
    return {**batch, **batch_fields(names, records, batch["indices"], device, config)}


@register_batch_field("frames")
def _frames(records: Sequence[Record], indices: np.ndarray) -> torch.Tensor:
    # A tracklet has no frame number of its own (its record keeps only the frames' paths, and
    # their numbering is each data set's): -1, "unknown", as for an image set without them.
    picked = [records[i] for i in indices]
    frames = [None if isinstance(r, TrackletRecord) else r.frame for r in picked]
    return torch.tensor([-1 if f is None else int(f) for f in frames], dtype=torch.int64)
