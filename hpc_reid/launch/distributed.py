"""Distributed initialisation from torchrun's, SLURM's or no launcher's environment.

torchrun (and the DeepSpeed launcher) export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. Under ``srun`` each task instead sees SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and
the allocation's node list; the first node of the list is the rendezvous host, unless MASTER_ADDR
is set (needed where node names do not resolve, e.g. several slurmd on one machine). Anything else
is a single process.

Ray Train exports torchrun's variables and joins the process group itself before the training
function runs (see ``hpc_reid.launch.ray_launcher``): ``init_distributed`` then finds the group
ready, and ``cleanup`` leaves a group it found to the launcher that created it.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # "torchrun", "slurm" or "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list: ``"gpu[01-03,07],login1"`` -> gpu01..gpu03, gpu07,
    login1; several brackets multiply out (``"a[1-2]-b[3-4]"`` -> a1-b3, a1-b4, a2-b3, a2-b4).
    Zero padding of ranges is kept, as ``scontrol show hostnames`` does."""
    hosts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(hostlist + ","):  # split on the commas outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"cannot parse SLURM host list {hostlist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            if i > start:
                hosts.extend(_expand_host(hostlist[start:i], hostlist))
            start = i + 1
    if depth:
        raise ValueError(f"cannot parse SLURM host list {hostlist!r}: unbalanced brackets")
    return hosts


def _expand_host(item: str, hostlist: str) -> list[str]:
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if m is None:
        if "[" in item or "]" in item:
            raise ValueError(f"cannot parse SLURM host list {hostlist!r} at {item!r}")
        return [item]
    prefix, ranges, rest = m.groups()
    tails = _expand_host(rest, hostlist)
    hosts = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cannot parse SLURM host list {hostlist!r} at {part!r}")
        for n in range(int(lo), int(hi or lo) + 1):
            hosts.extend(f"{prefix}{str(n).zfill(len(lo))}{tail}" for tail in tails)
    return hosts


def _int(env: Mapping[str, str], key: str, least: int | None = None) -> int:
    """``env[key]`` as an integer (at least ``least``, when given), or an error naming it."""
    value = env[key]
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None
    if least is not None and number < least:
        raise ValueError(f"environment variable {key}={value!r}: expected an integer >= {least}")
    return number


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Training processes on this node, from the launcher's environment (``os.environ`` by
    default): torchrun's ``LOCAL_WORLD_SIZE``; under SLURM this node's entry of
    ``SLURM_STEP_TASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` (entry ``SLURM_NODEID``), else
    ``SLURM_NTASKS_PER_NODE``; else 1."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env:
        return _int(env, "LOCAL_WORLD_SIZE", least=1)
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            counts = slurm_tasks_per_node(env[key])
            node = _int(env, "SLURM_NODEID", least=0) if "SLURM_NODEID" in env else 0
            if node >= len(counts):
                raise ValueError(
                    f"SLURM_NODEID={node} but {key}={env[key]!r} lists {len(counts)} node(s)"
                )
            return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE", least=1)
    return 1


def slurm_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list, one count per node: ``"4(x2),3"`` -> ``[4, 4, 3]``."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(
                f"cannot parse SLURM tasks per node {spec!r} at {item!r}: expected counts "
                "like '4' or '4(x2)', separated by commas"
            )
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def rank_cores(
    affinity: Collection[int] | None = None,
    cpu_count: int | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """The cores this training process may use (at least 1): DALI's pipelines size to it.

    Every local rank runs its own pipelines, so the node's cores are divided among the
    :func:`local_world_size` ranks: 8 ranks each taking all 64 cores would run 512 threads on 64
    cores. An affinity mask smaller than the machine (``affinity`` < ``cpu_count``; SLURM's
    ``--cpus-per-task`` binding, ``taskset``, a cpuset) already holds only this process's share,
    and is not divided again. Defaults: ``os.sched_getaffinity(0)``, ``os.cpu_count()``,
    ``os.environ``.
    """
    cores = len(os.sched_getaffinity(0) if affinity is None else affinity)
    total = (os.cpu_count() or cores) if cpu_count is None else cpu_count
    if cores < total:
        return max(1, cores)
    return max(1, cores // local_world_size(env))


def detect_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            launcher="torchrun",
        )
    ntasks = _int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1
    if "SLURM_PROCID" in env and ntasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        hosts = expand_hostlist(nodelist) if nodelist else []
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 15000 + job % 20000
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=ntasks,
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv()


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device (among the ``visible`` ones) that local rank ``local_rank`` trains on.

    With every GPU of the node visible to every task (torchrun, ``srun`` without GPU binding),
    local rank r takes ``cuda:r``. Under SLURM's per-task binding (``--gpus-per-task=1``,
    ``--gpu-bind=single:1``, ``map_gpu``) each task sees only its own GPU, as ``cuda:0``, whatever
    its SLURM_LOCALID: asking for ``cuda:LOCAL_RANK`` there fails with "invalid device ordinal".
    So the index is ``local_rank % visible``; with more than one visible GPU but fewer than the
    local ranks, several ranks then share a GPU, which is warned about, not refused (it may be
    meant, e.g. a CPU-bound debugging run), and NCCL refuses it anyway.
    """
    if visible < 1:
        raise ValueError(f"no CUDA device is visible (device count {visible})")
    if local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {local_rank}")
    if 1 < visible <= local_rank:
        warnings.warn(
            f"local rank {local_rank} sees only {visible} CUDA devices: it takes "
            f"cuda:{local_rank % visible}, which another local rank also uses. Give each task "
            "its own GPU (srun --gpus-per-task=1) or every GPU of the node "
            "(CUDA_VISIBLE_DEVICES unset), or start one task per visible GPU",
            RuntimeWarning,
            stacklevel=2,
        )
    return local_rank % visible


def choose_backend(requested: str, device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPU, unless the config names one."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


# The default process group init_distributed found already made (by Ray Train, or a test): its
# creator destroys it, so cleanup() must not. Groups made later by anyone (DeepSpeed makes one even
# for a single process) are ours to destroy.
_found_group: object | None = None


def init_distributed(env: DistEnv, backend: str, timeout_s: int = 1800) -> None:
    """Join the process group described by ``env`` (no-op for a single process, or when a
    launcher such as Ray Train already joined it)."""
    global _found_group
    if dist.is_initialized():
        _found_group = dist.group.WORLD
        return
    if not env.distributed:
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )


@contextlib.contextmanager
def process_group(env: DistEnv, backend: str, timeout_s: int = 1800) -> Iterator[None]:
    """One process group for a ``with`` block that runs several jobs in turn (``train --then``'s
    stages, ``eval --draws``' draws), each of which finds it ready (:func:`init_distributed`) and
    leaves it (:func:`cleanup`). A fresh group per job would make rank 0 host a new rendezvous
    while a slower rank may still reach the previous one (gloo: connection refused). Joined here
    only when launched and not joined yet, and then destroyed on the way out."""
    joined = env.distributed and not dist.is_initialized()
    if joined:
        init_distributed(env, backend, timeout_s)
    try:
        yield
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group, unless init_distributed found it made by someone else."""
    global _found_group
    found, _found_group = _found_group, None
    if dist.is_initialized() and dist.group.WORLD is not found:
        dist.destroy_process_group()
