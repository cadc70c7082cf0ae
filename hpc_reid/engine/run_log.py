"""What a run reports: console lines, a progress bar, JSON-lines metrics and TensorBoard scalars.

Only the main process writes; other ranks get a :class:`RunLog` that does nothing, so calls need no
``if rank == 0`` around them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress_bar: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self._writer = None
        self._bar = None
        self._progress = progress_bar and enabled
        self._jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        """Record ``values`` at ``step`` in metrics.jsonl and TensorBoard (``kind/name``)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        if not self._progress:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="batch",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(self, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.end_epoch()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
