"""Rank 0 requeues a SLURM job only when the trainer stopped on the pre-emption signal."""

from __future__ import annotations

import subprocess

import pytest

from hpc_reid.engine.errors import TrainingError
from hpc_reid.launch import slurm

PREEMPTED = {"stopped_at_step": 7, "preempted": True}
SLURM_RANK0 = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    return seen


def test_rank0_requeues_a_preempted_slurm_job(calls, capsys):
    assert slurm.requeue_if_preempted(PREEMPTED, SLURM_RANK0)
    assert calls == [["scontrol", "requeue", "42"]]
    assert "stopped by signal at step 7" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("result", "env"),
    [
        ({"mAP": 0.5}, SLURM_RANK0),  # finished normally
        ({"stopped_at_step": 3, "preempted": False}, SLURM_RANK0),  # --max-steps
        (PREEMPTED, {**SLURM_RANK0, "SLURM_PROCID": "1"}),  # not rank 0
        (PREEMPTED, {}),  # not under SLURM
    ],
)
def test_no_requeue_unless_preempted_on_rank0_under_slurm(calls, result, env):
    assert not slurm.requeue_if_preempted(result, env)
    assert calls == []


def test_a_refused_requeue_is_an_error(monkeypatch):
    def refuse(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "Requested operation is presently disabled")

    monkeypatch.setattr(slurm.subprocess, "run", refuse)
    with pytest.raises(TrainingError, match="presently disabled; the checkpoint is saved"):
        slurm.requeue_if_preempted(PREEMPTED, SLURM_RANK0)
