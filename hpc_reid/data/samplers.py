"""Identity-balanced P x K batches, sharded across ranks, deterministic and resumable.

Batch-hard triplet training (Hermans, Beyer and Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", arXiv:1703.07737, 2017, section 2) needs batches of P identities with K images
each, so that every anchor has K - 1 positives and (P - 1) K negatives to mine from.

One epoch is a pure function of (records, seed, epoch, P x world size, K, passes): every rank
computes the same global plan and takes its part, so ranks never communicate and all yield the same
number of batches (no DDP hang at the end of an epoch). A pass over the identities shuffles them,
cuts them into global batches of P x world identities and drops the last incomplete global batch,
so it has ``#identities // (P x world)`` batches and every identity appears at most once in it. An
epoch is ``passes`` such passes (default 1), each with its own shuffle and image draws; ``passes``
of about #images / (#identities x K) makes an epoch as long as the BoT / torchreid sampler's, which
cuts every identity's images into chunks of K. Rank r takes identities ``[r P, (r + 1) P)`` of each
global batch, so all K images of an identity sit on one rank and local hard mining sees every
positive.

Plain random batches (:class:`RandomSampler`, ``sampler.kind: random``) are the other kind: the
cluster-level anchor loss's stage 2 (Chen et al., "Enhancing Person Re-identification via
Cluster-level Feature Alignment", arXiv:2008.06810; its released scripts) fine-tunes with batches
of 64 images drawn without identity balancing. An epoch is one global permutation of the images
cut into global batches of B x world, the last incomplete one dropped, rank r taking images
``[r B, (r + 1) B)`` of each: the same contract (pure function of the seed and epoch, equal rank
lengths, resumable, the same plan at any world size with the same global batch).

:func:`build_sampler` builds the kind ``sampler.kind`` names; :func:`rank_batch_size` is its batch
per rank, for callers that need it before a sampler exists (DeepSpeed's micro-batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from hpc_reid.config import ConfigError, SamplerConfig
from hpc_reid.data.datasets.base import are_tracklets


class PlannedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """What both samplers share: an epoch is a plan, a (batches, global batch) array of dataset
    indices computed from (seed, epoch) alone, of which rank r takes columns ``[r B, (r + 1) B)``
    (B: :attr:`batch_size`, this rank's images per batch).

    Position: ``set_epoch(e)`` starts epoch e at batch 0; ``load_state_dict`` starts at the batch
    after the last one trained. ``__iter__`` and ``__len__`` run from that start position, which
    only those two methods change. :meth:`rank_batches` replans any epoch without moving it: the
    DALI loader's workers ask for their batches that way.

    A subclass sets ``num_records`` and implements ``batch_size``, ``batches_per_epoch``,
    ``describe``, ``_compute_plan``, ``state_dict`` and ``load_state_dict``.
    """

    #: ``sampler.kind``; a saved state names it, so a resume refuses another kind's state.
    kind = ""
    #: what a dataset index is, for :meth:`describe`: ``from_config`` sets "tracklets" for
    #: tracklet records.
    unit = "images"

    def __init__(self, *, rank: int, world_size: int, seed: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.epoch, self._start = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def batch_size(self) -> int:
        """Images per batch of this rank."""
        raise NotImplementedError

    @property
    def batches_per_epoch(self) -> int:
        """Full epoch length in batches, the same on every rank."""
        raise NotImplementedError

    def describe(self) -> str:
        """This rank's batch in words, for the run log ("16 ids x 4 images")."""
        raise NotImplementedError

    def _counting(self, records: Sequence[Any]) -> PlannedBatchSampler:
        """This sampler, describing its indices as tracklets if ``records`` are tracklets."""
        self.unit = "tracklets" if are_tracklets(records) else "images"
        return self

    def set_epoch(self, epoch: int) -> None:
        """Plan epoch ``epoch`` and start it at batch 0."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self._start = int(epoch), 0

    def __len__(self) -> int:
        return self.batches_per_epoch - self._start

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._rank_part(self.epoch)[self._start :].tolist())

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of the whole of ``epoch``, from batch 0, whatever the position."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._rank_part(epoch).tolist()

    def global_plan(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch``: world x B indices each, rank-major."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._plan(epoch).tolist()

    def _rank_part(self, epoch: int) -> np.ndarray:
        width = self.batch_size
        return self._plan(epoch)[:, self.rank * width : (self.rank + 1) * width]

    def _plan(self, epoch: int) -> np.ndarray:
        """(batches, B x world) dataset indices of ``epoch``; the last epoch is cached."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._compute_plan(epoch))
        return self._cache[1]

    def _compute_plan(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def _check_consumed(self, batches_consumed: int) -> None:
        if not 0 <= batches_consumed <= self.batches_per_epoch:
            raise ValueError(
                f"batches_consumed must be in [0, {self.batches_per_epoch}] (batches per epoch), "
                f"got {batches_consumed}"
            )

    def _resume(self, state: dict[str, Any], checks: list[tuple[str, str, str]]) -> None:
        """Continue from ``state`` after checking its kind and that every ``(key, text, reason)``
        of ``checks`` equals this sampler's attribute ``key`` (text formats the saved value and
        the current one); an error names each key that differs with both values."""
        saved_kind = state.get("kind", "identity")  # identity states predate the key
        if saved_kind != self.kind:
            raise ValueError(
                f"cannot resume the {self.kind} sampler from a {saved_kind} sampler's state: "
                f"sampler.kind was {saved_kind!r} at save time and is {self.kind!r} now; resume "
                "with the same sampler.kind, or start a new run (model.init_from takes the "
                "weights only)"
            )
        missing = [
            k for k in ("epoch", "batches_consumed", *(c[0] for c in checks)) if k not in state
        ]
        if missing:
            raise ValueError(f"sampler state lacks key(s) {missing}; got keys {sorted(state)}")
        errors = [
            f"{key!r}: {text.format(state[key], getattr(self, key))}: {reason}"
            for key, text, reason in checks
            if state[key] != getattr(self, key)
        ]
        if errors:
            raise ValueError(f"cannot resume the {self.kind} sampler: " + "; ".join(errors))
        consumed = state["batches_consumed"]
        if not 0 <= consumed <= self.batches_per_epoch:
            raise ValueError(
                f"'batches_consumed': {consumed} at save time, but an epoch has "
                f"{self.batches_per_epoch} batches now: the training split differs"
            )
        self.set_epoch(state["epoch"])
        self._start = int(consumed)


_DIFFERS = "the sampling plan differs"
_SAME_SPLIT = (
    "num_records",
    "{} training records at save time, {} now",
    f"{_DIFFERS}; resume on the same training split",
)


class IdentitySampler(PlannedBatchSampler):
    """Batch sampler yielding this rank's batches of P identities x K images (dataset indices).

    Each batch holds ``P * K`` indices: K consecutive indices per identity, P distinct identities.
    The K images of an identity are drawn round-robin over its cameras in random order (without
    replacement within a camera), so they cover ``min(K, #cameras)`` cameras; an identity with
    fewer than K images contributes all of them, then uniform draws with replacement (or is an
    error at construction when ``allow_replacement`` is false).

    The plan depends on P only through the global batch ``P * world_size``, so a run can resume
    at another world size with the same global batch (position: :class:`PlannedBatchSampler`).
    """

    kind = "identity"

    @classmethod
    def from_config(
        cls, records, cfg: SamplerConfig, seed: int, rank: int = 0, world_size: int = 1
    ) -> IdentitySampler:
        """The sampler a run's ``sampler`` section (``cfg``) asks for over ``records`` (objects with
        ``pid`` and ``camid``: a data set's train split), for one rank of ``world_size``."""
        sampler = cls(
            [r.pid for r in records],
            [r.camid for r in records],
            cfg.num_identities,
            cfg.num_instances,
            rank=rank,
            world_size=world_size,
            seed=seed,
            allow_replacement=cfg.allow_replacement,
            passes=cfg.passes_per_epoch,
        )
        return sampler._counting(records)

    def __init__(
        self,
        pids: Sequence[int],
        camids: Sequence[int],
        num_identities: int,
        num_instances: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        allow_replacement: bool = True,
        passes: int = 1,
    ) -> None:
        pid_arr = np.asarray(pids, dtype=np.int64)
        cam_arr = np.asarray(camids, dtype=np.int64)
        if pid_arr.ndim != 1 or cam_arr.shape != pid_arr.shape:
            raise ValueError(
                f"pids and camids must be two 1-D sequences of the same length, got shapes "
                f"{pid_arr.shape} and {cam_arr.shape}"
            )
        if num_identities < 1 or num_instances < 1:
            raise ValueError(
                f"num_identities (P) and num_instances (K) must be >= 1, got P={num_identities}, "
                f"K={num_instances}"
            )
        super().__init__(rank=rank, world_size=world_size, seed=seed)
        if passes < 1:
            raise ValueError(f"passes (over the identities per epoch) must be >= 1, got {passes}")
        self.num_identities, self.num_instances = int(num_identities), int(num_instances)
        self.allow_replacement = bool(allow_replacement)
        self.global_identities = self.num_identities * self.world_size
        self.num_records = len(pid_arr)
        self.passes = int(passes)

        self._pid_values, pid_of = np.unique(pid_arr, return_inverse=True)
        _, cam_of = np.unique(cam_arr, return_inverse=True)
        num_ids = len(self._pid_values)
        if num_ids < self.global_identities:
            raise ValueError(
                f"{num_ids} identities cannot fill one global batch of P={self.num_identities} "
                f"identities x world size {self.world_size} = {self.global_identities}; lower P "
                "or use fewer ranks"
            )
        self._pid_count = np.bincount(pid_of, minlength=num_ids)
        small = np.flatnonzero(self._pid_count < self.num_instances)
        if small.size and not self.allow_replacement:
            p = small[0]
            others = f" (and {small.size - 1} more identities)" if small.size > 1 else ""
            raise ValueError(
                f"identity {self._pid_values[p]} has {self._pid_count[p]} images, fewer than "
                f"K={self.num_instances}{others}, and allow_replacement is off; allow replacement "
                "or lower K"
            )

        # Records sorted by (identity, camera, index): per-identity and per-(identity, camera)
        # groups become contiguous runs, so each epoch's draw is a few vectorised sorts.
        self._order = np.lexsort((cam_of, pid_of))
        pid_sorted, cam_sorted = pid_of[self._order], cam_of[self._order]
        new_group = np.ones(self.num_records, dtype=bool)
        new_group[1:] = (pid_sorted[1:] != pid_sorted[:-1]) | (cam_sorted[1:] != cam_sorted[:-1])
        self._pid_sorted = pid_sorted
        self._group_of = np.cumsum(new_group) - 1
        self._group_start = np.flatnonzero(new_group)
        self._group_pid = pid_sorted[self._group_start]
        self._pid_start = np.concatenate(([0], np.cumsum(self._pid_count)[:-1]))
        cams_per_pid = np.bincount(self._group_pid, minlength=num_ids)
        self._pid_first_group = np.concatenate(([0], np.cumsum(cams_per_pid)[:-1]))

    @property
    def batch_size(self) -> int:
        """Images per rank batch: P x K."""
        return self.num_identities * self.num_instances

    def describe(self) -> str:
        return f"{self.num_identities} ids x {self.num_instances} {self.unit}"

    @property
    def batches_per_epoch(self) -> int:
        """Full epoch length in batches: ``passes x (#identities // (P x world size))``, on every
        rank."""
        return self.passes * self._batches_per_pass

    @property
    def _batches_per_pass(self) -> int:
        return len(self._pid_values) // self.global_identities

    def state_dict(self, batches_consumed: int) -> dict[str, int]:
        """Position after ``batches_consumed`` trained batches of the current epoch.

        The trainer passes the count because a prefetching loader runs ahead of training.
        """
        self._check_consumed(batches_consumed)
        return {
            "epoch": self.epoch,
            "batches_consumed": int(batches_consumed),
            "seed": self.seed,
            "global_identities": self.global_identities,
            "num_instances": self.num_instances,
            "num_records": self.num_records,
            "passes": self.passes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next ``__iter__`` yields the next untrained batch."""
        checks = [
            ("seed", "seed {} at save time, {} now", f"{_DIFFERS}; resume with the same seed"),
            (
                "global_identities",
                "global batch of {} identities at save time, {} now",
                f"{_DIFFERS}; keep P x world size constant to resume at another world size",
            ),
            ("num_instances", "K={} images per identity at save time, {} now", _DIFFERS),
            _SAME_SPLIT,
            ("passes", "{} passes per epoch at save time, {} now", _DIFFERS),
        ]
        self._resume({"passes": 1, **state}, checks)  # states written before passes existed

    def _compute_plan(self, epoch: int) -> np.ndarray:
        """(batches, P x world x K) dataset indices of ``epoch``."""
        parts = []
        for p in range(self.passes):
            # pass 0 keeps the single-pass plan; further passes get streams of their own
            rng = np.random.default_rng([self.seed, epoch] if p == 0 else [self.seed, epoch, p])
            ids = rng.permutation(len(self._pid_values))
            draws = self._draw(rng)
            used = self._batches_per_pass * self.global_identities
            parts.append(draws[ids[:used]].reshape(self._batches_per_pass, -1))
        return np.concatenate(parts)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """(identities, K) dataset indices: K images per identity, cameras round-robin.

        Every identity is drawn whatever P and world size are, so the draws depend only on
        (records, seed, epoch, K) and the global plan only adds the cut into global batches.
        """
        n, k = self.num_records, self.num_instances
        # Round of each image within its camera: its rank in a random order of that camera.
        by_camera = np.lexsort((rng.random(n), self._group_of))
        rounds = np.empty(n, dtype=np.int64)
        rounds[by_camera] = np.arange(n) - self._group_start[self._group_of[by_camera]]
        # Random order of each identity's cameras.
        groups = len(self._group_pid)
        by_pid = np.lexsort((rng.random(groups), self._group_pid))
        cam_rank = np.empty(groups, dtype=np.int64)
        cam_rank[by_pid] = np.arange(groups) - self._pid_first_group[self._group_pid[by_pid]]
        # Round-robin: round 0 of every camera (in camera order), then round 1, ...; the first
        # K of an identity then cover min(K, #cameras) cameras, without repeats.
        robin = np.lexsort((cam_rank[self._group_of], rounds, self._pid_sorted))
        slot = np.broadcast_to(np.arange(k), (len(self._pid_values), k))
        count = self._pid_count[:, None]
        extra = (rng.random(slot.shape) * count).astype(np.int64)
        source = np.where(slot < count, slot, extra)
        return self._order[robin[self._pid_start[:, None] + source]]


class RandomSampler(PlannedBatchSampler):
    """Batch sampler yielding this rank's batches of B images drawn without identity balancing.

    An epoch is one permutation of all images cut into global batches of B x world size, the last
    incomplete one dropped, so every image appears at most once per epoch and every rank yields
    ``#images // (B x world size)`` batches; rank r takes images ``[r B, (r + 1) B)`` of each
    global batch. The permutation depends only on (#images, seed, epoch), so a run can resume at
    another world size with the same global batch.
    """

    kind = "random"

    @classmethod
    def from_config(
        cls, records, cfg: SamplerConfig, seed: int, rank: int = 0, world_size: int = 1
    ) -> RandomSampler:
        """The sampler a run's ``sampler`` section (``cfg``) asks for over ``records`` (a data
        set's train split: only their number matters), for one rank of ``world_size``."""
        sampler = cls(
            len(records), rank_batch_size(cfg), rank=rank, world_size=world_size, seed=seed
        )
        return sampler._counting(records)

    def __init__(
        self,
        num_records: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(
                f"batch_size (B, images per rank batch) must be >= 1, got {batch_size}"
            )
        super().__init__(rank=rank, world_size=world_size, seed=seed)
        self.num_records, self._batch_size = int(num_records), int(batch_size)
        self.global_batch = self._batch_size * self.world_size
        if self.num_records < self.global_batch:
            raise ValueError(
                f"{self.num_records} training images cannot fill one global batch of "
                f"B={self._batch_size} images x world size {self.world_size} = "
                f"{self.global_batch}; lower sampler.batch_size or use fewer ranks"
            )

    @property
    def batch_size(self) -> int:
        """Images per rank batch: B."""
        return self._batch_size

    def describe(self) -> str:
        return f"{self._batch_size} random {self.unit}"

    @property
    def batches_per_epoch(self) -> int:
        """Full epoch length in batches: ``#images // (B x world size)``, on every rank."""
        return self.num_records // self.global_batch

    def state_dict(self, batches_consumed: int) -> dict[str, Any]:
        """Position after ``batches_consumed`` trained batches of the current epoch."""
        self._check_consumed(batches_consumed)
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "batches_consumed": int(batches_consumed),
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_records": self.num_records,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next ``__iter__`` yields the next untrained batch."""
        checks = [
            ("seed", "seed {} at save time, {} now", f"{_DIFFERS}; resume with the same seed"),
            (
                "global_batch",
                "global batch of {} images at save time, {} now",
                f"{_DIFFERS}; keep B x world size constant to resume at another world size",
            ),
            _SAME_SPLIT,
        ]
        self._resume(state, checks)

    def _compute_plan(self, epoch: int) -> np.ndarray:
        """(batches, B x world) dataset indices of ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        used = self.batches_per_epoch * self.global_batch
        return rng.permutation(self.num_records)[:used].reshape(self.batches_per_epoch, -1)


def rank_batch_size(cfg: SamplerConfig) -> int:
    """Images per rank batch of the ``sampler`` section ``cfg``: P x K for ``kind: identity``;
    ``batch_size`` for ``kind: random`` (P x K when unset, the same batch as stage 1)."""
    pk = cfg.num_identities * cfg.num_instances
    if cfg.kind == "random":
        return cfg.batch_size or pk
    if cfg.batch_size is not None and cfg.batch_size != pk:
        # identity batches are P x K by construction: a different batch_size would be ignored
        raise ConfigError(
            f"sampler.batch_size={cfg.batch_size} applies to sampler.kind=random; the identity "
            f"sampler's batch is sampler.num_identities x sampler.num_instances = "
            f"{cfg.num_identities} x {cfg.num_instances} = {pk}: remove sampler.batch_size or set "
            "sampler.kind=random"
        )
    return pk


SAMPLERS: dict[str, type[PlannedBatchSampler]] = {
    IdentitySampler.kind: IdentitySampler,
    RandomSampler.kind: RandomSampler,
}


def build_sampler(
    records, cfg: SamplerConfig, seed: int, rank: int = 0, world_size: int = 1
) -> IdentitySampler | RandomSampler:
    """The batch sampler ``sampler.kind`` names over ``records`` (a data set's train split), for
    one rank of ``world_size``."""
    if cfg.kind not in SAMPLERS:
        raise ConfigError(
            f"sampler.kind: unknown kind {cfg.kind!r}; expected one of {list(SAMPLERS)}"
        )
    rank_batch_size(cfg)  # refuses a batch_size the identity sampler would ignore
    return SAMPLERS[cfg.kind].from_config(records, cfg, seed, rank, world_size)
