"""bench/gpu_check.sh on a machine without a GPU: exit 0, a JSON that says no GPU was found and why
every GPU step was skipped; carried wheel parts joined and installed offline where later steps see
them; a step past its timeout killed with what it started; the outputs read into numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = [
    "wheels",
    "environment",
    "build-cython",
    "build-cuda",
    "gpu-tests",
    "sanitizer",
    "fused-vs-gemm",
    "train-step",
    "dali-loader",
    "rerank",
]
GPU_STEPS = STEPS[3:]

#: These check what happens where no GPU is; on a GPU machine the same call runs the GPU steps.
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


@pytest.fixture
def bench_modules(monkeypatch):
    """bench/gpu_check.py and gpu_check_report.py, imported as the script imports them."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check
    import gpu_check_report

    return gpu_check, gpu_check_report


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """bash bench/gpu_check.sh with this interpreter first on PATH (as python3 is on a GPU
    machine); the process and its JSON report."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return proc, json.loads((out / "gpu_check.json").read_text())


@no_gpu
def test_cpu_machine_exits_0_says_no_gpu_and_why_each_gpu_step_was_skipped(tmp_path):
    out = tmp_path / "out"
    proc, report = run_check(out, "--skip-build", "--wheels", str(tmp_path / "none"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["gpu_found"] is False and report["device"] == "no GPU"
    assert "no GPU found" in report["headline"] and "no GPU found" in proc.stdout
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == STEPS
    env = steps["environment"]
    assert env["status"] == "ok" and env["results"]["cuda_available"] is False
    assert env["results"]["packages"]["torch"]["importable"] is True
    assert (
        steps["wheels"]["status"] == "skipped"
        and str(tmp_path / "none") in steps["wheels"]["reason"]
    )
    assert (steps["build-cython"]["status"], steps["build-cython"]["reason"]) == (
        "skipped",
        "--skip-build given",
    )
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped", steps[name]
        assert steps[name]["reason"].startswith("no GPU found (torch.cuda.is_available() is False")
    # the markdown entry: heading, command, one row per step; no temporary files left behind
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("## gpu_check, ") and "`bash bench/gpu_check.sh --out " in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "|---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == STEPS
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "logs"]


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (PEP 427): one module and its dist-info."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@no_gpu
def test_carried_wheel_parts_are_joined_installed_offline_and_seen_by_later_steps(tmp_path):
    # As ../shared/tools/gpu-wheels.sh packs them: a tar stream of the wheels, split into parts.
    staging, wheels = tmp_path / "staging", tmp_path / "gw"
    staging.mkdir()
    wheels.mkdir()
    make_wheel(staging, "gpucheck_probe", "0.3")
    (staging / "padding.bin").write_bytes(os.urandom(30_000))  # makes several parts
    subprocess.run(
        f"tar cf - * | split -b 10k -d - {wheels}/p", shell=True, cwd=staging, check=True
    )
    assert len(list(wheels.glob("p*"))) >= 3
    site, out = tmp_path / "site", tmp_path / "out"
    args = ("--wheels", str(wheels), "--site", str(site), "--only", "wheels", "--skip-build")
    proc, report = run_check(out, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels_step, env = report["steps"][0], report["steps"][1]
    assert wheels_step["status"] == "ok", wheels_step
    assert wheels_step["results"]["installed"] == ["gpucheck_probe-0.3-py3-none-any.whl"]
    assert len(wheels_step["results"]["parts_joined"]) >= 3
    assert (site / "gpucheck_probe.py").read_text() == "VALUE = 42\n"
    # the environment step, a separate process, finds the distribution on its path
    assert env["results"]["carried"] == {"gpucheck_probe": "0.3"}
    reasons = {s["name"]: s["reason"] for s in report["steps"][2:]}
    assert reasons.pop("build-cuda").startswith("no GPU found")  # run for the steps that need it
    assert set(reasons.values()) == {"not selected (--only)"}
    # a second call on the same machine installs nothing again
    proc, report = run_check(tmp_path / "again", *args)
    assert report["steps"][0]["results"]["installed"] == []
    assert report["steps"][0]["results"]["already_installed"] == [
        "gpucheck_probe-0.3-py3-none-any.whl"
    ]


def test_a_step_past_its_timeout_is_killed_and_the_others_still_run(tmp_path):
    proc, report = run_check(tmp_path / "out", "--skip-build", "--timeout-environment", "1")
    assert proc.returncode == 1  # a timeout is a failure of the check
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["environment"]["status"] == "timeout"
    assert steps["environment"]["reason"].startswith("killed after 1 s")
    assert [s["name"] for s in report["steps"]] == STEPS
    assert steps["build-cuda"]["reason"].startswith("no GPU found (the environment step did not")


def test_a_timeout_ends_the_whole_process_group_of_the_step(tmp_path, bench_modules):
    gpu_check, _ = bench_modules
    args = gpu_check.argparse.Namespace(out=str(tmp_path), budget_s=60, cache=str(tmp_path))
    check = gpu_check.Check(args)
    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    tic = time.monotonic()
    with pytest.raises(gpu_check.StepTimeout, match="killed after 1 s"):
        check.run(["bash", "-c", script], "sleeper", timeout=1)
    assert time.monotonic() - tic < 10
    pid = int(pid_file.read_text())
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or a zombie


def test_junit_counts_tell_failures_from_tests_a_missing_optional_package_kept_out(
    tmp_path, bench_modules
):
    _, report = bench_modules
    (tmp_path / "test_mixed.py").write_text(
        textwrap.dedent(
            """
            import pytest

            def test_passes():
                pass

            def test_fails():
                assert False

            @pytest.mark.skip(reason="no GPU")
            def test_skipped():
                pass
            """
        )
    )
    # pydantic_core is installed here, so this names a missing module of an optional package
    (tmp_path / "test_needs_carried.py").write_text("import pydantic_core._not_carried_here\n")
    (tmp_path / "test_broken.py").write_text("import a_module_nobody_has\n")
    junit = tmp_path / "junit.xml"
    pytest_args = ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args, "-o", "addopts=", f"--junit-xml={junit}"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    counts = report.junit_counts(junit)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped")} == {
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
    }
    assert any(name.endswith("test_fails") for name in counts["failing"])
    assert any("test_broken" in name for name in counts["failing"])
    assert list(counts["unavailable"].values()) == ["missing pydantic_core._not_carried_here"]


LOADER_OUTPUT = """synthetic Market-format data set: /tmp/x
| loader | img/s | / torch 8 workers |
|---|---|---|
| torch (PIL), 8 workers | 2950 | 1.00 |
| DALI (nvJPEG + GPU ops), 1 pipeline(s) x 16 thread(s), 0 Python workers | 23600 | 8.00 |
1602 train JPEGs, 256x128 output, batch 64, BoT augmentation; DALI / best torch loader: 8.00
"""
RERANK_OUTPUT = """| case | Q x G | time s | time / baseline | peak mem MiB | mAP |
|---|---|---|---|---|---|
| baseline: distances only | 3368 x 15913 | 0.50 | 1.00 | 628 | 0.5865 |
| sparse rerank, full Q x G | 3368 x 15913 | 4.00 | 8.00 | 758 | 0.6521 |
| sparse rerank, blocks ranked | 3368 x 15913 | 5.00 | 10.00 | 493 | 0.6521 |
clustered features, 2048-d float32, euclidean; max |dense - sparse| at the small size: 7.5e-16
"""


def test_bench_outputs_are_read_into_numbers_and_ratios(bench_modules):
    _, report = bench_modules
    results, summary = report.loader_summary(LOADER_OUTPUT)
    assert results["dali_over_best_torch"] == pytest.approx(23600 / 2950)
    assert summary == "DALI 23600 img/s = 8.00x the best torch loader (2950)"
    assert results["table"][-1].startswith("1602 train JPEGs") and results["table"][-2] == ""

    results, summary = report.rerank_summary(RERANK_OUTPUT)
    assert results["cases"]["sparse rerank, blocks ranked"]["seconds"] == 5.0
    assert results["max_dense_sparse_diff"] == 7.5e-16
    assert summary.startswith("sparse rerank (blocks ranked) 5.00 s = 10.0x distances only")

    bench = {
        "aggregate": {
            "compute": {"img_per_s": 2400.0},
            "loaders": {
                "torch": {
                    "loader_only": {"img_per_s": 3000.0},
                    "end_to_end": {"img_per_s": 1800.0},
                },
                "dali": {
                    "loader_only": {"img_per_s": 24000.0},
                    "end_to_end": {"img_per_s": 2280.0},
                },
            },
        },
        "settings": {"backbone": "resnet50", "height": 256, "width": 128, "precision": "bf16"},
    }
    results, summary = report.train_summary(bench)
    assert results["loaders"]["torch"]["end_to_end_over_compute"] == pytest.approx(0.75)
    assert results["loaders"]["dali"]["end_to_end_over_compute"] == pytest.approx(0.95)
    assert summary == (
        "compute-only 2400 img/s; torch loader + step 1800 (0.75), alone 3000; "
        "dali loader + step 2280 (0.95), alone 24000"
    )
    with pytest.raises(ValueError, match="no DALI or torch row"):
        report.loader_summary(LOADER_OUTPUT.replace("DALI", "other"))


def cpu_kernel(
    qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine", max_rank=50, query_tile=1024
):
    """A CPU stand-in for ``ranking_cuda.evaluate_features_cuda``: the same metrics, through the
    numpy ranking backend."""
    from hpc_reid.evaluation.distances import evaluate_features

    ids = (q_pids, g_pids, q_cams, g_cams)
    return evaluate_features(
        qf, gf, *ids, metric=metric, max_rank=max_rank, query_tile=query_tile, backend="numpy"
    )


def test_kernel_steps_run_on_a_cpu_stand_in_and_their_cross_checks_catch_a_wrong_kernel(
    tmp_path, monkeypatch
):
    import numpy as np

    from hpc_reid.evaluation import ranking_cuda

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check_steps

    monkeypatch.setattr(ranking_cuda, "load_kernel", lambda: None)
    monkeypatch.setattr(ranking_cuda, "evaluate_features_cuda", cpu_kernel)
    result = tmp_path / "result.json"
    small = ["fused-small", "--device", "cpu", "--result", str(result)]
    sizes = ["--queries", "60", "--gallery", "500", "--dim", "32", "--query-tile", "16"]
    big = ["fused-vs-gemm", "--device", "cpu", *sizes, "--repeats", "1", "--check-queries", "20"]
    big += ["--result", str(result)]

    assert gpu_check_steps.main(big) == 0
    r = json.loads(result.read_text())
    assert r["check_ok"] and r["check_mAP_abs_diff"] == 0 and r["check_queries"] == 20
    assert r["fused_over_gemm_fp32"] == pytest.approx(r["fused_s"] / r["gemm_fp32_s"])
    assert 0 < r["fused_mAP"] < 1
    import gpu_check_report

    step = {"name": "fused-vs-gemm", "status": "ok", "seconds": 1.0, "summary": "s", "results": r}
    report = {"started": "2026-12-06T02:00:00+00:00", "device": "X", "command": "c"}
    report.update(elapsed_s=1.0, budget_s=450.0, headline="h", steps=[step])
    md = gpu_check_report.markdown(report, {})
    row = next(line for line in md.splitlines() if line.startswith("| fused kernel"))
    assert row.endswith(f"| {r['fused_s']:.4f} | {r['fused_over_gemm_fp32']:.2f} |")
    assert gpu_check_steps.main(small) == 0
    r = json.loads(result.read_text())
    assert r["equals_cpu"] and len(r["cases"]) == 4

    def wrong_kernel(qf, gf, q_pids, *rest, **kwargs):  # ranks against the wrong identities
        return cpu_kernel(qf, gf, np.roll(q_pids, 1), *rest, **kwargs)

    monkeypatch.setattr(ranking_cuda, "evaluate_features_cuda", wrong_kernel)
    assert gpu_check_steps.main(big) == 1
    assert json.loads(result.read_text())["check_ok"] is False
    assert gpu_check_steps.main(small) == 1
    assert json.loads(result.read_text())["equals_cpu"] is False


FAKE_SANITIZER = """#!/bin/bash
# compute-sanitizer as seen with CUDA libraries in the process: their driver probes fail by design
# and count as errors unless API error reports are off; MODE=unsupported: a GPU it refuses.
if [ "$FAKE_SANITIZER_MODE" = unsupported ]; then
    echo "========= Error: Device not supported"; exit 1
