"""The GPU check: what runs first on a GPU machine, in one call of at most 8 minutes, with one JSON
and one markdown table as its result. Run it through ``bash bench/gpu_check.sh --out DIR``.

Steps, in order of value; each runs in its own process group under its own timeout, cut to what
is left of ``--budget-s``, so that one hang cannot eat the call; a missing optional part (no GPU,
no DALI, no pydantic, no compute-sanitizer) skips the steps that need it, with the reason:

1. ``wheels``: installs the wheels carried to ``--wheels`` (parts made by
   ``../shared/tools/gpu-wheels.sh`` are joined and unpacked first) into ``--site``, offline;
2. ``environment``: GPU, driver, torch, CUDA, tools, which packages import;
3. ``build-cython`` (``setup.py build_ext --inplace``) and ``build-cuda`` (the fused ranking
   kernel through ``ranking_cuda.load_kernel``, timed);
4. ``gpu-tests``: the ``gpu``-marked tests of the files named in GPU_TEST_FILES that exist (DALI's
   only where DALI imports), junit counts;
5. ``sanitizer``: compute-sanitizer memcheck and racecheck on small fused-kernel calls;
6. ``fused-vs-gemm``: the fused kernel against the bare distance GEMM at MSMT17 size;
7. ``train-step``: ResNet-50 256x128 bf16 channels_last, compute-only and end to end with the
   torch loader (and DALI), through ``hpc-reid bench`` on the synthetic set;
8. ``dali-loader``: ``bench/loader_bench.py --device cuda``;
9. ``rerank``: ``bench/rerank_bench.py --device cuda`` at Market-1501 size.

Without a GPU the first three run and the rest are skipped; the exit status is 0 unless a step
that ran failed or timed out. ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten
atomically after every step, so a call cut short still leaves the steps done so far; each step's
output is in ``DIR/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_check_report import (
    junit_counts,
    loader_summary,
    markdown,
    rerank_summary,
    table_lines,
    train_summary,
)

REPO = Path(__file__).resolve().parents[1]
STEPS_SCRIPT = REPO / "bench" / "gpu_check_steps.py"
#: The whole call must end within 8 minutes; this leaves room for Python's start and the copy back.
DEFAULT_BUDGET_S = 450.0
#: Kept back from every step's timeout for writing the report after it.
RESERVE_S = 5.0
#: A step is not started with less than this left of the budget.
MIN_STEP_S = 10.0
GPU_TEST_FILES = [
    "tests/evaluation/test_cuda_kernel.py",
    "tests/evaluation/test_backends.py",
    "tests/evaluation/test_gpu_eval.py",
    "tests/engine/test_gpu_step.py",
    "tests/engine/test_optim.py",
    "tests/data/test_dali_loader.py",  # only where nvidia.dali imports
]
#: Steps that run even when --only leaves them out: the others need their results (the installed
#: wheels on the path, the machine's description, the built kernel; all quick on a second call).
PREREQUISITES = {"wheels", "environment", "build-cuda"}
CARRY_HINT = (
    "carry it with ../shared/tools/gpu-wheels.sh (`deepspeed` packs pydantic and its dependencies, "
    "`dali` packs DALI) and pass --wheels"
)


class SkipStep(Exception):
    """The step cannot run here (a missing part); its message is the reason."""


class StepFailed(Exception):
    """The step ran and failed; its message says how."""


class StepTimeout(Exception):
    """The step's process was killed at its timeout."""


