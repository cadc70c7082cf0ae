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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


class IdentitySampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding this rank's batches of P identities x K images (dataset indices).

    Each batch holds ``P * K`` indices: K consecutive indices per identity, P distinct identities.
    The K images of an identity are drawn round-robin over its cameras in random order (without
    replacement within a camera), so they cover ``min(K, #cameras)`` cameras; an identity with
    fewer than K images contributes all of them, then uniform draws with replacement (or is an
    error at construction when ``allow_replacement`` is false).

    Position: ``set_epoch(e)`` starts epoch e at batch 0; ``load_state_dict`` starts at the batch
    after the last one trained. ``__iter__`` and ``__len__`` run from that start position, which
    only those two methods change. The plan depends on P only through the global batch
    ``P * world_size``, so a run can resume at another world size with the same global batch.
    """

    @classmethod
    def from_config(
        cls, records, cfg, seed: int, rank: int = 0, world_size: int = 1
    ) -> IdentitySampler:
        """The sampler a run's ``sampler`` section (``cfg``) asks for over ``records`` (objects with
        ``pid`` and ``camid``: a data set's train split), for one rank of ``world_size``."""
        return cls(
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
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if passes < 1:
            raise ValueError(f"passes (over the identities per epoch) must be >= 1, got {passes}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        self.num_identities, self.num_instances = int(num_identities), int(num_instances)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
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

        self.epoch, self._start = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Full epoch length in batches: ``passes x (#identities // (P x world size))``, on every
        rank."""
        return self.passes * self._batches_per_pass

    @property
    def _batches_per_pass(self) -> int:
        return len(self._pid_values) // self.global_identities

    def set_epoch(self, epoch: int) -> None:
        """Plan epoch ``epoch`` and start it at batch 0."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self._start = int(epoch), 0

    def __len__(self) -> int:
        return self.batches_per_epoch - self._start

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._plan(self.epoch)
        width = self.num_identities * self.num_instances
        mine = plan[self._start :, self.rank * width : (self.rank + 1) * width]
        return iter(mine.tolist())

    def global_plan(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch``: P x world identities x K indices each, rank-major."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._plan(epoch).tolist()

    def state_dict(self, batches_consumed: int) -> dict[str, int]:
        """Position after ``batches_consumed`` trained batches of the current epoch.

        The trainer passes the count because a prefetching loader runs ahead of training.
        """
        if not 0 <= batches_consumed <= self.batches_per_epoch:
            raise ValueError(
                f"batches_consumed must be in [0, {self.batches_per_epoch}] (batches per epoch), "
                f"got {batches_consumed}"
            )
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
        keys = ("epoch", "batches_consumed", "seed", "global_identities", "num_instances")
        missing = [k for k in (*keys, "num_records") if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks key(s) {missing}; got keys {sorted(state)}")
        why = "the sampling plan differs"
        checks = [
            ("seed", "seed {} at save time, {} now", f"{why}; resume with the same seed"),
            (
                "global_identities",
                "global batch of {} identities at save time, {} now",
                f"{why}; keep P x world size constant to resume at another world size",
            ),
            ("num_instances", "K={} images per identity at save time, {} now", f"{why}"),
            (
                "num_records",
                "{} training records at save time, {} now",
                f"{why}; resume on the same training split",
            ),
            ("passes", "{} passes per epoch at save time, {} now", f"{why}"),
        ]
        state = {"passes": 1, **state}  # states written before passes existed
        errors = [
            f"{key!r}: {text.format(state[key], getattr(self, key))}: {reason}"
            for key, text, reason in checks
            if state[key] != getattr(self, key)
        ]
        if errors:
            raise ValueError("cannot resume the identity sampler: " + "; ".join(errors))
        consumed = state["batches_consumed"]
        if not 0 <= consumed <= self.batches_per_epoch:
            raise ValueError(
                f"'batches_consumed': {consumed} at save time, but an epoch has "
                f"{self.batches_per_epoch} batches now: the training split differs"
            )
        self.set_epoch(state["epoch"])
        self._start = int(consumed)

    def _plan(self, epoch: int) -> np.ndarray:
        """(batches, P x world x K) dataset indices of ``epoch``; the last epoch is cached."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        parts = []
        for p in range(self.passes):
            # pass 0 keeps the single-pass plan; further passes get streams of their own
            rng = np.random.default_rng([self.seed, epoch] if p == 0 else [self.seed, epoch, p])
            ids = rng.permutation(len(self._pid_values))
            draws = self._draw(rng)
            used = self._batches_per_pass * self.global_identities
            parts.append(draws[ids[:used]].reshape(self._batches_per_pass, -1))
        plan = np.concatenate(parts)
        self._cache = (epoch, plan)
        return plan

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
