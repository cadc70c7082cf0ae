"""Stages (hpc_reid/engine/stages.py, ``train --then``) on tiny synthetic data: ``model.init_from``
loads exactly another run's weights and nothing else, from every kind of checkpoint we write, and
refuses another architecture or data set naming the keys; a stage-2 run resumes itself, never stage
1, bit-exact; ``--then`` chains the stages, resumes the unfinished one and skips finished ones, in
one process and on 2 gloo ranks under torchrun and SLURM."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc_reid.cli import main as cli_main
from hpc_reid.config import load_config
from hpc_reid.engine import trainer
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.deepspeed_strategy import export_weights
from hpc_reid.engine.errors import CheckpointError
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.stages import SHOWN, init_weights_from
from hpc_reid.engine.trainer import model_meta, train
from hpc_reid.models import build_model
from tests.ports import free_port
from tests.tiny import TINY_BATCH, TINY_DATA, TINY_SCHEDULE

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
BOT = REPO / "configs/synthetic/bot.yaml"
#: tests/engine/test_trainer.py's TINY run without its schedule, which the stage files set (a
#: --set would reach every stage of a chain)
TINY = [
    *TINY_DATA,
    "model.backbone=osnet_x0_25",
    *TINY_BATCH,
    "evaluation.every_epochs=0",
    "evaluation.plots=false",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.log_every=1",
    "engine.device=cpu",
]
CPU = torch.device("cpu")
STAGE1_STEPS = 12  # 8 training ids, P=2: 4 batches per epoch, 3 epochs
STAGE2_STEPS = 16  # 4 epochs


def write_stage_files(folder: Path) -> tuple[Path, Path]:
    """stage1.yaml (the synthetic BoT job, 3 epochs) and stage2.yaml inheriting it with ``_base_``
    (its own name, so its own run folder; another schedule and learning rate)."""
    s1, s2 = folder / "stage1.yaml", folder / "stage2.yaml"
    schedule = dict(item.split("=", 1) for item in TINY_SCHEDULE)
    s1.write_text(
        f"_base_: {BOT}\nname: stage1\nschedule:\n"
        + "".join(f"  {k.split('.')[1]}: {v}\n" for k, v in schedule.items())
    )
    s2.write_text(
        "_base_: stage1.yaml\nname: stage2\noptimizer:\n  lr: 3.5e-4\n"
        "schedule:\n  epochs: 4\n  warmup_epochs: 0\n  milestones: []\n"
    )
    return s1, s2


def sets(tmp: Path, cache: Path) -> list[str]:
    return [*TINY, f"data.synthetic.cache_dir={cache}", f"logging.output_dir={tmp / 'runs'}"]


def stage_config(stage_file: Path, tmp: Path, cache: Path, *extra: str):
    return load_config(stage_file, [*sets(tmp, cache), *extra])


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights, read with torch.load (not the code under test)."""
    return torch.load(path, map_location="cpu", weights_only=False)["strategy"]["model"]


def files_and_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict:
    """A finished stage 1 (12 steps), its stage files and the synthetic data cache."""
    tmp = tmp_path_factory.mktemp("stages")
    s1, s2 = write_stage_files(tmp)
    cache = tmp / "cache"
    train(stage_config(s1, tmp, cache))
    run = tmp / "runs/stage1"
    final = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    return {"tmp": tmp, "s1": s1, "s2": s2, "cache": cache, "run": run, "final": final}


def _build(stage1: dict, tmp: Path, *extra: str) -> trainer._Run:
    config = stage_config(stage1["s2"], tmp, stage1["cache"], *extra)
    return trainer._Run.build(config, 0, 1, CPU, None)


