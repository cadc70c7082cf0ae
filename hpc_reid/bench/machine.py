"""The machine a number was measured on: its CPU model (for the headings of bench/RESULTS.md), a
rank's memory and environment, and the job's (nodes, devices, versions) for ``bench.json``.

Float kernels differ between CPU models (an AMD EPYC and an Intel Xeon give different losses from
the same seed after a few steps, and real-data results that differ by more than their paired
spread), so a result names the CPU model, not just the architecture.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import hpc_reid

GIB = 2**30


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; the processor or architecture elsewhere."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def proc_status_gib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak), in GiB. Not ru_maxrss,
    which carries the parent's peak across fork + exec (a launcher's, here)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise KeyError(f"/proc/self/status has no {field} line")


def current_memory(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GIB, "cuda_allocated"
    return proc_status_gib("VmRSS"), "rss"


def peak_memory(device) -> tuple[float, str]:
    """Peak CUDA memory allocated since the last reset, or the process's high-water RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "cuda_allocated"
    return proc_status_gib("VmHWM"), "rss"


def local_environment(device: torch.device) -> dict[str, Any]:
    host = socket.gethostname()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / GIB:.0f} GiB"
    else:
        name = f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    return {
        "hostname": host,
        "node": os.environ.get("SLURMD_NODENAME", host),  # several slurmd may share one host
        "pid": os.getpid(),
        "device": str(device),
        "device_name": name,
        "cpus": os.cpu_count(),
    }


def module_version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def job_environment(ranks: list[dict], device: torch.device, world: int) -> dict[str, Any]:
    nodes = sorted({r["node"] for r in ranks})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "world_size": world,
        "nodes": len(nodes),
        "node_names": nodes,
        "ranks_per_node": {n: sum(r["node"] == n for r in ranks) for n in nodes},
        "device_type": device.type,
        "devices": sorted({r["device_name"] for r in ranks}),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "hpc_reid": hpc_reid.__version__,
        "dali": module_version("nvidia.dali"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_job_num_nodes": os.environ.get("SLURM_JOB_NUM_NODES"),
    }
