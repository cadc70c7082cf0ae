"""The DeepSpeed strategy on 2 CPU gloo ranks: ZeRO-1/2 give DDP's losses over the first steps,
resume is exact, a 2-rank ZeRO-2 checkpoint exports and evaluates in one process as at save time,
bf16 trains, gradient accumulation steps the optimizer once per A micro-batches under the
effective batch's LR, fp16 trains or (no fp16 on this CPU) stops with a clear error, the
`deepspeed` launcher runs 2 CPU ranks, a ZeRO-3 run's final evaluation equals its checkpoint's, and
a DeepSpeed config that contradicts the experiment is an error naming both values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install '.[deepspeed]')")

from hpc_reid.cli import main as cli_main
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.deepspeed_strategy import check_precision_supported, merged_deepspeed_config
from hpc_reid.engine.errors import TrainingError
from hpc_reid.engine.optim import build_scheduler, scaled_lr
from hpc_reid.engine.saved import evaluate_checkpoint
from tests.engine.test_trainer import REPO, TINY, _torchrun, tiny_config
from tests.ports import free_port

STEPS = 20  # 8 train ids, P=2 on 2 ranks: 2 iterations per epoch, so 10 epochs
EXACT_STEPS = 7  # compared with DDP to 1e-5 (test_zero_loss_curve_equals_ddp)
RUN = [
    "schedule.epochs=10",
    "schedule.milestones=[7]",
    "evaluation.at_start=false",
    "evaluation.plots=false",
]


def _args(tmp: Path, name: str, *sets: str, resume: bool = False, max_steps: int | None = None):
    args = ["train", "--config", str(REPO / "configs/synthetic/bot.yaml")]
    args += [f"--set={s}" for s in (*TINY, *RUN, *sets)]
    args += [
        f"--set=data.synthetic.cache_dir={tmp / 'cache'}",
        f"--set=logging.output_dir={tmp / 'runs'}",
        f"--set=logging.run_name={name}",
    ]
    args += ["--resume", "auto"] if resume else []
    args += ["--max-steps", str(max_steps)] if max_steps else []
    return args


def _train(tmp: Path, name: str, *sets: str, resume: bool = False, max_steps: int | None = None):
    done = _torchrun(2, _args(tmp, name, *sets, resume=resume, max_steps=max_steps), tmp)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp / "runs" / name


def _deepspeed(stage_file: str, *sets: str) -> list[str]:
    return ["engine.strategy=deepspeed", f"engine.deepspeed_config={stage_file}", *sets]


def losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if x["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP, ZeRO-1 and ZeRO-2 for 20 steps, and ZeRO-2 as 10 steps + resume + 10 steps."""
    tmp = tmp_path_factory.mktemp("ds")
    return {
        "ddp": _train(tmp, "ddp"),
        "zero1": _train(tmp, "zero1", *_deepspeed("configs/deepspeed/zero1.json")),
        "zero2": _train(tmp, "zero2", *_deepspeed("configs/deepspeed/zero2.json")),
        "split": (
            _train(tmp, "split", *_deepspeed("configs/deepspeed/zero2.json"), max_steps=10),
            _train(tmp, "split", *_deepspeed("configs/deepspeed/zero2.json"), resume=True),
        )[1],
        "tmp": tmp,
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_zero_loss_curve_equals_ddp(runs, stage):
    """ZeRO's partitioned reduction and update give DDP's losses over the first EXACT_STEPS
    steps (6 updates). Later steps are printed, not compared: float reordering in ZeRO's flat
    buffers, bit-identical to DDP on an AMD EPYC, is 1e-7 of the loss on an Intel Xeon until a
    discrete choice flips (step 8 there: 5e-5), and then grows as any two runs apart (10% by
    step 19)."""
    state = load_checkpoint(CheckpointManager(runs[stage]).latest())
    assert state["strategy"]["deepspeed"]["zero_stage"] == int(stage[-1])
    ddp, ds = losses(runs["ddp"]), losses(runs[stage])
    assert sorted(ddp) == sorted(ds) == list(range(1, STEPS + 1))
    rel = {s: abs(ds[s] - ddp[s]) / abs(ddp[s]) for s in ddp}
    print(
        f"{stage}: relative loss difference to DDP by step: "
        + ", ".join(f"{s}: {rel[s]:.1e}" for s in sorted(rel))
    )
    assert max(rel[s] for s in range(1, EXACT_STEPS + 1)) <= 1e-5


@pytest.mark.slow
def test_zero2_resume_is_exact(runs):
    """10 steps + checkpoint + resume + 10 steps == 20 steps: losses and weights bit-identical."""
    straight, split = losses(runs["zero2"]), losses(runs["split"])
    assert split == straight
    a = load_checkpoint(CheckpointManager(runs["zero2"]).latest())
    b = load_checkpoint(CheckpointManager(runs["split"]).latest())
    assert a["step"] == b["step"] == STEPS
    wa, wb = a["strategy"]["model"], b["strategy"]["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_exported_zero2_checkpoint_evaluates_in_one_process_as_at_save_time(runs):
    run = runs["zero2"]
    at_save = json.loads((run / "results.json").read_text())
    path = CheckpointManager(run).latest()
    out = runs["tmp"] / "model.pth"
    assert cli_main(["export-weights", str(path), "--out", str(out)]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=False)
    saved = load_checkpoint(path)["strategy"]["model"]
    for key, value in exported["strategy"]["model"].items():  # fp32 master == module in fp32
        assert torch.equal(value, saved[key]), key
    again = evaluate_checkpoint(out, out_dir=runs["tmp"] / "eval")
    for key in ("rank-1", "rank-5", "mAP", "mINP"):
        assert again[key] == pytest.approx(at_save[key], abs=1e-6), key


@pytest.mark.slow
def test_bf16_zero2_trains_a_few_steps(tmp_path):
    bf16 = _deepspeed("configs/deepspeed/zero2_bf16.json", "engine.precision=bf16")
    run = _train(tmp_path, "bf16", *bf16, max_steps=3)
    values = losses(run)
    assert sorted(values) == [1, 2, 3] and all(v == v and v < 1e3 for v in values.values())
    state = load_checkpoint(CheckpointManager(run).latest())
    assert state["strategy"]["deepspeed"]["world_size"] == 2
    assert all(v.numel() > 0 for v in state["strategy"]["model"].values())


@pytest.mark.slow
def test_zero3_trains_and_its_final_evaluation_equals_its_checkpoints(tmp_path):
    """ZeRO-3 for 2 epochs (4 steps) to the end: the final evaluation runs on the gathered model
    (partitioned parameters) and equals evaluating the saved checkpoint in one process."""
    sets = _deepspeed("configs/deepspeed/zero3.json", "schedule.epochs=2")
    sets += ["schedule.milestones=[1]"]
    run = _train(tmp_path, "zero3", *sets)
    values = losses(run)
    assert sorted(values) == [1, 2, 3, 4] and all(v == v and v < 1e3 for v in values.values())
    at_end = json.loads((run / "results.json").read_text())
    path = CheckpointManager(run).latest()
    state = load_checkpoint(path)
    assert state["step"] == 4 and state["strategy"]["deepspeed"]["zero_stage"] == 3
    assert all(v.numel() > 0 for v in state["strategy"]["model"].values())
    again = evaluate_checkpoint(path, out_dir=tmp_path / "eval")
    for key in ("rank-1", "rank-5", "mAP", "mINP"):
        assert again[key] == pytest.approx(at_end[key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # the LR probe never steps
def test_gradient_accumulation_steps_the_optimizer_once_per_a_micro_batches(tmp_path):
    """Accumulation A=2 with ZeRO-2 on 2 ranks, micro batch P x K = 2 x 2.

    Not compared with DDP on an A-times larger batch: BatchNorm normalises each micro-batch with
    its own statistics and the triplet loss mines inside a micro-batch, so A micro-batches are
    not one large batch. What holds exactly: the optimizer steps once per A micro-batches
    (DeepSpeed's global_steps = micro-steps / A); the LR rule sees the effective batch
    P x K x world x A = 16 (linear rule, base 8: lr x 2); the schedule steps once per micro-step
    (trainer iteration), so the logged LR after micro-step n is the schedule's n-th value; a
    checkpoint inside an accumulation is refused on resume (its partial gradients are not saved).
    """
    ds = tmp_path / "zero2_accum2.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}))
    sets = _deepspeed(str(ds), "optimizer.lr_scaling.rule=linear")
    sets += ["optimizer.lr_scaling.base_batch_size=8"]
    run = _train(tmp_path, "accum", *sets, max_steps=5)  # 2.5 optimizer steps
    state = load_checkpoint(CheckpointManager(run).latest())
    info = state["strategy"]["deepspeed"]
    assert (state["step"], info["optimizer_steps"], info["accumulation"]) == (5, 2, 2)
    assert info["config"]["train_batch_size"] == 2 * 2 * 2 * 2
    config = tiny_config(tmp_path, *RUN, *sets)
    lr, note = scaled_lr(config.optimizer, 16)
    assert lr == pytest.approx(2 * config.optimizer.lr) and "16/8" in note
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = build_scheduler(probe, config.schedule, 2)  # 2 iterations per epoch
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {x["step"]: x["lr"] for x in lines if x["kind"] == "train"}
    assert sorted(logged) == list(range(1, 6))
    for n in range(1, 6):
        schedule.step()
        assert logged[n] == pytest.approx(probe.param_groups[0]["lr"], rel=1e-12), n
    assert all(v == v and v < 1e3 for v in losses(run).values())
    # saved inside an accumulation: resuming it is refused
    done = _torchrun(2, _args(tmp_path, "accum", *sets, resume=True), tmp_path)
    assert done.returncode != 0
    assert "inside an accumulation of 2 micro-batches" in done.stderr


@pytest.mark.slow
def test_fp16_trains_or_stops_with_a_clear_error_at_start(tmp_path):
    """fp16 with loss scaling on 2 CPU ranks: DeepSpeed's CPU accelerator has fp16 only where
    oneDNN does (AVX512-FP16 / AMX-FP16); elsewhere the run stops at start naming
    engine.precision and the DeepSpeed config."""
    from deepspeed.accelerator import get_accelerator

    sets = _deepspeed("configs/deepspeed/zero2_fp16.json", "engine.precision=fp16")
    if get_accelerator().is_fp16_supported():
        values = losses(_train(tmp_path, "fp16", *sets, max_steps=3))
        assert sorted(values) == [1, 2, 3] and all(v == v for v in values.values())
        return
    done = _torchrun(2, _args(tmp_path, "fp16", *sets, max_steps=3), tmp_path)
    assert done.returncode != 0
    assert (
        "engine.precision=fp16 with engine.deepspeed_config configs/deepspeed/zero2_fp16.json: "
        "DeepSpeed's cpu accelerator does not support fp16"
    ) in done.stderr
    assert not (tmp_path / "runs/fp16/checkpoints").exists() or not any(
        (tmp_path / "runs/fp16/checkpoints").glob("*.pt")
    )


def test_unsupported_precision_error_names_the_precision_and_the_config():
    class NoHalf:
        def is_fp16_supported(self):
            return False

        def device_name(self):
            return "cpu"

    with pytest.raises(TrainingError, match=r"engine\.precision=fp16 with X\.json: .*cpu"):
        check_precision_supported("fp16", "X.json", NoHalf())
    check_precision_supported("fp32", "X.json", NoHalf())  # nothing to check


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_two_cpu_ranks(tmp_path):
    """`deepspeed --num_nodes 1 --num_gpus 2 --module hpc_reid.cli train ...` on the CPU: the
    launcher spawns 2 local processes (passing --local_rank) and they train 2 steps over gloo."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_BUILD_OPS": "0"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    cmd = [launcher, "--num_nodes", "1", "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["--module", "hpc_reid.cli"]
    cmd += _args(tmp_path, "launcher", *_deepspeed("configs/deepspeed/zero2.json"), max_steps=2)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "--local_rank=1" in done.stdout + done.stderr
    run = tmp_path / "runs/launcher"
    assert sorted(losses(run)) == [1, 2]
    state = load_checkpoint(CheckpointManager(run).latest())
    assert state["world_size"] == 2 and state["strategy"]["deepspeed"]["world_size"] == 2


@pytest.mark.parametrize(
    ("ds_key", "ds_value", "experiment_value"),
    [("train_micro_batch_size_per_gpu", 8, 4), ("train_batch_size", 12, 8)],
)
def test_a_conflicting_deepspeed_config_is_an_error_naming_both_values(
    tmp_path, ds_key, ds_value, experiment_value
):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({ds_key: ds_value, "zero_optimization": {"stage": 2}}))
    config = tiny_config(tmp_path, "engine.strategy=deepspeed", f"engine.deepspeed_config={path}")
    with pytest.raises(TrainingError, match=rf"{ds_key}={ds_value} .*gives {experiment_value}"):
        merged_deepspeed_config(config, world_size=2)


def test_precision_and_accumulation_come_from_the_experiment(tmp_path):
    config = tiny_config(
        tmp_path,
        "engine.strategy=deepspeed",
        "engine.deepspeed_config=configs/deepspeed/zero2_accum4_clip.json",
    )
    ds = merged_deepspeed_config(config, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["train_batch_size"] == 4 * 4 * 2
    assert ds["gradient_clipping"] == 5.0 and not ds["bf16"]["enabled"]
    bf16 = config.model_copy(deep=True)
    bf16.engine.deepspeed_config = "configs/deepspeed/zero2_bf16.json"
    with pytest.raises(TrainingError, match=r"enables bf16 but engine\.precision='fp32'"):
        merged_deepspeed_config(bf16, world_size=2)
