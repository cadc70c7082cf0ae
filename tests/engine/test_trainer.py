"""The main job end to end on tiny synthetic data: training, evaluation outputs, exact resume,
resume at another world size, and the errors for checkpoints that do not fit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_reid.config import load_config
from hpc_reid.engine import resume, trainer
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.errors import CheckpointError, TrainingError
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import select_device, train
from tests import tiny as tests_tiny
from tests.ports import free_port
from tests.tiny import TINY_BATCH, TINY_DATA, TINY_SCHEDULE

REPO = Path(__file__).resolve().parents[2]
TINY = [
    *TINY_DATA,
    "model.backbone=osnet_x0_25",
    *TINY_BATCH,
    *TINY_SCHEDULE,
    "evaluation.every_epochs=0",
    "evaluation.flip_average=false",  # one pass per image; flip's own tests turn it on
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


def test_resume_with_other_optimizer_groups_is_refused_naming_the_checkpoint(tmp_path):
    """A SAN run with the decoder's own rate (its own parameter groups) resumed without it: torch's
    bare "different number of parameter groups" becomes an error naming the file and the keys."""
    tiny_san = ["model.san.texture_size=[16,8]", "loss.decoder_triplet.mining=hard"]
    san = tests_tiny.tiny_config(
        tmp_path, "configs/synthetic/san.yaml", *tiny_san, "logging.run_name=a"
    )
    assert san.optimizer.decoder_lr is not None
    train(san, max_steps=1)
    path = CheckpointManager(tmp_path / "runs/a").latest()
    other = tests_tiny.tiny_config(
        tmp_path, "configs/synthetic/san.yaml", *tiny_san, "logging.run_name=b",
        "optimizer.decoder_lr=null", "optimizer.decoder_weight_decay=null",
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=rf"{path}.*optimizer state.*optimizer.decoder_lr"):
        train(other, resume=str(path))


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


@pytest.mark.slow
def test_two_ranks_final_evaluation_is_that_of_the_saved_checkpoint(tmp_path):
    """After the last step every DDP rank's BatchNorm statistics moved with its own batch; the
    sharded final evaluation must use rank 0's (those saved), so evaluating the checkpoint in one
    process gives the same numbers."""
    args = [
        "train",
        "--config",
        str(REPO / "configs/synthetic/bot.yaml"),
        *[f"--set={s}" for s in TINY],
        f"--set=data.synthetic.cache_dir={tmp_path / 'cache'}",
        f"--set=logging.output_dir={tmp_path / 'runs'}",
        "--set=logging.run_name=ddp",
        "--set=evaluation.at_start=false",
        "--set=evaluation.plots=false",
    ]
    done = _torchrun(2, args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((tmp_path / "runs/ddp/results.json").read_text())
    latest = CheckpointManager(tmp_path / "runs/ddp").latest()
    again = evaluate_checkpoint(latest, out_dir=tmp_path / "eval")
    for key in ("rank-1", "rank-5", "mAP", "mINP"):
        assert again[key] == pytest.approx(final[key], abs=1e-6), key


def test_sync_bn_true_on_cpu_is_refused_at_start_naming_the_key(tmp_path):
    config = tiny_config(tmp_path, "distributed.sync_bn=true")
    with pytest.raises(TrainingError, match=r"distributed\.sync_bn=true .* runs only on CUDA"):
        train(config)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()  # before work


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "evaluation.distance=global+local",
            r"evaluation\.distance: 'local' is not a retrieval part of this model",
        ),
        (
            "loss.local_triplet.weight=1",
            r"loss\.local_triplet reads the model output 'local', which model\.head 'bnneck' "
            r"does not produce",
        ),
    ],
)
def test_a_method_part_the_model_lacks_is_refused_before_training(tmp_path, setting, message):
    from hpc_reid.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(tiny_config(tmp_path, setting))
    assert not list((tmp_path / "runs").rglob("*.pt"))  # nothing trained


def test_evaluation_backend_cuda_whose_kernel_cannot_build_is_refused_before_training(
    monkeypatch,
):
    """An explicit evaluation.backend=cuda on a CUDA run compiles the fused kernel at start: a
    failed build stops the run with the build error, not at the first evaluation hours later."""
    from hpc_reid.evaluation import ranking_cuda

    def fail():
        raise OSError("nvcc: not found")

    monkeypatch.setitem(trainer.RANKING_BACKENDS, "cuda", trainer.RANKING_BACKENDS["numpy"])
    monkeypatch.setattr(ranking_cuda, "_kernel", None)
    monkeypatch.setattr(ranking_cuda, "_load_error", None)
    monkeypatch.setattr(ranking_cuda, "load_kernel", fail)
    with pytest.raises(TrainingError, match=r"evaluation\.backend=cuda.*nvcc: not found"):
        trainer.check_evaluation_backend("cuda", torch.device("cuda", 0))
    # On the CPU, or with another backend, nothing is compiled (load_kernel would raise).
    trainer.check_evaluation_backend("cuda", torch.device("cpu"))
    trainer.check_evaluation_backend("auto", torch.device("cuda", 0))
    with pytest.raises(TrainingError, match="not available here"):
        trainer.check_evaluation_backend("cython-gpu", torch.device("cpu"))


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA API with ``visible`` devices that only records what it is asked (no GPU here)."""
    calls: dict = {"visible": 1, "set_device": [], "set_rng_state": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls["visible"])
    monkeypatch.setattr(torch.cuda, "set_device", calls["set_device"].append)
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state",
        lambda device: torch.full((4,), device.index, dtype=torch.uint8),
    )
    monkeypatch.setattr(
        torch.cuda,
        "set_rng_state",
        lambda state, device: calls["set_rng_state"].append((state, device)),
    )
    return calls


