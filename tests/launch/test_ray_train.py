"""`hpc-reid train --launcher ray` and the Ray launcher on a real local Ray (3 logical CPUs: two
training workers and a Tune trial): 2 CPU workers train with synchronised parameters, report
metrics and checkpoints, resume from Ray's checkpoint after a rerun and after a worker failure,
report into a Tune trial, and hand rank 0's return value back."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from hpc_reid.cli import main
from hpc_reid.config import load_config
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from tests.tiny import TINY_BATCH, TINY_DATA, TINY_SCHEDULE

REPO = Path(__file__).resolve().parents[2]
# 8 training identities, P=2 on 2 workers: 2 iterations an epoch, an evaluation after each epoch
TINY = [
    *TINY_DATA,
    "model.backbone=osnet_x0_25",
    *TINY_BATCH,
    *TINY_SCHEDULE,
    "evaluation.every_epochs=1",
    "evaluation.at_start=false",
    "logging.progress_bar=false",
    "logging.log_every=1",
    "engine.device=cpu",
]


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One local Ray for the module (starting one takes seconds)."""
    pytest.importorskip("ray.train.torch", reason="Ray Train is not installed (hpc-reid[ray])")
    import ray
    from ray import cloudpickle

    from hpc_reid.launch.ray_launcher import connect

    # the worker functions below travel by value: workers cannot import this test module
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Ray waits this long for a worker blocked in a collective (its peer died) before killing it
    saved = os.environ.get("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S")
    os.environ["TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"] = "3"  # Ray workers inherit it
    connect(num_cpus=3)
    yield tmp_path_factory.mktemp("ray")
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if saved is None:
        os.environ.pop("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S")
    else:
        os.environ["TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"] = saved


def _settings(root: Path, run_name: str) -> list[str]:
    return [
        *TINY,
        f"data.synthetic.cache_dir={root / 'cache'}",
        f"logging.output_dir={root / 'runs'}",
        f"logging.run_name={run_name}",
    ]


def _config(root: Path, run_name: str):
    return load_config(REPO / "configs/synthetic/bot.yaml", _settings(root, run_name))


@pytest.fixture(scope="module")
def cli_run(ray_session):
    """``hpc-reid train --launcher ray --num-workers 2 --max-steps 3``: its run folder."""
    sets = [f"--set={s}" for s in _settings(ray_session, "cli")]
    config = str(REPO / "configs/synthetic/bot.yaml")
    launch = ["--launcher", "ray", "--num-workers", "2", "--max-steps", "3"]
    assert main(["train", "--config", config, *sets, *launch]) == 0
    return ray_session / "runs/cli"


def _reported(run: Path) -> list[dict]:
    """Ray's checkpoint folders under ``run/ray``, oldest first: their metrics.json."""
    folders = sorted(f for f in (run / "ray").glob("checkpoint_*") if f.is_dir())
    for folder in folders:
        assert len(list(folder.glob("*.pt"))) == 1, folder
    return [json.loads((f / "metrics.json").read_text()) for f in folders]


@pytest.mark.slow
def test_cli_trains_on_two_ray_workers_and_reports_metrics_and_checkpoints(cli_run):
    from ray.train import Result

    state = load_checkpoint(CheckpointManager(cli_run).latest())
    assert (state["world_size"], state["step"]) == (2, 3)
    reports = _reported(cli_run)
    assert [r["step"] for r in reports] == [2, 3]  # the epoch-1 evaluation, then max steps
    assert 0.0 <= reports[0]["mAP"] <= 1.0 and reports[0]["final"] is False
    result = Result.from_path(str(cli_run / "ray"))
    assert result.metrics["stopped_at_step"] == 3
    assert 0.0 <= result.best_checkpoints[0][1]["mAP"] <= 1.0


def crash_once_after_first_report(marker: str, **kwargs):
    """train_worker, but rank 1 fails right after its first report (once: ``marker``)."""
    import ray.train

    from hpc_reid.launch.ray_launcher import train_worker

    report = ray.train.report

    def report_then_fail(*args, **kw):
        report(*args, **kw)
        if ray.train.get_context().get_world_rank() == 1 and not os.path.exists(marker):
            Path(marker).touch()
            raise RuntimeError("injected worker failure")

    ray.train.report = report_then_fail
    return train_worker(**kwargs)