@dataclass
class Child:
    rc: int | None  # None: killed at the timeout
    seconds: float
    log: Path

    def tail(self, chars: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def kill_group(proc: subprocess.Popen) -> None:
    """End a step's process and everything it started (its own process group): TERM, a few
    seconds to exit, then KILL for whatever is left of the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    if proc.poll() is None:  # not a group leader after all
        proc.kill()
        proc.wait()


def parsed(what: str, read, output):
    """``read(output)``; a format it does not know fails the step, naming the output."""
    try:
        return read(output)
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise StepFailed(f"could not read {what}'s output: {type(exc).__name__}: {exc}") from exc


class Check:
    """One run of the GPU check: the steps, their results, the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.steps: list[dict[str, Any]] = []
        self.env: dict[str, Any] = {}
        self.pythonpath = [str(REPO)]
        self.installed: list[str] = []
        self.kernel_built = False

    # --- running children ---------------------------------------------------------------------

    def child_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        paths = [*self.pythonpath, *filter(None, [env.get("PYTHONPATH")])]
        env.update(
            PYTHONPATH=os.pathsep.join(paths),
            HPC_REID_CACHE=str(self.args.cache),
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
        )
        nvcc = self.env.get("nvcc")
        if nvcc and str(Path(nvcc).parent) not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{env.get('PATH', '')}"
            env.setdefault("CUDA_HOME", str(Path(nvcc).parents[1]))
        env.update(extra)
        return env

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def run(self, cmd: list[str], log: str, timeout: float, **env: str) -> Child:
        """Run ``cmd`` in the repository, output to logs/LOG.log, killed (with its process group)
        at ``timeout`` or when the budget ends, whichever is first."""
        if self.remaining() < MIN_STEP_S:
            raise SkipStep(f"time budget spent ({self.args.budget_s:.0f} s, --budget-s)")
        timeout = min(timeout, self.remaining())
        path = self.logs / f"{log}.log"
        with path.open("w") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            tic = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=self.child_env(**env),
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so a timeout ends all of it
            )
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                rc = None
        child = Child(rc, time.monotonic() - tic, path)
        if rc is None:
            raise StepTimeout(f"killed after {timeout:.0f} s; log {path.relative_to(self.out)}")
        return child

    def fail(self, child: Child, what: str) -> StepFailed:
        """The failure of a child, or a skip when it stopped on a package that is not here (a
        missing optional part, named in the reason)."""
        tail = child.tail()
        missing = re.findall(r"ModuleNotFoundError: No module named '([\w.]+)'", tail)
        if missing and not missing[-1].startswith("hpc_reid"):
            raise SkipStep(f"{what} needs {missing[-1]}, which does not import here; {CARRY_HINT}")
        return StepFailed(f"{what} exit {child.rc}: ...{tail}")

    def python_step(self, step: str, timeout: float, *extra: str) -> dict[str, Any]:
        """One step of gpu_check_steps.py; its JSON result (also when it exits 1 on a wrong
        answer, which then fails the step)."""
        result = self.logs / f"{step}.json"
        result.unlink(missing_ok=True)
        child = self.run(
            [sys.executable, str(STEPS_SCRIPT), step, "--result", str(result), *extra],
            step,
            timeout,
        )
        if not result.is_file():
            raise self.fail(child, f"gpu_check_steps.py {step}")
        data = json.loads(result.read_text())
        if child.rc != 0:
            raise StepFailed(f"exit {child.rc}: wrong result {json.dumps(data)[:1000]}")
        return data

    # --- what the steps need --------------------------------------------------------------------

    def importable(self, module: str) -> bool:
        return bool(self.env.get("packages", {}).get(module, {}).get("importable"))

    def need_module(self, module: str) -> None:
        if not self.importable(module):
            error = self.env.get("packages", {}).get(module, {}).get("error") or "not installed"
            raise SkipStep(
                f"{module} does not import here ({error}); on a GPU machine, {CARRY_HINT}"
            )

    @property
    def gpu(self) -> bool:
        return bool(self.env.get("cuda_available"))

    def need_gpu(self) -> None:
        if not self.gpu:
            raise SkipStep(f"no GPU found ({self.no_gpu_reason()})")

    def no_gpu_reason(self) -> str:
        if not self.env:
            return "the environment step did not succeed"
        smi = self.env.get("nvidia_smi")
        return (
            f"torch.cuda.is_available() is {self.env.get('cuda_available')}; "
            f"nvidia-smi: {smi or 'not found'}"
        )

    def need_kernel(self) -> None:
        self.need_gpu()
        if not self.kernel_built:
            raise SkipStep("the fused CUDA kernel was not built (see build-cuda)")

    # --- the steps ------------------------------------------------------------------------------

    def step_wheels(self) -> tuple[dict, str]:
        wheels_dir, site = Path(self.args.wheels), Path(self.args.site)
        marker = site / ".gpu_check_installed"
        if not wheels_dir.is_dir():
            if marker.is_file():  # installed by an earlier call on this machine
                self.pythonpath.append(str(site))
            raise SkipStep(f"no wheels folder {wheels_dir} (--wheels); {CARRY_HINT}")
        folders = [wheels_dir, *sorted(p for p in wheels_dir.iterdir() if p.is_dir() and p != site)]
        unpacked = []
        for folder in folders:  # gpu-wheels.sh's parts: a tar stream split into p00, p01, ...
            parts = sorted(p for p in folder.glob("p[0-9]*") if p.is_file())
            if parts:
                cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
                tar = subprocess.run(
                    ["tar", "x", "-i", "-C", str(folder)],
                    stdin=cat.stdout,
                    capture_output=True,
                    text=True,
                    timeout=max(MIN_STEP_S, self.remaining()),
                )
                cat.wait()
                if tar.returncode != 0:
                    raise StepFailed(f"tar x of {[p.name for p in parts]}: {tar.stderr[-500:]}")
                unpacked += [str(p.relative_to(wheels_dir)) for p in parts]
        found = sorted(
            p for f in folders for pattern in ("*.whl", "*.tar.gz") for p in f.glob(pattern)
        )
        if not found:
            raise SkipStep(f"no .whl or .tar.gz under {wheels_dir} (parts joined: {unpacked})")
        site.mkdir(parents=True, exist_ok=True)
        done = set(marker.read_text().split()) if marker.is_file() else set()
        todo = [p for p in found if p.name not in done]
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        pip += ["--no-build-isolation", "--no-compile", "--disable-pip-version-check"]
        pip += ["--target", str(site)]
        failed, installed = {}, []
        if todo:
            installed = todo
            if self.run([*pip, *map(str, todo)], "wheels", self.args.timeout_wheels).rc != 0:
                installed = []
                for wheel in todo:  # one by one: one bad file must not keep the others out
                    child = self.run([*pip, str(wheel)], f"wheels-{wheel.name}", 120)
                    if child.rc == 0:
                        installed.append(wheel)
                    else:
                        failed[wheel.name] = child.tail(400)
            write_atomic(marker, "\n".join(sorted(done | {p.name for p in installed})) + "\n")
        self.pythonpath.append(str(site))
        # distribution names, from the file names (NAME-VERSION-...whl, NAME-VERSION.tar.gz)
        self.installed = sorted({p.name.split("-")[0] for p in found if p.name not in failed})
        results = {
            "wheels_dir": str(wheels_dir),
            "site": str(site),
            "parts_joined": unpacked,
            "installed": [p.name for p in installed],
            "already_installed": sorted(p.name for p in found if p.name in done),
            "failed": failed,
        }
        if failed:
            raise StepFailed(f"{len(failed)} of {len(todo)} wheels did not install: {list(failed)}")
        summary = f"{len(installed)} installed, {len(results['already_installed'])} already there"
        return results, f"{summary}, into {site}"

    def step_environment(self) -> tuple[dict, str]:
        self.env = self.python_step(
            "environment", self.args.timeout_environment, "--dist", *self.installed
        )
        env = self.env
        missing = sorted(m for m, p in env["packages"].items() if not p["importable"])
        device = env["devices"][0]["name"] if env["devices"] else "no GPU"
        summary = (
            f"{device}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
            f"Python {env['python']}; {env['cpu_count']} CPUs; "
            f"missing: {', '.join(missing) or 'nothing'}"
        )
        return env, summary

    def step_build_cython(self) -> tuple[dict, str]:
        if self.args.skip_build:
            raise SkipStep("--skip-build given")
        for module in ("Cython", "numpy", "setuptools"):
            self.need_module(module)
        child = self.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            "build-cython",
            self.args.timeout_build_cython,
        )
        if child.rc != 0:
            raise self.fail(child, "setup.py build_ext")
        probe = "import hpc_reid.evaluation._rank_cy as m; print(m.__file__)"
        check = self.run([sys.executable, "-c", probe], "build-cython-import", 60)
        if check.rc != 0:
            raise StepFailed(f"built, but does not import: ...{check.tail()}")
        module = check.log.read_text().splitlines()[-1]
        return {"seconds": child.seconds, "module": module}, f"built in {child.seconds:.0f} s"

    def step_build_cuda(self) -> tuple[dict, str]:
        self.need_gpu()
        if not self.env.get("nvcc"):
            raise SkipStep("nvcc not found on PATH or under /usr/local/cuda*/bin")
        if not (self.env.get("ninja") or self.importable("ninja")):
            raise SkipStep("ninja not found (torch's extension builder needs it)")
        result = self.python_step("build-cuda", self.args.timeout_build_cuda)
        self.kernel_built = True
        how = "taken from the cache" if result["cached"] else "compiled"
        return (
            result,
            f"rank_fused.cu {how} in {result['seconds']:.1f} s (sm {result['capability']})",
        )

    def step_gpu_tests(self) -> tuple[dict, str]:
        self.need_gpu()
        files = [f for f in GPU_TEST_FILES if (REPO / f).is_file()]
        absent = [f for f in GPU_TEST_FILES if f not in files]
        not_run = {}
        if "tests/data/test_dali_loader.py" in files and not self.importable("nvidia.dali"):
            files.remove("tests/data/test_dali_loader.py")
            not_run["tests/data/test_dali_loader.py"] = "nvidia.dali does not import"
        if not files:
            raise SkipStep(f"none of the GPU test files exists ({absent})")
        junit = self.logs / "gpu-tests.xml"
        junit.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
        cmd += ["--continue-on-collection-errors", f"--junit-xml={junit}", *files]
        child = self.run(cmd, "gpu-tests", self.args.timeout_tests)
        if not junit.is_file():
            raise self.fail(child, "pytest (no junit XML)")
        counts = junit_counts(junit)
        results = {
            "files": files,
            "absent": absent,
            "not_run": not_run,
            "exit": child.rc,
            **counts,
        }
        summary = (
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped in {len(files)} files"
        )
        if counts["unavailable"]:
            summary += f"; not importable: {', '.join(counts['unavailable'])}"
        if counts["failed"] or counts["errors"] or child.rc not in (0, 1, 5):
            raise StepFailed(f"{summary}; failing: {', '.join(counts['failing'][:10])}")
        return results, summary

    def step_sanitizer(self) -> tuple[dict, str]:
        self.need_kernel()
        tool = self.env.get("compute_sanitizer")
        if not tool:
            raise SkipStep("compute-sanitizer not found on PATH or under /usr/local/cuda*/bin")
        results, problems = {}, []
        for name in ("memcheck", "racecheck"):
            result = self.logs / f"sanitizer-{name}.json"
            # API errors off: CUDA libraries probe the driver with calls that fail by design
            # (cuGetProcAddress of symbols a driver lacks, ...), which memcheck would count as
            # errors; a failing call of ours raises in Python and leaves no result file instead.
            cmd = [tool, "--tool", name, "--error-exitcode", "86", "--print-limit", "10"]
            cmd += ["--report-api-errors", "no"]
            cmd += [sys.executable, str(STEPS_SCRIPT), "fused-small", "--result", str(result)]
            # Without torch's caching allocator every tensor is its own allocation, so memcheck
            # sees an access past a tensor's end instead of into a neighbour in the same block.
            child = self.run(
                cmd,
                f"sanitizer-{name}",
                self.args.timeout_sanitizer,
                PYTORCH_NO_CUDA_MEMORY_CACHING="1",
            )
            text = child.log.read_text(errors="replace")
            if re.search(r"[Dd]evice not supported", text):  # e.g. under gVisor: not our kernel
                raise SkipStep(
                    f"compute-sanitizer does not support this machine's GPU ({name}: "
                    f"...{child.tail(300)})"
                )
            errors = re.search(r"ERROR SUMMARY: (\d+) error", text)
            race = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) error", text)
            count = int(race.group(2)) if race else int(errors.group(1)) if errors else None
            workload = json.loads(result.read_text()) if result.is_file() else None
            results[name] = {
                "exit": child.rc,
                "errors": count,
                "hazards": int(race.group(1)) if race else None,
                "seconds": child.seconds,
                "workload": workload,
            }
            if count is None:
                problems.append(f"{name}: no summary line (exit {child.rc}): ...{child.tail(600)}")
            elif count or child.rc != 0:
                problems.append(f"{name}: {count} errors, exit {child.rc}")
            if workload is not None and not workload.get("equals_cpu"):
                problems.append(f"{name}: fused results differ from the CPU's")
        if problems:
            raise StepFailed("; ".join(problems))
        hazards = results["racecheck"]["hazards"]
        return results, f"memcheck 0 errors, racecheck 0 errors ({hazards} hazards shown)"

    def step_fused_vs_gemm(self) -> tuple[dict, str]:
        self.need_kernel()
        r = self.python_step("fused-vs-gemm", self.args.timeout_fused)
        return r, (
            f"{r['queries']} x {r['gallery']} x {r['dim']}: fused {r['fused_s']:.3f} s = "
            f"{r['fused_over_gemm_fp32']:.2f}x the fp32 GEMM ({r['gemm_fp32_s']:.3f} s), "
            f"{r['fused_over_gemm_tf32']:.2f}x TF32 ({r['gemm_tf32_s']:.3f} s); GEMM + row sort "
            f"{r['gemm_fp32_sort_s']:.3f} s; mAP {r['fused_mAP']:.4f}"
        )

    def step_train(self) -> tuple[dict, str]:
        self.need_gpu()
        self.need_module("pydantic")
        loaders = "torch,dali" if self.importable("nvidia.dali") else "torch"
        workers = min(8, self.env.get("cpu_count") or 1)
        out = self.out / "train-step"
        sets = [
            "model.backbone=resnet50",
            "data.height=256",
            "data.width=128",
            "engine.device=cuda",
            "engine.precision=bf16",
            "engine.channels_last=true",
            f"loader.num_workers={workers}",
        ]
        cmd = [
            sys.executable,
            "-m",
            "hpc_reid.cli",
            "bench",
            "--config",
            "configs/synthetic/bot.yaml",
        ]
        cmd += [x for s in sets for x in ("--set", s)]
        cmd += ["--loaders", loaders, "--steps", str(self.args.train_steps), "--warmup", "5"]
        cmd += ["--eval-size", "0,0", "--out", str(out)]
        child = self.run(cmd, "train-step", self.args.timeout_train)
        if child.rc != 0 or not (out / "bench.json").is_file():
            raise self.fail(child, "hpc-reid bench")
        results, summary = parsed(
            "bench.json", train_summary, json.loads((out / "bench.json").read_text())
        )
        results["command"] = shlex.join(["hpc-reid", *cmd[3:]])
        st = results["settings"]
        results["table"] = [
            f"{st['backbone']} {st['height']}x{st['width']} {st['precision']}, channels_last "
            f"{st['channels_last']}, batch {st['batch']}, {self.args.train_steps} timed steps per "
            f"phase after 5; synthetic set; torch loader with {workers} workers",
            "",
            *(x for x in table_lines(child.log.read_text()) if not x.startswith("results:")),
        ]
        return results, summary

    def step_dali_loader(self) -> tuple[dict, str]:
        self.need_gpu()
        self.need_module("nvidia.dali")
        self.need_module("pydantic")
        workers = str(min(8, self.env.get("cpu_count") or 1))
        cmd = [sys.executable, "bench/loader_bench.py", "--device", "cuda", "--no-record"]
        cmd += ["--batches", "160", "--torch-workers", workers, "--reference-workers", "-1"]
        child = self.run(cmd, "dali-loader", self.args.timeout_loader)
        if child.rc != 0:
            raise self.fail(child, "loader_bench")
        results, summary = parsed("loader_bench", loader_summary, child.log.read_text())
        results["command"] = shlex.join(["python", *cmd[1:]])
        return results, summary

    def step_rerank(self) -> tuple[dict, str]:
        self.need_gpu()
        cmd = [sys.executable, "bench/rerank_bench.py", "--device", "cuda", "--no-record"]
        child = self.run(cmd, "rerank", self.args.timeout_rerank)
        if child.rc != 0:
            raise self.fail(child, "rerank_bench")
        results, summary = parsed("rerank_bench", rerank_summary, child.log.read_text())
        results["command"] = shlex.join(["python", *cmd[1:]])
        return results, summary

    # --- the whole run --------------------------------------------------------------------------

    def run_all(self) -> int:
        only = set(self.args.only or [])
        for name, title, fn in STEPS:
            record: dict[str, Any] = {"name": name, "title": title}
            tic = time.monotonic()
            try:
                if only and name not in only | PREREQUISITES:
                    raise SkipStep("not selected (--only)")
                record["results"], record["summary"] = fn(self)
                record["status"] = "ok"
            except SkipStep as exc:
                record.update(status="skipped", reason=str(exc))
            except StepTimeout as exc:
                record.update(status="timeout", reason=str(exc))
            except StepFailed as exc:
                record.update(status="failed", reason=str(exc))
            except Exception as exc:  # a bug in one step's code must not stop the other steps
                record.update(status="failed", reason=f"gpu_check.py: {type(exc).__name__}: {exc}")
            record["seconds"] = round(time.monotonic() - tic, 2)
            self.steps.append(record)
            print(
                f"gpu_check: {name}: {record['status']} ({record['seconds']:.1f} s) "
                f"{record.get('summary') or record.get('reason', '')}"[:400],
                flush=True,
            )
            self.write_report()
        bad = [s["name"] for s in self.steps if s["status"] in ("failed", "timeout")]
        print(f"gpu_check: {self.headline()}; wrote {self.out / 'gpu_check.json'} and .md")
        return 1 if bad else 0

    def headline(self) -> str:
        bad = [s["name"] for s in self.steps if s["status"] in ("failed", "timeout")]
        where = self.device() if self.gpu else f"no GPU found ({self.no_gpu_reason()})"
        verdict = f"failed: {', '.join(bad)}" if bad else "no step failed"
        return f"{where}; {verdict}"

    def device(self) -> str:
        devices = self.env.get("devices") or []
        return devices[0]["name"] if devices else "no GPU"

    def report(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.timezone.utc)
        return {
            "schema": 1,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": now.isoformat(timespec="seconds"),
            "elapsed_s": round((now - self.started).total_seconds(), 1),
            "budget_s": self.args.budget_s,
            "command": self.args.command,
            "gpu_found": self.gpu,
            "device": self.device(),
            "headline": self.headline(),
            "steps": self.steps,
        }

    def write_report(self) -> None:
        report = self.report()
        write_atomic(self.out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
        write_atomic(self.out / "gpu_check.md", markdown(report, self.env))


#: (name, title, method) of every step, in the order they run.
STEPS = [
    ("wheels", "install the carried wheels", Check.step_wheels),
    ("environment", "GPU, driver, torch, tools, packages", Check.step_environment),
    ("build-cython", "Cython ranking kernel, in place", Check.step_build_cython),
    ("build-cuda", "fused CUDA ranking kernel", Check.step_build_cuda),
    ("gpu-tests", "gpu-marked tests", Check.step_gpu_tests),
    ("sanitizer", "compute-sanitizer on the fused kernel", Check.step_sanitizer),
    ("fused-vs-gemm", "fused kernel vs distance GEMM, MSMT17 size", Check.step_fused_vs_gemm),
    ("train-step", "ResNet-50 256x128 bf16 channels_last step", Check.step_train),
    ("dali-loader", "DALI GPU loader img/s", Check.step_dali_loader),
    ("rerank", "re-ranking, Market-1501 size, on the GPU", Check.step_rerank),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, .md and logs/")
    parser.add_argument("--wheels", default="/tmp/gw", help="carried wheels or gpu-wheels.sh parts")
    parser.add_argument("--site", default="/tmp/site", help="where the wheels are installed")
    parser.add_argument(
        "--cache",
        default="/tmp/hpc_reid_gpu_check",
        help="HPC_REID_CACHE of every step: the built kernel, the synthetic data set",
    )
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="whole call")
    parser.add_argument("--skip-build", action="store_true", help="do not build the Cython kernel")
    parser.add_argument(
        "--only", nargs="+", metavar="STEP", help="run these steps (and the PREREQUISITES)"
    )
    parser.add_argument("--train-steps", type=int, default=30, help="timed steps per phase")
    for name, default in (
        ("wheels", 120),
        ("environment", 90),
        ("build-cython", 180),
        ("build-cuda", 300),
        ("tests", 240),
        ("sanitizer", 150),
        ("fused", 180),
        ("train", 240),
        ("loader", 150),
        ("rerank", 150),
    ):
        parser.add_argument(
            f"--timeout-{name}", type=float, default=default, help=argparse.SUPPRESS
        )
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)  # as gpu_check.sh ran
    args = parser.parse_args(argv)
    known = {name for name, _, _ in STEPS}
    if args.only and not set(args.only) <= known:
        parser.error(
            f"--only: unknown steps {sorted(set(args.only) - known)}; known: {sorted(known)}"
        )
    args.command = args.command or shlex.join(
        ["python3", "bench/gpu_check.py", *(argv or sys.argv[1:])]
    )
    return Check(args).run_all()


if __name__ == "__main__":
    sys.exit(main())