@pytest.mark.parametrize(("visible", "local_rank", "index"), [(1, 3, 0), (8, 3, 3), (4, 0, 0)])
def test_select_device_takes_the_visible_gpu_under_per_task_binding(
    fake_cuda, visible, local_rank, index
):
    """SLURM --gpus-per-task=1 shows each task its own GPU as cuda:0, whatever SLURM_LOCALID."""
    fake_cuda["visible"] = visible
    for requested in ("cuda", "auto"):
        assert select_device(requested, local_rank) == torch.device("cuda", index)
    assert fake_cuda["set_device"] == [index, index]


def test_rng_state_holds_and_restores_only_this_ranks_cuda_generator(fake_cuda):
    state = resume.rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], torch.full((4,), 1, dtype=torch.uint8))
    assert "cuda" not in resume.rng_state(torch.device("cpu"))
    lines: list[str] = []
    resume.set_rng_state(state, torch.device("cuda", 0), lines.append)  # another visible index
    ((restored, device),) = fake_cuda["set_rng_state"]
    assert restored is state["cuda"] and device == torch.device("cuda", 0) and lines == []


def test_rng_state_of_an_old_checkpoint_restores_this_devices_entry_or_says_it_cannot(fake_cuda):
    old = {**resume.rng_state(torch.device("cpu")), "cuda": [torch.zeros(4), torch.ones(4)]}
    lines: list[str] = []
    resume.set_rng_state(old, torch.device("cuda", 1), lines.append)
    ((restored, device),) = fake_cuda["set_rng_state"]
    assert restored is old["cuda"][1] and device == torch.device("cuda", 1)
    resume.set_rng_state(old, torch.device("cuda", 2), lines.append)
    assert len(fake_cuda["set_rng_state"]) == 1
    assert lines == [
        "checkpoint holds CUDA generator states of 2 devices, none for cuda:2: its CUDA "
        "generator is not restored"
    ]


def test_losses_are_read_on_the_host_only_on_logging_steps(tmp_path, monkeypatch):
    """Reading a loss (item / float) waits for the GPU: the loop does it every log_every steps."""
    live: dict = {"step": 0, "ptrs": set()}
    reads: list[int] = []

    class SpiedLoss(trainer.ReidLoss):
        def forward(self, outputs, pids, batch=None):
            total, parts = super().forward(outputs, pids, batch)
            live["step"] += 1
            live["ptrs"] = {t.data_ptr() for t in (total, *parts.values())}
            return total, parts

    real_item, real_float = torch.Tensor.item, torch.Tensor.__float__

    def item(self):
        if self.data_ptr() in live["ptrs"]:
            reads.append(live["step"])
        return real_item(self)

    def to_float(self):
        if self.data_ptr() in live["ptrs"]:
            reads.append(live["step"])
        return real_float(self)

    monkeypatch.setattr(trainer, "ReidLoss", SpiedLoss)
    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "__float__", to_float)
    extra = ["logging.run_name=spy", "logging.log_every=3", "evaluation.at_start=false"]
    train(tiny_config(tmp_path, *extra), max_steps=7)
    assert live["step"] == 7 and sorted(set(reads)) == [3, 6]
    lines = (tmp_path / "runs/spy/metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [3, 6]
    assert all(r["loss"] > 0 and r["triplet"] >= 0 for r in logged)


SIGNAL_STEP, CHECK_EVERY = 4, 3  # 2 ranks, passes_per_epoch=4: 8 steps an epoch


def _stop_rank_main(rank: int, port: int, tmp: str, out: dict) -> None:
    """One rank of a 2-rank gloo run in which only rank 1 receives SIGUSR1, during step 4."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    flag_reduces = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        if tensor.numel() == 1:  # the stop flag (the centers' gradients are a matrix)
            flag_reduces.append(1)
        return all_reduce(tensor, *args, **kwargs)

    class SignalledStrategy(trainer.DDPStrategy):
        steps = 0

        def step(self, loss):
            norm = super().step(loss)
            SignalledStrategy.steps += 1
            if rank == 1 and SignalledStrategy.steps == SIGNAL_STEP:
                os.kill(os.getpid(), signal.SIGUSR1)
            return norm

    dist.all_reduce = counting_all_reduce
    trainer.DDPStrategy = SignalledStrategy
    config = tiny_config(
        Path(tmp),
        "logging.run_name=stop",
        "sampler.passes_per_epoch=4",
        f"distributed.stop_check_every={CHECK_EVERY}",
        "evaluation.at_start=false",
    )
    result = trainer.train(config, max_steps=20)
    out[rank] = {**result, "flag_reduces": len(flag_reduces), "steps": SignalledStrategy.steps}


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_next_check_step(tmp_path):
    """Only rank 1 is signalled (during step 4); the ranks agree every 3 steps, so both stop
    after step 6 with one checkpoint, both report the pre-emption, and the stop flag was
    all-reduced twice (steps 3 and 6), not every step."""
    out = mp.Manager().dict()
    mp.spawn(_stop_rank_main, args=(free_port(), str(tmp_path), out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[rank] == {
            "stopped_at_step": 6,
            "preempted": True,
            "flag_reduces": 2,
            "steps": 6,
        }, rank
    state = load_checkpoint(CheckpointManager(tmp_path / "runs/stop").latest())
    assert state["step"] == 6 and state["world_size"] == 2
