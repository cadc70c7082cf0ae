"""Requeue a SLURM batch job after the trainer stopped on its pre-emption signal.

``slurm/train.sh`` asks for ``--signal=USR1@120`` and ``--requeue``: SLURM sends SIGUSR1 to every
task two minutes before the time limit (or ``scancel --signal=USR1`` does, or the scheduler sends
SIGTERM on pre-emption). The trainer then stops every rank at the same step after one checkpoint
and returns ``preempted=True``; rank 0 puts the job back in the queue here. The requeued job keeps
its job id, so ``--set logging.run_name=job-$SLURM_JOB_ID --resume auto`` finds that checkpoint and
continues at the exact next batch. A run that fails for a real error raises before it gets here, so
it exits non-zero and is never requeued.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from hpc_reid.engine.errors import TrainingError
from hpc_reid.launch.distributed import detect_env


def requeue_job(job_id: str, timeout_s: float = 60.0) -> None:
    """``scontrol requeue JOB_ID``; raises TrainingError when scontrol is missing or refuses."""
    cmd = ["scontrol", "requeue", job_id]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TrainingError(f"{' '.join(cmd)} failed: {exc}") from None
    if done.returncode != 0:
        raise TrainingError(
            f"{' '.join(cmd)} exited with {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()}; the checkpoint is saved: resubmit the job "
            "with the same logging.run_name and --resume auto"
        )


def requeue_if_preempted(result: dict[str, Any], env: Mapping[str, str] | None = None) -> bool:
    """Requeue this SLURM job when ``train`` stopped on the pre-emption signal.

    Only rank 0 requeues (one ``scontrol`` call per job); outside SLURM nothing happens. Returns
    whether this process requeued the job.
    """
    env = os.environ if env is None else env
    if not result.get("preempted"):
        return False
    job_id = env.get("SLURM_JOB_ID")
    if not job_id or detect_env(env).rank != 0:
        return False
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    print(
        f"hpc-reid: stopped by signal at step {result.get('stopped_at_step')} with a checkpoint; "
        f"requeueing SLURM job {job_id} (restart {restarts}): scontrol requeue {job_id}",
        file=sys.stderr,
        flush=True,
    )
    requeue_job(job_id)
    return True
