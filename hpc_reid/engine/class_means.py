"""Per-class means of model outputs over the training set, under the current model, on 1..N ranks.

Some methods keep state computed from the model over the whole training set between steps: the
anchor loss (Chen et al., "Cluster-level Feature Alignment for Person Re-identification", arXiv
2008.06810; hpc_reid/methods/anchor) pulls every feature towards its class anchor, the mean feature
of the class's training images, recomputed at the start of every stage-2 epoch. This module is
that computation, for any output key a term asks for (:meth:`hpc_reid.losses.ReidLoss.refresh`).

The model runs in eval mode (running BatchNorm statistics, no dropout) over the un-augmented
training images (the test transform: resize and normalise) through the configured loader backend
(DALI or torch; from HDF5 packs like any other loader), optionally averaged with the horizontal
flip, as the reference code extracts its anchors. Each rank takes its contiguous shard of the
records and sums its features per class in float64; one all-reduce of the sums and one of the
counts give every rank the same means, equal to one process's up to float64 summation order, and
far below float32's resolution.

Tracklets (video sets): a training sample is a tracklet, so a class's mean is the mean of its
tracklets' features, each the mean over its dense test clips (as evaluation computes a tracklet's
feature; :class:`~hpc_reid.evaluation.features.TrackletMeans`), so that a long tracklet weighs as
much as a short one. Each rank's shard holds whole tracklets, so no tracklet is split over ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from hpc_reid.config import Config
from hpc_reid.data.datasets.base import Record
from hpc_reid.engine.evaluate import shard_loader
from hpc_reid.evaluation.features import TrackletMeans
from hpc_reid.models import inferring

#: what a term asks for: (model output key, average with the horizontal flip)
Request = tuple[str, bool]


def class_sums(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    requests: Sequence[Request],
    num_classes: int,
) -> tuple[dict[Request, torch.Tensor], torch.Tensor]:
    """Per-class float64 sums (C, D) of each requested output over ``loader``'s images, and the
    per-class image counts (C,) float64; the model in eval mode for the pass (its mode restored).
    A class index outside [0, num_classes) is an error naming it. A loader of dense clips
    (batches (N, T, C, H, W) with each clip's tracklet index) sums its tracklets' features (the
    mean of each tracklet's clips') and counts tracklets."""
    sums: dict[Request, torch.Tensor] = {}
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    tracklets: dict[Request, TrackletMeans] = {}
    keys = sorted({key for key, _ in requests})
    flips = {key for key, flip in requests if flip}
    with inferring(model):
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True)
            pids = torch.as_tensor(batch["pids"], device=device).long().reshape(-1)
            if len(pids) and (int(pids.min()) < 0 or int(pids.max()) >= num_classes):
                bad = pids[(pids < 0) | (pids >= num_classes)][0]
                raise ValueError(
                    f"training label {int(bad)} outside the {num_classes} classes: the "
                    "records are not a training split relabelled 0..C-1"
                )
            plain = model(images)
            flipped = model(torch.flip(images, dims=[-1])) if flips else None
            for key in keys:
                if key not in plain:
                    raise KeyError(
                        f"class means of the model output {key!r}: the model in eval mode "
                        f"returns {sorted(plain)}"
                    )
            for key, flip in requests:
                f = plain[key].double().reshape(len(images), -1)
                if flip:  # the mean of the image's and its flip's feature
                    f = (f + flipped[key].double().reshape(len(images), -1)) * 0.5
                if images.dim() == 5:  # clips: first averaged per tracklet (below)
                    means = tracklets.setdefault((key, flip), TrackletMeans())
                    means.add(batch["indices"], f, pids.cpu(), pids.cpu())
                    continue
                if (key, flip) not in sums:
                    sums[key, flip] = torch.zeros(
                        num_classes, f.shape[1], dtype=torch.float64, device=device
                    )
                sums[key, flip].index_add_(0, pids, f)
            if images.dim() == 4:
                counts.index_add_(
                    0, pids, torch.ones(len(pids), dtype=torch.float64, device=device)
                )
    for request, means in tracklets.items():  # each tracklet's feature, then its class's sum
        rows, tracklet_pids, _ = means.means(torch.float64)
        labels = torch.from_numpy(tracklet_pids).to(device)
        sums[request] = rows.new_zeros(num_classes, rows.shape[1]).index_add_(0, labels, rows)
        counts = torch.zeros_like(counts).index_add_(0, labels, torch.ones_like(rows[:, 0]))
    return sums, counts


def class_means(
    model: torch.nn.Module,
    records: Sequence[Record],
    config: Config,
    device: torch.device,
    requests: Sequence[Request],
    num_classes: int,
) -> dict[Request, torch.Tensor]:
    """Each requested output's per-class mean (C, D) float32 on ``device`` over ``records`` (a
    training split, labels 0..C-1; images, or tracklets: the mean of a class's tracklets'
    dense-clip means), the same on every rank: each rank extracts its contiguous shard, then one
    all-reduce of the float64 sums (all requests in one buffer) and the counts.
    A class without any image is an error naming it (its mean would be 0/0)."""
    requests = sorted(set(requests))
    world = dist.get_world_size() if dist.is_initialized() else 1
    sums: dict[Request, torch.Tensor] = {}
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    loader = shard_loader(records, config, device)  # this rank's contiguous shard, as evaluation's
    if loader is not None:
        sums, counts = class_sums(model, loader, device, requests, num_classes)
    if world > 1:
        # A rank with an empty shard learns the widths from the others: one small all-reduce.
        widths = torch.tensor(
            [sums[r].shape[1] if r in sums else 0 for r in requests], device=device
        )
        dist.all_reduce(widths, op=dist.ReduceOp.MAX)
        flat = [
            sums.get(r, torch.zeros(num_classes, int(w), dtype=torch.float64, device=device))
            for r, w in zip(requests, widths.tolist(), strict=True)
        ]
        buffer = torch.cat([*(s.reshape(-1) for s in flat), counts])
        dist.all_reduce(buffer)
        pieces = buffer.split([*(s.numel() for s in flat), num_classes])
        sums = {r: p.reshape(num_classes, -1) for r, p in zip(requests, pieces[:-1], strict=True)}
        counts = pieces[-1]
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise ValueError(
            f"class means over {len(records)} training records: {len(empty)} of {num_classes} "
            f"classes have no image ({shown})"
        )
    return {r: (sums[r] / counts[:, None]).float() for r in requests}
