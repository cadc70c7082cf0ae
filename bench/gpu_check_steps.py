"""The steps of bench/gpu_check.py that run in their own Python process: each writes one JSON
object to ``--result FILE`` (and prints it), so that the orchestrator can time it out, and a crash
or a hung CUDA call costs that step only.

    python3 bench/gpu_check_steps.py environment --result env.json
    python3 bench/gpu_check_steps.py build-cuda --result build.json
    compute-sanitizer --tool memcheck python3 bench/gpu_check_steps.py fused-small --result s.json
    python3 bench/gpu_check_steps.py fused-vs-gemm --result f.json [--queries Q --gallery G]

Only ``environment`` runs without a GPU. Nothing here imports ``hpc_reid.config`` (pydantic), so the
evaluation steps also run on a GPU machine that has no pydantic.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: (import name, distribution name) of what the checks use; None: the import name is the
#: distribution's. DeepSpeed and Ray are only looked up (importing them takes seconds).
PACKAGES = [
    ("torch", None),
    ("torchvision", None),
    ("numpy", None),
    ("scipy", None),
    ("PIL", "pillow"),
    ("h5py", None),
    ("yaml", "PyYAML"),
    ("pydantic", None),
    ("Cython", None),
    ("setuptools", None),
    ("ninja", None),
    ("pytest", None),
    ("hypothesis", None),
    ("matplotlib", None),
    ("tqdm", None),
    ("tensorboard", None),
    ("onnxruntime", None),
    ("nvidia.dali", "nvidia-dali-cuda130"),
]
LOOKED_UP = [("deepspeed", None), ("ray", None)]


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else the newest ``/usr/local/cuda*/bin/name`` (CUDA images often leave
    the toolkit's bin folder off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/local").glob(f"cuda*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    lines = [x for x in (out.stdout + out.stderr).splitlines() if x.strip()]
    return lines[-1].strip() if out.returncode == 0 and lines else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package(module: str, dist: str | None, do_import: bool) -> dict:
    """Version (from the distribution's metadata) and whether the module imports."""
    version = _version(dist or module)
    if not do_import:
        found = importlib.util.find_spec(module) is not None
        return {"version": version, "importable": found, "error": None}
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import failure (not only ImportError) is what we report
        return {"version": version, "importable": False, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "version": version or getattr(mod, "__version__", None),
        "importable": True,
        "error": None,
    }


def environment(args) -> dict:
    """What the machine has: GPU and driver, torch and CUDA, tools, packages."""
    packages = {m: _package(m, d, True) for m, d in PACKAGES}
    packages.update({m: _package(m, d, False) for m, d in LOOKED_UP})
    nvcc = find_tool("nvcc")
    smi = shutil.which("nvidia-smi")
    query = "name,driver_version,memory.total,compute_cap"
    result = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "nvidia_smi": smi and _first_line([smi, f"--query-gpu={query}", "--format=csv,noheader"]),
        "nvcc": nvcc,
        "nvcc_version": nvcc and _first_line([nvcc, "--version"]),
        "compute_sanitizer": find_tool("compute-sanitizer"),
        "ninja": shutil.which("ninja"),
        "packages": packages,
        # the distributions installed from the carried wheels, as this interpreter finds them
        "carried": {name: _version(name) for name in args.dist},
        "cuda_available": False,
        "devices": [],
    }
    try:
        import hpc_reid.config  # noqa: F401 - the config needs pydantic
    except Exception as exc:  # a pydantic that fails to import is a finding
        result["hpc_reid_config"] = f"{type(exc).__name__}: {exc}"
    else:
        result["hpc_reid_config"] = "ok"
    if not packages["torch"]["importable"]:
        return result
    import torch

    result.update(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=torch.cuda.is_available(),
    )
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            result["devices"].append(
                {
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "multiprocessors": p.multi_processor_count,
                }
            )
        result["bf16_supported"] = torch.cuda.is_bf16_supported()
    return result