def test_init_from_loads_exactly_the_stage1_weights_and_no_optimizer_schedule_or_sampler_state(
    stage1, tmp_path
):
    """Against the same stage-2 run built without init_from: only the weights differ, and they
    are the stage-1 file's, tensor for tensor."""
    saved = torch.load(stage1["final"], map_location="cpu", weights_only=False)
    assert saved["strategy"]["optimizer"]["state"] and saved["step"] == STAGE1_STEPS
    plain = _build(stage1, tmp_path, "logging.run_name=plain")
    plain_rng = torch.get_rng_state()
    staged = _build(stage1, tmp_path, f"model.init_from={stage1['final']}")
    try:
        assert torch.equal(torch.get_rng_state(), plain_rng)  # loading draws no random number
        own, fresh = staged.model.state_dict(), plain.model.state_dict()
        assert own.keys() == saved["strategy"]["model"].keys()
        for key, value in saved["strategy"]["model"].items():
            assert torch.equal(own[key], value), key
        assert any(not torch.equal(fresh[k], v) for k, v in own.items())  # not the seed's
        assert staged.optimizer.state_dict()["state"] == {}
        assert staged.optimizer.param_groups[0]["lr"] == plain.optimizer.param_groups[0]["lr"]
        assert staged.strategy.scheduler.state_dict() == plain.strategy.scheduler.state_dict()
        staged.restore_or_start()
        plain.restore_or_start()
        assert (staged.epoch, staged.step, staged.best) == (0, 0, None)
        assert staged.sampler.state_dict(0) == plain.sampler.state_dict(0)
        # the center loss's centers: the seed's, as in the plain run, not stage 1's trained ones
        centers, fresh_centers = staged.criterion.state_dict(), plain.criterion.state_dict()
        assert centers.keys() == fresh_centers.keys() == saved["criterion"].keys() != set()
        for key, value in centers.items():
            assert torch.equal(value, fresh_centers[key]), key
            assert not torch.equal(value, saved["criterion"][key]), key
    finally:
        staged.close()
        plain.close()


@pytest.mark.parametrize("kind", ["file", "run folder", "checkpoints folder", "latest", "best.pt"])
def test_init_from_accepts_every_name_of_a_checkpoint_and_loads_the_one_it_names(stage1, kind):
    run = stage1["run"]
    given = {
        "file": stage1["final"],
        "run folder": run,
        "checkpoints folder": run / "checkpoints",
        "latest": run / "checkpoints/latest",
        "best.pt": run / "checkpoints/best.pt",
    }[kind]
    expected = run / "checkpoints/best.pt" if kind == "best.pt" else stage1["final"]
    config = load_config(stage1["s1"], sets(stage1["tmp"], stage1["cache"]))
    torch.manual_seed(1)
    model = build_model(config.model, 8)
    line = init_weights_from(model, given, model_meta(config, 8, model))
    for key, value in weights_of(expected).items():
        assert torch.equal(model.state_dict()[key], value), key
    assert str(expected.resolve()) in line
    assert f"run stage1, epoch 3 of 3, step {STAGE1_STEPS}" in line
    assert "differs" not in line


def test_init_from_accepts_an_exported_checkpoint_and_notes_architecture_keys_that_differ(
    stage1, tmp_path
):
    """An export-weights file (model only) loads like the checkpoint it came from; a model key
    that changes no weight's shape (last_stride) is noted in the log line, not refused."""
    exported = export_weights(stage1["final"], tmp_path / "weights.pt")
    assert set(torch.load(exported, weights_only=False)["strategy"]) == {"model"}
    extra = "model.last_stride=2"
    config = load_config(stage1["s1"], [*sets(stage1["tmp"], stage1["cache"]), extra])
    model = build_model(config.model, 8)
    line = init_weights_from(model, exported, model_meta(config, 8, model))
    for key, value in weights_of(stage1["final"]).items():
        assert torch.equal(model.state_dict()[key], value), key
    assert f"exported from {stage1['final']}" in line
    assert "the model differs in last_stride: checkpoint 1, this run 2 (every weight fits)" in line


def _expected_mismatch(model, saved: dict[str, torch.Tensor]) -> tuple[list, list, dict]:
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = {k: (list(saved[k].shape), list(v.shape)) for k, v in own.items() if k in saved}
    return missing, unexpected, {k: s for k, s in shapes.items() if s[0] != s[1]}


def _assert_listed(message: str, keys: list[str], what: str) -> None:
    assert f"{len(keys)} {what}" in message
    for key in keys[:SHOWN]:
        assert key in message, key
    if len(keys) > SHOWN:
        assert f"({len(keys) - SHOWN} more)" in message


