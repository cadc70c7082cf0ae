"""Atomic checkpoints: keep the last N and the best, find the newest for ``--resume auto``.

A checkpoint is written to a temporary name in the same folder, flushed to disk and renamed, so a
crash or preemption mid-write never leaves a half-written file under a checkpoint's name, and the
previous good checkpoint is deleted only after the new one and the ``latest`` pointer are complete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from hpc_reid.atomic import write_atomic
from hpc_reid.engine.errors import CheckpointError

FORMAT_VERSION = 1
_NAME = re.compile(r"epoch_(\d+)_step_(\d+)\.pt")


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary sibling, fsync, then rename over ``path``."""
    return write_atomic(path, lambda f: torch.save(state, f))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: a file (``best.pt`` included), a run's
    ``checkpoints/latest`` pointer, or a run or ``checkpoints/`` folder (its newest)."""
    path = Path(path)
    if path.is_dir() or (path.name == "latest" and path.is_file()):
        folder = path.parent if path.is_file() else path
        if (folder / "checkpoints").is_dir():  # a run folder
            folder = folder / "checkpoints"
        newest = newest_checkpoint(folder)
        if newest is None:
            raise CheckpointError(f"no checkpoint in {folder}")
        return newest
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :class:`CheckpointManager` (on CPU). ``path`` may also be a
    run's ``checkpoints/latest`` pointer or a run or ``checkpoints/`` folder: its newest
    checkpoint (:func:`resolve_checkpoint`)."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not an hpc-reid checkpoint of format {FORMAT_VERSION}"
        )
    return state


class CheckpointManager:
    """Checkpoints of one run under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, keep_best: bool = True):
        self.folder = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_best = keep_best

    def save(self, state: dict[str, Any], epoch: int, step: int) -> Path:
        """Write one checkpoint, point ``latest`` at it, then prune the oldest beyond keep_last."""
        path = save_atomic(
            {**state, "format_version": FORMAT_VERSION},
            self.folder / f"epoch_{epoch:04d}_step_{step:08d}.pt",
        )
        self._write_pointer("latest", path.name)
        for old in self.checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def mark_best(self, path: Path) -> Path:
        """Make ``best.pt`` a hard link to ``path`` (atomic, no second copy on disk)."""
        best = self.folder / "best.pt"
        tmp = self.folder / ".best.pt.tmp"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, best)
        return best

    def checkpoints(self) -> list[Path]:
        """This run's periodic checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(p, _NAME.fullmatch(p.name)) for p in self.folder.iterdir()]
        return [p for p, m in sorted(found, key=lambda t: _order(t[1])) if m]

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the ``latest`` pointer, else the newest by name)."""
        return newest_checkpoint(self.folder)

    def _write_pointer(self, name: str, target: str) -> None:
        write_atomic(self.folder / name, target + "\n")


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in a checkpoints ``folder``: the ``latest`` pointer's, else
    the newest by name (a pointer is written only once its checkpoint is complete)."""
    pointer = folder / "latest"
    if pointer.is_file():
        path = folder / pointer.read_text().strip()
        if path.is_file():
            return path
    if not folder.is_dir():
        return None
    found = [(p, _NAME.fullmatch(p.name)) for p in folder.iterdir()]
    named = [p for p, m in sorted(found, key=lambda t: _order(t[1])) if m]
    return named[-1] if named else None


def _order(match: re.Match[str] | None) -> tuple[int, int]:
    return (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
