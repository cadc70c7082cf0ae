"""`hpc-reid bench` on real processes: one process writes a bench.json with every field; two
gloo ranks under torchrun give per-rank results, non-zero communication and the model's
prediction beside it; bad arguments exit with code 2 before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_reid.bench.runner import strong_scaled
from hpc_reid.cli import main
from hpc_reid.config import ConfigError, load_config
from tests.ports import free_port
from tests.tiny import TINY_DATA

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/synthetic/bot.yaml")
TINY = [
    *TINY_DATA,
    "sampler.num_identities=4",
    "sampler.num_instances=2",
    "loader.num_workers=0",
    "engine.device=cpu",
]
PHASE_KEYS = {
    "img_per_s",
    "seconds",
    "steps",
    "step_s",
    "data_wait_s",
    "forward_s",
    "backward_s",
    "forward_backward_s",
    "optimizer_s",
}


def bench_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"--set={s}" for s in [*TINY, f"data.synthetic.cache_dir={tmp_path / 'cache'}"]]
    return [
        "bench",
        "--config",
        CONFIG,
        *sets,
        "--steps",
        "2",
        "--warmup",
        "1",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_one_process_writes_every_field(tmp_path, capsys):
    out = tmp_path / "one"
    args = bench_args(tmp_path, out, "--loaders", "dali,torch", "--eval-size", "40,120")
    assert main(args) == 0
    assert "| compute-only |" in capsys.readouterr().out
    run = json.loads((out / "bench.json").read_text())
    env = run["environment"]
    assert env["world_size"] == 1 and env["nodes"] == 1 and env["launcher"] == "none"
    for key in ("date", "devices", "torch", "python", "hpc_reid", "dali", "backend", "node_names"):
        assert key in env, key
    st = run["settings"]
    assert st["loaders"] == ["dali", "torch"] and st["per_rank_batch"] == 8 and st["params"] > 0
    assert run["command"].startswith("hpc-reid bench --config")
    (rank,) = run["ranks"]
    assert set(rank["compute"]) == PHASE_KEYS
    for backend in ("dali", "torch"):
        assert set(rank["loaders"][backend]["end_to_end"]) == PHASE_KEYS
        assert rank["loaders"][backend]["loader_only"]["img_per_s"] > 0
        e2e = rank["loaders"][backend]["end_to_end"]
        parts = e2e["data_wait_s"] + e2e["forward_s"] + e2e["backward_s"] + e2e["optimizer_s"]
        assert 0.9 * e2e["step_s"] < parts <= e2e["step_s"] * 1.0001
    ev = rank["eval"]
    assert ev["queries_local"] == 40 and ev["gallery_local"] == 120 and ev["seconds"] > 0
    assert ev["peak_memory_gib"] >= ev["memory_before_gib"] > 0
    assert "comm" not in rank and "compute_no_sync" not in rank  # one rank: nothing to sync
    agg = run["aggregate"]
    assert agg["compute"]["img_per_s"] == pytest.approx(rank["compute"]["img_per_s"])
    assert set(agg["loaders"]) == {"dali", "torch"}


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun_report_per_rank_and_communication(tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = bench_args(tmp_path, out, "--loaders", "torch", "--eval-size", "30,90")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "hpc_reid.cli",
        *args,
        "--scaling",
        "strong",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| compute-only |") == 1  # rank 0 prints the table
    run = json.loads((out / "bench.json").read_text())
    env_ = run["environment"]
    assert env_["world_size"] == 2 and env_["backend"] == "gloo" and env_["launcher"] == "torchrun"
    assert [r["rank"] for r in run["ranks"]] == [0, 1]
    # strong scaling: P=4 of the config is the global batch's, 2 identities per rank
    st = run["settings"]
    assert st["num_identities"] == 2 and st["per_rank_batch"] == 4 and st["global_batch"] == 8
    for rank in run["ranks"]:
        assert rank["comm"]["allreduce_s"] > 0 and rank["comm"]["buckets"] >= 1
        assert "exposed_s" in rank["comm"] and set(rank["compute_no_sync"]) == PHASE_KEYS
        assert rank["eval"]["queries_local"] == 15 and rank["eval"]["gallery_local"] == 45
    agg = run["aggregate"]
    total = sum(r["compute"]["img_per_s"] for r in run["ranks"])
    assert agg["compute"]["img_per_s"] == pytest.approx(total)
    model = agg["comm"]["model"]
    assert model["measured_allreduce_s"] > 0 and model["predicted_allreduce_s"] > 0
    assert model["latency_us"] >= 0


@pytest.mark.slow
def test_two_ray_train_workers_report_per_rank_and_communication(tmp_path):
    pytest.importorskip("ray.train.torch", reason="Ray Train is not installed (extra 'ray')")
    out = tmp_path / "ray"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        env.pop(key, None)
    args = bench_args(tmp_path, out, "--loaders", "torch", "--eval-size", "30,90")
    cmd = [sys.executable, "-m", "hpc_reid.cli", *args, "--launcher", "ray", "--num-workers", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| compute-only |") == 1  # the driver prints rank 0's table
    run = json.loads((out / "bench.json").read_text())
    env_ = run["environment"]
    assert env_["world_size"] == 2 and env_["backend"] == "gloo" and env_["launcher"] == "ray"
    assert [r["rank"] for r in run["ranks"]] == [0, 1]
    for rank in run["ranks"]:
        assert rank["comm"]["allreduce_s"] > 0 and set(rank["compute"]) == PHASE_KEYS
        assert rank["eval"]["queries_local"] == 15 and rank["eval"]["gallery_local"] == 45


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-workers", "2"], "--num-workers need(s) --launcher ray"),
        (["--launcher", "ray"], "needs --num-workers N"),
        (["--loaders", "dali,pil"], "unknown loader 'pil'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--eval-size", "10"], "expected QUERIES,GALLERY"),
        (["--eval-size", "10,0"], "both > 0"),
        (["--set", "engine.strategy=deepspeed"], "measures the DDP strategy"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(tmp_path, capsys, extra, message):
    assert main([*bench_args(tmp_path, tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bench_without_config_is_an_error(capsys):
    assert main(["bench", "--steps", "3"]) == 2
    assert "give --config" in capsys.readouterr().err


def test_strong_scaling_divides_identities_by_the_world_size():
    config = load_config(CONFIG, ["sampler.num_identities=16"])
    assert strong_scaled(config, 4).sampler.num_identities == 4
    assert config.sampler.num_identities == 16
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        strong_scaled(config, 3)


@pytest.mark.slow
def test_a_process_group_initialised_by_the_caller_is_used_and_left_alone(tmp_path):
    """As under Ray Train: the group exists before run_bench and still exists after it."""
    import torch.distributed as dist

    from hpc_reid.bench.runner import run_bench

    config = load_config(CONFIG, [*TINY, f"data.synthetic.cache_dir={tmp_path / 'cache'}"])
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        report = run_bench(config, steps=1, warmup=0, loaders="none", eval_query=0, eval_gallery=0)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    assert report["environment"]["launcher"] == "external"
    assert report["environment"]["backend"] == "gloo" and report["settings"]["loaders"] == []
    assert report["aggregate"]["compute"]["img_per_s"] > 0


def test_a_method_whose_losses_read_batch_fields_benches_with_them(tmp_path):
    """SAN's texture loss reads the batch field 'texture': the bench's fixed batch and its loader
    phase both hand the fields to the loss terms, as the trainer does."""
    from hpc_reid.bench.runner import run_bench

    sets = [*TINY, "sampler.num_instances=4", "model.san.texture_size=[16,8]"]
    config = load_config(
        REPO / "configs/synthetic/san.yaml",
        [*sets, f"data.synthetic.cache_dir={tmp_path / 'cache'}"],
    )
    report = run_bench(config, steps=1, warmup=0, loaders="torch", eval_query=0, eval_gallery=0)
    assert report["aggregate"]["compute"]["img_per_s"] > 0
    assert report["ranks"][0]["loaders"]["torch"]["end_to_end"]["steps"] == 1


def test_a_video_config_benches_tracklets_through_both_loaders_and_reports_frames(tmp_path):
    """A video set's sample is a tracklet: the fixed batch is (B, T, C, H, W) with channels_last
    frames, both loaders give tracklet batches, and the table counts tracklets and T x frames."""
    from hpc_reid.bench.report import run_markdown
    from hpc_reid.bench.runner import run_bench

    tiny = [
        "data.synthetic.ids=8",
        "data.synthetic.cams=2",
        "data.synthetic.frames_per_tracklet=[3,5]",
        "data.synthetic.distractors=1",
        "data.synthetic.junk=1",
        "data.height=64",
        "data.width=32",
        "data.video.seq_len=3",
        "sampler.num_identities=2",
        "sampler.num_instances=2",
        "loader.num_workers=0",
        "engine.device=cpu",
        "engine.channels_last=true",
        f"data.synthetic.cache_dir={tmp_path / 'cache'}",
    ]
    config = load_config(REPO / "configs/synthetic/video.yaml", tiny)
    report = run_bench(
        config, steps=1, warmup=0, loaders="torch,dali", eval_query=0, eval_gallery=0
    )
    rank = report["ranks"][0]
    assert rank["frames_per_sample"] == 3
    assert set(rank["loaders"]) == {"torch", "dali"}
    table = run_markdown(report)
    assert "tracklets/s (all ranks) | frames/s (T=3)" in table
    ips = report["aggregate"]["compute"]["img_per_s"]
    assert f"| compute-only | {ips:.0f} | {ips * 3:.0f} | 1.00 |" in table