def test_init_from_refuses_another_backbone_naming_missing_unexpected_and_mismatched_keys(stage1):
    config = load_config(
        stage1["s1"], [*sets(stage1["tmp"], stage1["cache"]), "model.backbone=resnet18"]
    )
    model = build_model(config.model, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing, unexpected, shapes = _expected_mismatch(model, weights_of(stage1["final"]))
    assert missing and unexpected and shapes  # the test covers all three
    with pytest.raises(CheckpointError) as error:
        init_weights_from(model, stage1["final"], model_meta(config, 8, model))
    message = str(error.value)
    assert str(stage1["final"]) in message
    assert "backbone: checkpoint 'osnet_x0_25', this run 'resnet18'" in message
    _assert_listed(message, missing, "missing key(s)")
    _assert_listed(message, unexpected, "unexpected key(s)")
    assert f"{len(shapes)} shape mismatch(es)" in message
    key, (theirs, ours) = next(iter(shapes.items()))
    assert f"{key} {theirs} vs {ours}" in message
    for key, value in model.state_dict().items():  # refused before loading anything
        assert torch.equal(value, before[key]), key


def test_init_from_refuses_the_classifier_of_another_data_set_saying_so(stage1):
    config = load_config(stage1["s1"], sets(stage1["tmp"], stage1["cache"]))
    model = build_model(config.model, 10)
    missing, unexpected, shapes = _expected_mismatch(model, weights_of(stage1["final"]))
    assert not missing and not unexpected and len(shapes) == 1
    with pytest.raises(CheckpointError) as error:
        init_weights_from(model, stage1["run"], model_meta(config, 10, model))
    message = str(error.value)
    assert (
        "its ID classifier has 8 classes and this run's training set has 10 identities" in message
    )
    assert "another data set" in message
    ((key, (theirs, ours)),) = shapes.items()
    assert theirs[0] == 8 and ours[0] == 10
    assert f"1 shape mismatch(es) (checkpoint vs this model): {key} {theirs} vs {ours}" in message


def test_init_from_refuses_a_two_member_model_with_every_key_named_and_the_model_untouched(
    stage1,
):
    """Keys that differ by name only (no common key to compare shapes) are tried on a copy."""
    extra = [*sets(stage1["tmp"], stage1["cache"]), "model.members=2"]
    config = load_config(stage1["s1"], extra)
    model = build_model(config.model, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing, unexpected, shapes = _expected_mismatch(model, weights_of(stage1["final"]))
    assert missing and unexpected and not shapes
    with pytest.raises(CheckpointError) as error:
        init_weights_from(model, stage1["final"], model_meta(config, 8, model))
    _assert_listed(str(error.value), missing, "missing key(s)")
    _assert_listed(str(error.value), unexpected, "unexpected key(s)")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_init_from_loads_a_checkpoint_written_before_heads_had_names(stage1, tmp_path):
    """head.{pool,neck,classifier}.* were top-level modules before 2026-12-06: the model's
    load hook renames them, so such a checkpoint loads, tensor for tensor."""
    state = torch.load(stage1["final"], map_location="cpu", weights_only=False)
    new = state["strategy"]["model"]
    old_names = ("head.pool.", "head.neck.", "head.classifier.")
    old = {k.removeprefix("head.") if k.startswith(old_names) else k: v for k, v in new.items()}
    assert old.keys() != new.keys()
    state["strategy"]["model"] = old
    torch.save(state, tmp_path / "old.pt")
    config = load_config(stage1["s1"], sets(stage1["tmp"], stage1["cache"]))
    model = build_model(config.model, 8)
    init_weights_from(model, tmp_path / "old.pt", model_meta(config, 8, model))
    for key, value in new.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_init_from_refuses_a_raw_zero_folder_naming_its_checkpoint_and_the_export(stage1, tmp_path):
    """DeepSpeed's sharded folder holds no hpc-reid checkpoint: the error names the trainer's .pt
    written with it (same step) and the export-weights command."""
    folder = tmp_path / "run/checkpoints"
    folder.mkdir(parents=True)
    pt = folder / stage1["final"].name
    shutil.copy(stage1["final"], pt)
    tag = folder / f"deepspeed/step_{STAGE1_STEPS:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    config = load_config(stage1["s1"], sets(stage1["tmp"], stage1["cache"]))
    for given in (tag, tag.parent):
        with pytest.raises(CheckpointError) as error:
            init_weights_from(build_model(config.model, 8), given)
        message = str(error.value)
        assert "DeepSpeed's sharded ZeRO checkpoint" in message and str(tag) in message
        assert f"hpc-reid export-weights {pt} --out weights.pt" in message


def test_stage2_resume_auto_resumes_stage2_without_stage1s_file_bit_exact(stage1, tmp_path, capsys):
    """Stage 2 stopped by max_steps resumes from its own checkpoint, even with the file it started
    from deleted, and ends with the weights of an uninterrupted stage 2; stage 1's folder is not
    touched."""
    before = files_and_times(stage1["run"])
    start = tmp_path / "stage1_final.pt"
    shutil.copy(stage1["final"], start)
    for name in ("straight", "split"):
        config = stage_config(
            stage1["s2"],
            tmp_path,
            stage1["cache"],
            f"logging.run_name={name}",
            f"model.init_from={start}",
        )
        train(config, max_steps=6 if name == "split" else None)
    split = config
    start.unlink()
    capsys.readouterr()
    train(split, resume="auto")
    out = capsys.readouterr().out
    own = tmp_path / f"runs/split/checkpoints/epoch_0001_step_{6:08d}.pt"
    assert f"model.init_from={start} not loaded: resuming from {own}" in out
    a = load_checkpoint(CheckpointManager(tmp_path / "runs/straight").latest())
    b = load_checkpoint(CheckpointManager(tmp_path / "runs/split").latest())
    assert a["step"] == b["step"] == STAGE2_STEPS and b["epoch"] == 4
    for key, value in a["strategy"]["model"].items():
        assert torch.equal(value, b["strategy"]["model"][key]), key
    assert files_and_times(stage1["run"]) == before


def test_a_stage_starting_from_its_own_run_folder_is_refused(stage1, tmp_path):
    """A stage-2 config sharing stage 1's run folder (same name, no run name of its own) would
    make --resume auto continue stage 1: refused, stage 1's files untouched."""
    shutil.copytree(stage1["run"], tmp_path / "runs/stage1")
    before = files_and_times(tmp_path / "runs/stage1")
    config = stage_config(
        stage1["s2"],
        tmp_path,
        stage1["cache"],
        "logging.run_name=stage1",
        f"model.init_from={tmp_path / 'runs/stage1'}",
    )
    with pytest.raises(CheckpointError, match=r"in this run's own folder .*--resume auto would"):
        train(config, resume="auto")
    assert files_and_times(tmp_path / "runs/stage1") == before


# ------------------------------------------------------------------------------ train --then


def _metrics(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("rank-1", "rank-5", "mAP", "mINP")}


def test_then_runs_both_stages_resumes_the_unfinished_one_bit_exact_and_skips_finished_ones(
    stage1, tmp_path, capsys
):
    s1, s2 = write_stage_files(tmp_path)
    args = ["train", "--config", str(s1), "--then", str(s2)]
    args += [f"--set={s}" for s in sets(tmp_path, stage1["cache"])]
    runs = tmp_path / "runs"
    # stage 1 ends before step 14; stage 2 stops there, mid-epoch
    assert cli_main([*args, "--max-steps", "14"]) == 0
    final1 = runs / "stage1/checkpoints" / f"epoch_0003_step_{STAGE1_STEPS:08d}.pt"
    assert (runs / "stage1/results.json").is_file() and final1.is_file()
    assert load_checkpoint(CheckpointManager(runs / "stage2").latest())["step"] == 14
    assert not (runs / "stage2/results.json").exists()
    # stage 2 started from stage 1's final weights: its evaluation before training is stage 1's
    # final one, and its resolved config names the file
    assert load_config(runs / "stage2/config.yaml").model.init_from == str(final1)
    assert _metrics(runs / "stage2/results_start.json") == _metrics(runs / "stage1/results.json")
    assert load_config(runs / "stage2/config.yaml").optimizer.lr == 3.5e-4  # its own file
    # without --resume the chain refuses at once, naming stage 1's folder
    capsys.readouterr()
    assert cli_main(args) == 2
    assert f"run folder {(runs / 'stage1').resolve()} of stage {s1}" in capsys.readouterr().err
    # --resume auto: stage 1 skipped, stage 2 resumed to its end
    assert cli_main([*args, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"stage 1/2 ({s1}) already finished in {runs / 'stage1'}: skipped" in out
    assert "resumed from" in out and str(runs / "stage2/checkpoints") in out
    resumed = load_checkpoint(CheckpointManager(runs / "stage2").latest())
    assert resumed["step"] == STAGE2_STEPS and (runs / "stage2/results.json").is_file()
    # bit-exact against stage 2 uninterrupted from the same file
    straight = stage_config(s2, tmp_path, stage1["cache"], "logging.run_name=straight")
    straight.model.init_from = str(final1)
    train(straight)
    reference = weights_of(CheckpointManager(runs / "straight").latest())
    for key, value in reference.items():
        assert torch.equal(resumed["strategy"]["model"][key], value), key
    # both finished: both skipped, nothing written
    before = {name: files_and_times(runs / name) for name in ("stage1", "stage2")}
    capsys.readouterr()
    assert cli_main([*args, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "stage 1/2" in out and f"stage 2/2 ({s2}) already finished" in out
    assert out.count("skipped") == 2 and "resumed from" not in out
    assert {name: files_and_times(runs / name) for name in before} == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set=logging.run_name=x"], r"stages .*stage1\.yaml and .*stage2\.yaml both write"),
        (["--resume", "runs/x/checkpoints/latest"], "a chain resumes with auto only"),
        (["--launcher", "ray", "--num-workers", "2"], "not on Ray"),
        (["--then", "missing.yaml"], r"config file .*missing\.yaml not found"),
    ],
)
def test_then_refuses_before_any_training(tmp_path, capsys, extra, message):
    s1, s2 = write_stage_files(tmp_path)
    args = ["train", "--config", str(s1), "--then", str(s2)]
    args += [f"--set={s}" for s in sets(tmp_path, tmp_path / "cache")]
    assert cli_main([*args, *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def _torchrun_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_then_on_two_gloo_ranks_under_torchrun_chains_and_skips(stage1, tmp_path):
    """Every rank runs the chain in one process group: 2 ranks x P=2 give 2 batches per epoch,
    so stage 1 ends at step 6 and stage 2 (from it) at step 8; a second launch skips both."""
    s1, s2 = write_stage_files(tmp_path)
    args = ["train", "--config", str(s1), "--then", str(s2), "--resume", "auto"]
    args += [f"--set={s}" for s in sets(tmp_path, stage1["cache"])]

    def torchrun():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(free_port()), "-m", "hpc_reid.cli", *args]
        return subprocess.run(
            cmd, cwd=tmp_path, env=_torchrun_env(), capture_output=True, text=True, timeout=300
        )

    done = torchrun()
    assert done.returncode == 0, done.stderr[-4000:]
    runs = tmp_path / "runs"
    first = load_checkpoint(CheckpointManager(runs / "stage1").latest())
    second = load_checkpoint(CheckpointManager(runs / "stage2").latest())
    assert (first["step"], first["world_size"], second["step"]) == (6, 2, 8)
    final1 = runs / "stage1/checkpoints" / f"epoch_0003_step_{6:08d}.pt"
    assert second["config"]["model"]["init_from"] == str(final1)
    # stage 2's evaluation before training (sharded over its 2 ranks) is that of stage 1's saved
    # weights in one process. (Not stage 1's final evaluation: under DDP each rank's BatchNorm
    # statistics move with its own last batch, after DDP's broadcast, and the checkpoint holds
    # rank 0's.)
    again = evaluate_checkpoint(final1, out_dir=tmp_path / "eval")
    start = _metrics(runs / "stage2/results_start.json")
    assert start == pytest.approx({k: again[k] for k in start}, abs=1e-6)
    done = torchrun()
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("already finished") == 2  # printed by rank 0 only


@pytest.mark.slow
def test_init_from_a_bf16_deepspeed_checkpoint_loads_its_fp32_master_weights(stage1, tmp_path):
    """A ZeRO-2 bf16 run's .pt holds the 16-bit copy of the model: init_from gives the fp32
    master weights of its ZeRO shards instead, the ones export-weights writes."""
    pytest.importorskip(
        "deepspeed", reason="deepspeed is not installed (pip install '.[deepspeed]')"
    )
    s1, _ = write_stage_files(tmp_path)
    deepspeed = [
        "engine.strategy=deepspeed",
        "engine.deepspeed_config=configs/deepspeed/zero2_bf16.json",
        "engine.precision=bf16",
        "evaluation.at_start=false",
    ]
    args = ["train", "--config", str(s1), "--max-steps", "3"]
    args += [f"--set={s}" for s in (*sets(tmp_path, stage1["cache"]), *deepspeed)]
    # under torchrun's one-process launch: DeepSpeed wants LOCAL_RANK
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    cmd += ["--master_port", str(free_port()), "-m", "hpc_reid.cli", *args]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=_torchrun_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    pt = CheckpointManager(tmp_path / "runs/stage1").latest()
    sixteen = weights_of(pt)
    assert {v.dtype for v in sixteen.values() if v.is_floating_point()} == {torch.bfloat16}
    master = weights_of(export_weights(pt, tmp_path / "weights.pt"))
    config = load_config(s1, sets(tmp_path, stage1["cache"]))
    model = build_model(config.model, 8)
    line = init_weights_from(model, pt, model_meta(config, 8, model))
    assert "fp32 master weights consolidated from its DeepSpeed ZeRO shards" in line
    own = model.state_dict()
    for key, value in master.items():
        assert torch.equal(own[key], value.to(own[key].dtype)), key
    rounded = [k for k, v in sixteen.items() if v.is_floating_point() and v.numel() > 1]
    assert any(not torch.equal(own[k], sixteen[k].float()) for k in rounded)  # not the bf16 copy


@pytest.fixture(scope="module")
def slurm_node(tmp_path_factory):
    """tests/integration/test_slurm.py's throwaway one-node cluster (2 CPUs)."""
    from tests.integration.test_slurm import _cluster

    yield from _cluster(tmp_path_factory, ["node01"])


@pytest.mark.slow
def test_slurm_train_sh_then_survives_a_preemption_in_stage2(slurm_node, stage1, tmp_path):
    """`THEN=stage2.yaml sbatch slurm/train.sh` on 2 tasks: USR1 during stage 2 checkpoints and
    requeues; the requeued job skips stage 1 and resumes stage 2 to its end."""
    from tests.integration.test_slurm import TERMINAL

    s1, s2 = write_stage_files(tmp_path)
    s2.write_text(s2.read_text().replace("epochs: 4", "epochs: 30"))  # 60 steps: time to signal
    extra = [*TINY, f"data.synthetic.cache_dir={stage1['cache']}"]
    env = {
        **slurm_node.env,
        "CONFIG": str(s1),
        "THEN": str(s2),
        "EXTRA": " ".join(f"--set {s}" for s in extra),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    cmd = ["sbatch", "--parsable", "--ntasks-per-node=2", str(REPO / "slurm/train.sh")]
    job_id = slurm_node.run(*cmd, cwd=tmp_path, env=env).stdout.strip().split(";")[0]
    runs = tmp_path / "runs" / f"job-{job_id}"

    def output() -> str:
        return (tmp_path / f"hpc-reid-{job_id}.out").read_text()

    metrics = runs / "stage2/metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, output()
        assert slurm_node.job(job_id)["JobState"] not in TERMINAL, output()
        time.sleep(0.05)
    slurm_node.run("scancel", "--signal=USR1", job_id)
    requeued = slurm_node.wait(
        job_id, timeout_s=60, until=lambda j: j["JobState"] == "PENDING" and j["Restarts"] == "1"
    )
    assert requeued["JobState"] == "PENDING", output()
    # released as tests/integration/test_slurm.py does (SLURM holds a requeued job for 120 s)
    slurm_node.wait_idle()
    time.sleep(2.0)
    slurm_node.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = slurm_node.wait(job_id, timeout_s=180)
    text = output()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text
    assert f"stage 2/2 ({s2}) stopped at step" in text and "requeueing SLURM job" in text
    assert f"stage 1/2 ({s1}) already finished in runs/job-{job_id}/stage1: skipped" in text
    assert "resumed from" in text
    first = load_checkpoint(CheckpointManager(runs / "stage1").latest())
    second = load_checkpoint(CheckpointManager(runs / "stage2").latest())
    assert (first["step"], second["step"], second["world_size"]) == (6, 60, 2)
    assert (runs / "stage2/results.json").is_file()
