"""Stopping and resuming a run: the pre-emption signal every rank agrees on (:class:`StopSignal`),
each rank's random generators (saved in every checkpoint, restored at the same world size), which
checkpoint ``--resume`` means (:func:`checkpoint_to_resume`), and restoring one into a built run
(:func:`restore`), refused with the reason when it is another model's or cannot resume this run.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.errors import CheckpointError, TrainingError


class StopSignal:
    """Records SIGUSR1/SIGTERM; the ranks agree on stopping through one all-reduce per check.

    ``agreed`` is a collective (and a host sync): the trainer calls it on every rank at the same
    steps. ``stopping`` tells whether an agreement said stop, on every rank, whichever received it.
    """

    def __init__(self):
        self.received = False
        self.stopping = False
        self._previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            # signal.signal raises ValueError outside the main thread (e.g. a Ray actor thread)
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def agreed(self, device: torch.device) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            self.stopping = self.received
            return self.stopping
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stopping = bool(flag.item())
        return self.stopping

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's generators. On CUDA only its own device's: the visible devices differ between
    jobs (per-task GPU binding shows one), and the others' generators are not this rank's."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device, log: Callable[[str], None]) -> None:
    """Restore :func:`rng_state`'s ``state`` on ``device`` (``log`` says why a CUDA generator of
    an older checkpoint, which held every visible device's, cannot be)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, list | tuple):  # checkpoints before 2026-12 held every visible device's
        if device.index is None or device.index >= len(cuda):
            log(
                f"checkpoint holds CUDA generator states of {len(cuda)} devices, none for "
                f"{device}: its CUDA generator is not restored"
            )
            return
        cuda = cuda[device.index]
    torch.cuda.set_rng_state(cuda, device)


def all_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, by rank (a collective when distributed)."""
    if not dist.is_initialized():
        return [rng_state(device)]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state(device))
    return states


def checkpoint_to_resume(resume: str | None, checkpoints: CheckpointManager) -> Path | None:
    """The checkpoint ``--resume`` names (``auto``: the run's latest, if any), else None; a run
    folder that already holds checkpoints is not started again without ``--resume``."""
    if resume == "auto":
        return checkpoints.latest()
    if resume is not None:
        return Path(resume)
    if checkpoints.latest() is not None:
        raise TrainingError(
            f"run folder {checkpoints.folder.parent} already holds checkpoints; pass "
            "--resume auto to continue it, or choose another --set logging.run_name=..."
        )
    return None


def restore(path, meta, strategy, criterion, sampler, rank, world, device, log):
    """Load checkpoint ``path`` into a built run (model and optimizer through ``strategy``, the
    loss terms' state, the sampler's position; this rank's generators at the same world size) and
    return its ``(epoch, step, best)``; a CheckpointError names what does not fit."""
    state = load_checkpoint(path)
    if state["model_meta"] != meta:
        diff = {
            k: (state["model_meta"].get(k), meta.get(k))
            for k in [*meta, *(k for k in state["model_meta"] if k not in meta)]
            if state["model_meta"].get(k) != meta.get(k)
        }
        details = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} is from another model ({details})")
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} cannot resume this run: {exc}") from None
    try:
        strategy.load_state_dict(state["strategy"])
    except ValueError as exc:  # torch's optimizer refuses another set of parameter groups
        raise CheckpointError(
            f"checkpoint {path} cannot resume this run: its optimizer state does not fit this "
            f"run's ({exc}); what makes the parameter groups (optimizer.decoder_lr gives the "
            "decoder its own, frozen parameters leave theirs out) must be as it was written "
            "with, or start another run (logging.run_name)"
        ) from None
    criterion.load_state_dict(state["criterion"])
    if state["world_size"] == world:
        set_rng_state(state["rng"][rank], device, log.info)
    log.info(
        f"resumed from {path}: epoch {state['epoch'] + 1}, step {state['step']}, "
        f"world size {state['world_size']} -> {world}"
    )
    return state["epoch"], state["step"], state["best"]