def build_cuda(args) -> dict:
    """Compile (or take from the cache) kernels/rank_fused.cu; raises on a build failure."""
    import torch

    from hpc_reid.evaluation import ranking_cuda

    build_dir = ranking_cuda.extension_dir()
    cached = build_dir.is_dir() and any(build_dir.glob("*.so"))
    tic = time.perf_counter()
    ranking_cuda.load_kernel()
    return {
        "seconds": time.perf_counter() - tic,
        "cached": cached,
        "build_dir": str(build_dir),
        "capability": "{}.{}".format(*torch.cuda.get_device_capability()),
    }


def _tied_problem(rng, num_q: int, num_g: int, dim: int, num_pids: int):
    """Integer features from a few prototypes (many exactly equal distances: ties) and Market-like
    ids: junk (-1) and distractor (0) gallery items, 6 cameras."""
    import numpy as np
    import torch

    protos = rng.integers(-2, 3, size=(12, dim))

    def feats(n):
        x = protos[rng.integers(0, len(protos), n)]
        x = x + rng.integers(-1, 2, size=(n, dim)) * (rng.random((n, 1)) < 0.5)
        x[:, 0] = np.abs(x[:, 0]) + 1  # no all-zero feature: cosine needs a direction
        return torch.from_numpy(x.astype(np.float32))

    q_pids = rng.integers(1, num_pids + 1, num_q)
    g_pids = rng.integers(-1, num_pids + 1, num_g)
    return (
        feats(num_q),
        feats(num_g),
        q_pids,
        g_pids,
        rng.integers(0, 6, num_q),
        rng.integers(0, 6, num_g),
    )


def fused_small(args) -> dict:
    """Small fused-kernel calls for compute-sanitizer: ties, a last partial query tile, both
    metrics, and a case with more than 8,192 kept positives in a block of 128 queries (the
    kernel's global-memory histogram); euclidean results must equal the CPU numpy backend's
    exactly (integer features: every distance is exact on both)."""
    import numpy as np

    from hpc_reid.evaluation import ranking_cuda
    from hpc_reid.evaluation.distances import evaluate_features

    ranking_cuda.load_kernel()  # raises if it cannot be built: no silent fallback here
    rng = np.random.default_rng(0)
    cases = []
    for num_q, num_g, dim, num_pids in [(300, 2000, 64, 100), (200, 3000, 4, 3)]:
        qf, gf, *ids = _tied_problem(rng, num_q, num_g, dim, num_pids)
        for metric in ("euclidean", "cosine"):
            gpu = ranking_cuda.evaluate_features_cuda(
                qf.to(args.device), gf.to(args.device), *ids, metric=metric, query_tile=128
            )
            case = {"shape": [num_q, num_g, dim], "metric": metric, "mAP": gpu.mAP}
            if metric == "euclidean":
                cpu = evaluate_features(qf, gf, *ids, metric=metric, backend="numpy")
                case["equals_cpu"] = bool(
                    np.array_equal(gpu.cmc, cpu.cmc)
                    and np.array_equal(gpu.ap, cpu.ap, equal_nan=True)
                    and gpu.mAP == cpu.mAP
                    and gpu.mINP == cpu.mINP
                )
            cases.append(case)
    return {"cases": cases, "equals_cpu": all(c.get("equals_cpu", True) for c in cases)}


