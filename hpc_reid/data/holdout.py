"""A validation split carved from a data set's training identities (``data.validation``).

Model selection and hyper-parameter searches must never see a test identity, or the numbers they
select on are test numbers. The fine-grained ReID code (Pathak, arXiv 2011.13475) runs its Ax
search on training subsets (``market_sub``, ``mars_subset2``, ...): 10% of the train identities
become the validation identities, and 25% of the remaining train tracklets join the validation
gallery as distractors. :class:`ValidationHoldout` builds such a split from any parsed set
(folder or pack, images or tracklets), after the parser, and reads nothing of the test split:

- **identities**: ``round(fraction x N)`` of the N train identities, drawn at random, leave
  training; at least one must be held out and at least two must remain;
- **query and gallery**: per held-out identity one random camera stays whole in the gallery, and
  each of its other cameras gives one random query record (the rest of that camera goes to the
  gallery). Every query thus has a positive in another camera, which the Market-1501 protocol
  (same identity and camera removed) keeps; on iLIDS-VID or PRID 2011 (one tracklet per camera)
  it is their own protocol with a random direction. An identity seen by one camera only has no
  query; its records are gallery records;
- **one camera** (a train split whose records all share a camera: VehicleID) cannot be
  evaluated across cameras, so it follows VehicleID's own test protocol: per held-out identity
  one random record is its gallery record and the others are queries (an identity with one record
  is gallery only), queries getting camid 0 and gallery records camid 1 so that the cross-camera
  removal keeps every match;
- **distractors**: ``round(distractors x M)`` of the M remaining train records, drawn at random,
  move from training to the gallery (so no record is both trained on and ranked);
- **train**: the rest, relabelled to ``0..N'-1``. Query and gallery keep the source's train
  labels (distinct from the new ones, which is harmless: evaluation only compares query with
  gallery labels).

The draws use ``numpy.random.default_rng(seed)`` in this order: the held-out identities, then per
held-out identity in increasing label order its gallery camera and, camera by camera in increasing
id order, its query; then the distractors. Records keep their source order within each split.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .datasets.base import DatasetError, Record, ReidDataset

# camids of the one-camera rule (VehicleID's own: hpc_reid/data/datasets/vehicleid.py)
ONE_CAMERA_QUERY, ONE_CAMERA_GALLERY = 0, 1


@dataclasses.dataclass(frozen=True)
class HoldoutSplit:
    """Indices into the source's train records of each new split, and the held-out labels."""

    train: list[int]
    query: list[int]
    gallery: list[int]
    held_out: list[int]
    distractors: list[int]
    one_camera: bool


def split_validation(
    train: Sequence[Record], fraction: float, distractors: float, seed: int, where: str = "data"
) -> HoldoutSplit:
    """Draw the validation split of ``train`` (a parsed set's relabelled train records).

    Raises :class:`DatasetError` naming ``where`` when the fraction holds out no identity or
    leaves fewer than two to train on, or when no held-out identity can give a query.
    """
    if not 0.0 < fraction < 1.0 or not 0.0 <= distractors < 1.0:
        raise DatasetError(
            f"{where}: data.validation.fraction={fraction} must lie in (0, 1) and "
            f"data.validation.distractors={distractors} in [0, 1)"
        )
    ids = sorted({r.pid for r in train})
    count = round(fraction * len(ids))
    if count < 1 or len(ids) - count < 2:
        raise DatasetError(
            f"{where}: data.validation.fraction={fraction} of {len(ids)} train identities holds "
            f"out {count} and leaves {len(ids) - count}; at least 1 must be held out and 2 must "
            "train"
        )
    rng = np.random.default_rng(seed)
    held_out = sorted(int(ids[i]) for i in rng.choice(len(ids), size=count, replace=False))
    held = set(held_out)
    records_of: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(train):
        if r.pid in held:
            records_of[r.pid].append(i)
    one_camera = len({r.camid for r in train}) == 1
    query: list[int] = []
    gallery: list[int] = []
    for pid in held_out:
        own = records_of[pid]
        if one_camera:
            if len(own) > 1:
                pick = own[int(rng.integers(len(own)))]
                gallery.append(pick)
                query.extend(i for i in own if i != pick)
            else:
                gallery.extend(own)
            continue
        cams = sorted({train[i].camid for i in own})
        if len(cams) < 2:
            gallery.extend(own)
            continue
        whole = cams[int(rng.integers(len(cams)))]
        for cam in cams:
            in_cam = [i for i in own if train[i].camid == cam]
            if cam == whole:
                gallery.extend(in_cam)
                continue
            pick = in_cam[int(rng.integers(len(in_cam)))]
            query.append(pick)
            gallery.extend(i for i in in_cam if i != pick)
    if not query:
        need = "two records" if one_camera else "records in two cameras"
        raise DatasetError(
            f"{where}: none of the {count} held-out identities has {need}, so the validation "
            "split has no query; raise data.validation.fraction or change its seed"
        )
    rest = [i for i, r in enumerate(train) if r.pid not in held]
    drawn = round(distractors * len(rest))
    moved = sorted(int(rest[i]) for i in rng.choice(len(rest), size=drawn, replace=False))
    taken = set(moved)
    kept = [i for i in rest if i not in taken]
    if len({train[i].pid for i in kept}) < 2:
        raise DatasetError(
            f"{where}: data.validation.distractors={distractors} leaves fewer than 2 train "
            "identities"
        )
    return HoldoutSplit(
        train=kept,
        query=sorted(query),
        gallery=sorted(gallery + moved),
        held_out=held_out,
        distractors=moved,
        one_camera=one_camera,
    )


class ValidationHoldout(ReidDataset):
    """``source`` with its query and gallery replaced by a validation split of its train
    identities and its train split by the rest (module docstring). ``source`` is kept."""

    def __init__(self, source: ReidDataset, fraction: float, distractors: float, seed: int):
        self.source = source
        self.root = source.root
        self.name = f"{source.name}:validation"
        where = f"{source.name} under {source.root}"
        split = split_validation(source.train, fraction, distractors, seed, where)
        self.split = split
        self.settings = (fraction, distractors, seed)
        records = source.train
        query = [records[i] for i in split.query]
        gallery = [records[i] for i in split.gallery]
        if split.one_camera:
            query = [dataclasses.replace(r, camid=ONE_CAMERA_QUERY) for r in query]
            gallery = [dataclasses.replace(r, camid=ONE_CAMERA_GALLERY) for r in gallery]
        self._finish([records[i] for i in split.train], query, gallery, source.skipped)

    def statistics(self) -> str:
        fraction, distractors, seed = self.settings
        s = self.split
        note = (
            f"  validation holdout (seed {seed}): {len(s.held_out)} of "
            f"{self.source.num_train_pids} train ids (fraction {fraction}) as query/gallery, "
            f"{len(s.distractors)} remaining train "
            f"{'tracklets' if self.is_video else 'images'} (distractors {distractors}) in the "
            "gallery; the test split is not used"
        )
        if s.one_camera:
            note += "\n  one train camera: one gallery record per id, the rest queries (VehicleID)"
        return f"{super().statistics()}\n{note}"
