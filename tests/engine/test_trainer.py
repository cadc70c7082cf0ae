"""The main job end to end on tiny synthetic data: training, evaluation outputs, exact resume,
resume at another world size, and the errors for checkpoints that do not fit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_reid.config import load_config
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.errors import CheckpointError, TrainingError
from hpc_reid.engine.trainer import evaluate_checkpoint, train
from tests.tiny import TINY_BATCH, TINY_DATA, TINY_SCHEDULE

REPO = Path(__file__).resolve().parents[2]
TINY = [
    *TINY_DATA,
    "model.backbone=osnet_x0_25",
    *TINY_BATCH,
    *TINY_SCHEDULE,
    "evaluation.every_epochs=0",
    "logging.progress_bar=false",
    "logging.log_every=1",
    "engine.device=cpu",
]


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(
        REPO / "configs/synthetic/bot.yaml",
        [
            *TINY,
            f"data.synthetic.cache_dir={tmp_path / 'cache'}",
            f"logging.output_dir={tmp_path / 'runs'}",
            *extra,
        ],
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["strategy"]["model"]


def test_main_job_trains_evaluates_and_writes_every_output(tmp_path):
    config = tiny_config(tmp_path, "logging.run_name=e2e", "evaluation.every_epochs=2")
    summary = train(config)
    run = tmp_path / "runs/e2e"
    for key in ("rank-1", "rank-5", "rank-10", "mAP", "mINP"):
        assert 0.0 <= summary[key] <= 1.0
    results = json.loads((run / "results.json").read_text())
    assert results["mAP"] == pytest.approx(summary["mAP"])
    assert len(results["cmc"]) == config.evaluation.max_rank
    start = json.loads((run / "results_start.json").read_text())  # evaluation.at_start
    assert set(start) >= {"rank-1", "rank-5", "mAP", "mINP"}
    for name in ("cmc.png", "ranked.png", "config.yaml", "metrics.jsonl"):
        assert (run / name).stat().st_size > 0, name
    assert list((run / "tensorboard").iterdir())
    assert load_config(run / "config.yaml") == config
    manager = CheckpointManager(run)
    assert manager.latest() is not None and (manager.folder / "best.pt").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {line["kind"] for line in lines}
    # evaluating the saved model reproduces the final numbers
    again = evaluate_checkpoint(manager.latest(), out_dir=tmp_path / "eval")
    assert again == pytest.approx(summary)
    # a second train into the same run folder refuses to overwrite it
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(config)


def test_resume_is_bit_exact(tmp_path):
    """N steps + checkpoint + resume + N steps == 2N steps (crossing an epoch boundary)."""
    n = 5  # 16 ids, 8 train ids, P=2: 4 batches per epoch, so step 5 is mid-epoch 2
    straight = tiny_config(tmp_path, "logging.run_name=straight")
    train(straight, max_steps=2 * n)
    split = tiny_config(tmp_path, "logging.run_name=split")
    train(split, max_steps=n)
    train(split, resume="auto", max_steps=2 * n)
    a = weights(CheckpointManager(tmp_path / "runs/straight").latest())
    b = weights(CheckpointManager(tmp_path / "runs/split").latest())
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert load_checkpoint(CheckpointManager(tmp_path / "runs/split").latest())["step"] == 2 * n


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(tiny_config(tmp_path, "logging.run_name=a"), max_steps=1)
    path = CheckpointManager(tmp_path / "runs/a").latest()
    other = tiny_config(tmp_path, "logging.run_name=b", "model.pooling=gem")
    with pytest.raises(CheckpointError, match=r"from another model .*pooling: checkpoint 'avg'"):
        train(other, resume=str(path))


def test_resume_with_another_global_batch_is_refused(tmp_path):
    train(tiny_config(tmp_path, "logging.run_name=a"), max_steps=1)
    path = CheckpointManager(tmp_path / "runs/a").latest()
    other = tiny_config(tmp_path, "logging.run_name=b", "sampler.num_identities=4")
    with pytest.raises(CheckpointError, match="cannot resume this run"):
        train(other, resume=str(path))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        "hpc_reid.cli",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_gloo_ranks_train_and_resume_as_one_rank_with_the_same_global_batch(tmp_path):
    """P=2 on 2 ranks saves; P=4 on 1 rank resumes the same global plan and finishes."""
    sets = [f"--set={s}" for s in TINY]
    common = [
        "--config",
        str(REPO / "configs/synthetic/bot.yaml"),
        *sets,
        f"--set=data.synthetic.cache_dir={tmp_path / 'cache'}",
        f"--set=logging.output_dir={tmp_path / 'runs'}",
        "--set=logging.run_name=ddp",
    ]
    done = _torchrun(2, ["train", *common, "--max-steps", "3"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(CheckpointManager(tmp_path / "runs/ddp").latest())
    assert state["world_size"] == 2 and state["step"] == 3
    assert state["sampler"]["global_identities"] == 4
    resumed = tiny_config(
        tmp_path, "logging.run_name=ddp", "sampler.num_identities=4", "schedule.epochs=3"
    )
    summary = train(resumed, resume="auto")
    assert 0.0 <= summary["mAP"] <= 1.0