def _best_seconds(fn, repeats: int, device) -> float:
    """Best wall time of ``fn`` over ``repeats`` calls after one untimed call (cuBLAS handles,
    kernel caches, the allocator's blocks), the device synchronised around each."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        tic = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - tic)
    return best


def fused_vs_gemm(args) -> dict:
    """The fused kernel's whole evaluation (cosine, MSMT17 size by default) against the bare
    distance GEMM over the same query tiles into one reused buffer, in fp32 (the kernel's own
    arithmetic) and TF32, and a GEMM followed by a full row sort (what sorting evaluators do);
    plus a correctness cross-check on the first queries against the numpy ranking of torch's
    distances."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from hpc_reid.evaluation import ranking_cuda
    from hpc_reid.evaluation.distances import pairwise_distance
    from hpc_reid.evaluation.ranking import rank_metrics

    ranking_cuda.load_kernel()
    nq, ng, dim, tile = args.queries, args.gallery, args.dim, args.query_tile
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    num_ids = 3060  # MSMT17's identities; a noise 4x the centres' scale keeps mAP far from 1
    centres = torch.randn(num_ids, dim, generator=gen, device=dev)
    q_pids = torch.randint(0, num_ids, (nq,), generator=gen, device=dev)
    g_pids = torch.randint(0, num_ids, (ng,), generator=gen, device=dev)
    qf = centres[q_pids].add_(torch.randn(nq, dim, generator=gen, device=dev), alpha=4)
    gf = centres[g_pids].add_(torch.randn(ng, dim, generator=gen, device=dev), alpha=4)
    del centres
    rng = np.random.default_rng(0)
    ids = (
        q_pids.cpu().numpy(),
        g_pids.cpu().numpy(),
        rng.integers(0, 15, nq),
        rng.integers(0, 15, ng),
    )
    qn, gn = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    buffer = torch.empty(min(tile, nq), ng, device=dev)

    def gemm(sort: bool = False):
        for s in range(0, nq, tile):
            out = torch.mm(qn[s : s + tile], gn.T, out=buffer[: len(qn[s : s + tile])])
            if sort:
                torch.sort(out, dim=1)

    result: dict = {"queries": nq, "gallery": ng, "dim": dim, "query_tile": tile}
    result["repeats"] = args.repeats
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        result["gemm_fp32_s"] = _best_seconds(gemm, args.repeats, dev)
        result["gemm_fp32_sort_s"] = _best_seconds(lambda: gemm(sort=True), args.repeats, dev)
        torch.set_float32_matmul_precision("high")
        result["gemm_tf32_s"] = _best_seconds(gemm, args.repeats, dev)
    finally:
        torch.set_float32_matmul_precision(previous)
    fused = {}

    def run_fused():
        fused["result"] = ranking_cuda.evaluate_features_cuda(
            qf, gf, *ids, metric="cosine", query_tile=tile
        )

    result["fused_s"] = _best_seconds(run_fused, args.repeats, dev)
    result["fused_mAP"] = fused["result"].mAP
    result["fused_rank1"] = float(fused["result"].cmc[0])
    result["fused_over_gemm_fp32"] = result["fused_s"] / result["gemm_fp32_s"]
    result["fused_over_gemm_tf32"] = result["fused_s"] / result["gemm_tf32_s"]
    if dev.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30

    # Cross-check on the first queries: the kernel's distances may differ from torch.mm's in the
    # last bit, so two items a few ulps apart may swap; mAP agrees to far better than 1e-4.
    n = min(args.check_queries, nq)
    sub = (ids[0][:n], ids[1], ids[2][:n], ids[3])  # (query pids, gallery pids, cameras)
    dist = pairwise_distance(qf[:n], gf, "cosine").cpu().numpy()
    reference = rank_metrics(dist, *sub, backend="numpy")
    got = ranking_cuda.evaluate_features_cuda(qf[:n], gf, *sub, metric="cosine", query_tile=tile)
    result["check_queries"] = n
    result["check_mAP_abs_diff"] = abs(got.mAP - reference.mAP)
    result["check_ok"] = result["check_mAP_abs_diff"] < 1e-4
    return result


STEPS = {
    "environment": environment,
    "build-cuda": build_cuda,
    "fused-small": fused_small,
    "fused-vs-gemm": fused_vs_gemm,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--result", required=True, help="JSON file for the step's result")
    parser.add_argument("--dist", nargs="*", default=[], help="environment: more distributions")
    parser.add_argument("--queries", type=int, default=11659, help="fused-vs-gemm: MSMT17 query")
    parser.add_argument("--gallery", type=int, default=82161, help="fused-vs-gemm: MSMT17 gallery")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--query-tile", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-queries", type=int, default=256)
    # cpu: the tests' run of this code with a CPU stand-in for the kernel (tests/bench)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    result = STEPS[args.step](args)
    text = json.dumps(result, indent=2, default=str)
    Path(args.result).write_text(text + "\n")
    print(text)
    # A wrong answer is a failure of the step, after its numbers are written.
    return 0 if result.get("equals_cpu", True) and result.get("check_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