fi
case " $* " in
    *" --report-api-errors no "*) ;;
    *) echo "========= Program hit CUDA_ERROR_NOT_FOUND on CUDA API call to cuGetProcAddress"
       echo "========= ERROR SUMMARY: 1 error"; exit 86 ;;
esac
case " $* " in
    *" racecheck "*)
        echo "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)" ;;
    *) echo "========= ERROR SUMMARY: 0 errors" ;;
esac
"""


def test_sanitizer_counts_kernel_errors_not_driver_probes_and_skips_a_gpu_it_refuses(
    tmp_path, bench_modules, monkeypatch
):
    gpu_check, _ = bench_modules
    tool = tmp_path / "compute-sanitizer"
    tool.write_text(FAKE_SANITIZER)
    tool.chmod(0o755)
    args = gpu_check.argparse.Namespace(
        out=str(tmp_path / "out"), budget_s=60, cache=str(tmp_path), timeout_sanitizer=30
    )
    check = gpu_check.Check(args)
    check.env = {"cuda_available": True, "compute_sanitizer": str(tool)}
    check.kernel_built = True
    results, summary = check.step_sanitizer()
    assert results["memcheck"]["errors"] == 0 and results["racecheck"]["errors"] == 0
    assert summary.startswith("memcheck 0 errors, racecheck 0 errors")
    monkeypatch.setenv("FAKE_SANITIZER_MODE", "unsupported")
    with pytest.raises(gpu_check.SkipStep, match="does not support this machine's GPU"):
        check.step_sanitizer()