@pytest.mark.slow
def test_rerun_resumes_from_rays_checkpoint_and_restarts_after_a_worker_failure(cli_run):
    from hpc_reid.launch.ray_launcher import fit_on_ray

    marker = cli_run.parent / "crashed"
    config = _config(cli_run.parent.parent, "cli")
    # resume=None: the run folder holds checkpoints, so only Ray's checkpoint lets train() start
    summary, result = fit_on_ray(
        crash_once_after_first_report,
        {"marker": str(marker), "config": config, "resume": None},
        num_workers=2,
        storage_path=cli_run,
        name="ray",
        max_failures=1,
    )
    assert marker.exists()  # rank 1 failed after the step-4 report; Ray restarted from it
    assert [r["step"] for r in _reported(cli_run)] == [2, 3, 4, 6]
    assert result.metrics["final"] is True and result.metrics["step"] == 6  # 3 epochs x 2
    assert result.metrics["mAP"] == pytest.approx(summary["mAP"])
    assert load_checkpoint(CheckpointManager(cli_run).latest())["step"] == 6


def parameter_digests(config) -> dict:
    """On every worker: train 2 steps, then all-gather a digest of this rank's parameters
    (not its buffers: BatchNorm statistics are per rank under DDP, rank 0's are broadcast at
    the start of every forward)."""
    import torch.distributed as dist

    import hpc_reid.engine.trainer as trainer
    from hpc_reid.launch.ray_launcher import train_worker

    models = []

    class Recording(trainer.DDPStrategy):
        def __init__(self, model, *args, **kwargs):
            models.append(model)
            super().__init__(model, *args, **kwargs)

    trainer.DDPStrategy = Recording
    train_worker(config, resume=None, max_steps=2)
    names = sorted(name for name, _ in models[0].named_parameters())
    digest = _digest(models[0].state_dict(), names)
    digests = [None] * dist.get_world_size()  # Ray's process group outlives train()
    dist.all_gather_object(digests, digest)
    return {"rank": dist.get_rank(), "digests": digests, "parameters": names}


def _digest(state: dict[str, torch.Tensor], keys: list[str]) -> str:
    sha = hashlib.sha256()
    for key in keys:
        sha.update(key.encode())
        sha.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


@pytest.mark.slow
def test_two_workers_end_with_identical_parameters_and_rank0_value_comes_back(ray_session):
    from hpc_reid.launch.ray_launcher import run_on_ray

    config = _config(ray_session, "sync")
    value = run_on_ray(
        parameter_digests,
        {"config": config},
        num_workers=2,
        storage_path=ray_session / "runs/sync",
        name="ray",
    )
    assert value["rank"] == 0  # rank 0's return value
    first, second = value["digests"]
    assert first == second  # both workers hold the same weights after 2 DDP steps
    state = load_checkpoint(CheckpointManager(ray_session / "runs/sync").latest())
    assert state["step"] == 2 and _digest(state["strategy"]["model"], value["parameters"]) == first


@pytest.mark.slow
def test_tune_trial_receives_the_ray_train_reports(ray_session):
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hpc_reid.launch.ray_launcher import train_on_ray

    config = _config(ray_session, "tuned")

    def trial(_):
        train_on_ray(config, num_workers=2, max_steps=2, callbacks=[TuneReportCallback()])

    results = tune.Tuner(
        tune.with_resources(trial, {"cpu": 1}),  # the trial waits on 2 workers of 1 CPU each
        run_config=tune.RunConfig(storage_path=str(ray_session / "tune"), name="t"),
    ).fit()
    assert results.errors == []
    metrics = results[0].metrics
    assert metrics["stopped_at_step"] == 2
    checkpoint = Path(metrics["checkpoint_path"])  # the Ray Train checkpoint, in its storage
    assert checkpoint.parent == ray_session / "runs/tuned/ray"
    assert (checkpoint / "epoch_0000_step_00000002.pt").is_file()


def test_ray_options_need_the_ray_launcher(capsys):
    config = str(REPO / "configs/synthetic/bot.yaml")
    assert main(["train", "--config", config, "--num-workers", "2", "--address", "auto"]) == 2
    assert "--num-workers, --address need(s) --launcher ray" in capsys.readouterr().err
    assert main(["train", "--config", config, "--launcher", "ray"]) == 2
    assert "needs --num-workers N" in capsys.readouterr().err


def test_missing_ray_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setitem(sys.modules, "ray.train", None)
    monkeypatch.setitem(sys.modules, "ray.train.torch", None)
    config = str(REPO / "configs/synthetic/bot.yaml")
    assert main(["train", "--config", config, "--launcher", "ray", "--num-workers", "2"]) == 2
    assert "pip install 'hpc-reid[ray]'" in capsys.readouterr().err
