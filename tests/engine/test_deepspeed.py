"""The DeepSpeed strategy on 2 CPU gloo ranks: ZeRO-1/2 follow DDP's loss curve, resume is exact,
a 2-rank ZeRO-2 checkpoint exports and evaluates in one process as at save time, bf16 and ZeRO-3
train, and a DeepSpeed config that contradicts the experiment is an error naming both values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install '.[deepspeed]')")

from hpc_reid.cli import main as cli_main
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.deepspeed_strategy import merged_deepspeed_config
from hpc_reid.engine.errors import TrainingError
from hpc_reid.engine.trainer import evaluate_checkpoint
from tests.engine.test_trainer import REPO, TINY, _torchrun, tiny_config

STEPS = 20  # 8 train ids, P=2 on 2 ranks: 2 iterations per epoch, so 10 epochs
RUN = [
    "schedule.epochs=10",
    "schedule.milestones=[7]",
    "evaluation.at_start=false",
    "evaluation.plots=false",
]


def _train(tmp: Path, name: str, *sets: str, resume: bool = False, max_steps: int | None = None):
    args = ["train", "--config", str(REPO / "configs/synthetic/bot.yaml")]
    args += [f"--set={s}" for s in (*TINY, *RUN, *sets)]
    args += [
        f"--set=data.synthetic.cache_dir={tmp / 'cache'}",
        f"--set=logging.output_dir={tmp / 'runs'}",
        f"--set=logging.run_name={name}",
    ]
    args += ["--resume", "auto"] if resume else []
    args += ["--max-steps", str(max_steps)] if max_steps else []
    done = _torchrun(2, args, tmp)
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
def test_zero_loss_curve_equals_ddp_over_20_steps(runs, stage):
    state = load_checkpoint(CheckpointManager(runs[stage]).latest())
    assert state["strategy"]["deepspeed"]["zero_stage"] == int(stage[-1])
    ddp, ds = losses(runs["ddp"]), losses(runs[stage])
    assert sorted(ddp) == sorted(ds) == list(range(1, STEPS + 1))
    worst = max(abs(ds[s] - ddp[s]) / abs(ddp[s]) for s in ddp)
    print(f"{stage}: largest relative loss difference to DDP over {STEPS} steps: {worst:.2e}")
    assert worst <= 1e-5


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
def test_bf16_zero2_and_fp32_zero3_train_a_few_steps(tmp_path):
    bf16 = _deepspeed("configs/deepspeed/zero2_bf16.json", "engine.precision=bf16")
    for name, sets in (("bf16", bf16), ("zero3", _deepspeed("configs/deepspeed/zero3.json"))):
        run = _train(tmp_path, name, *sets, max_steps=3)
        values = losses(run)
        assert sorted(values) == [1, 2, 3] and all(v == v and v < 1e3 for v in values.values())
        state = load_checkpoint(CheckpointManager(run).latest())
        assert state["strategy"]["deepspeed"]["world_size"] == 2
        assert all(v.numel() > 0 for v in state["strategy"]["model"].values()), name


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
