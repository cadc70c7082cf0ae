"""Run the trainer (or any function) on N Ray Train workers, on one machine or a Ray cluster.

Ray Train (V2, the default since Ray 2.5x) starts one actor per worker, exports torchrun's
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the torch process
group (gloo on CPU, NCCL with GPUs) before the training function runs, in a thread of the actor.
``train()`` therefore reads the environment as torchrun's, finds the group ready and leaves it to
Ray, which destroys it at shutdown. Metrics and checkpoints go to Ray with ``ray.train.report``
from every rank; rank 0 attaches the trainer's checkpoint file. A Ray run that restarts (a worker
failed and ``max_failures`` allows a retry) or a new run with the same storage folder and name
resumes from the latest reported checkpoint (``ray.train.get_checkpoint()``).

``address=None`` starts Ray in this process with the CPUs asked for; ``"auto"`` joins the cluster
this machine belongs to (``ray start --head`` / ``ray start --address`` on the nodes of a SLURM
allocation, see slurm/README.md); ``"ray://host:10001"`` joins one through Ray Client. On a
cluster the run folder must be on storage every node sees, as for srun.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_reid.config import Config
from hpc_reid.engine.errors import TrainingError

if TYPE_CHECKING:
    import ray.train

INSTALL_HINT = "pip install 'hpc-reid[ray]'"


def require_ray() -> None:
    """Raise TrainingError with the install command when Ray Train is missing."""
    try:
        import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise TrainingError(f"the Ray launcher needs Ray Train ({exc}): {INSTALL_HINT}") from None


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """``ray.init`` unless Ray is already initialised in this process.

    ``address=None`` (and no RAY_ADDRESS in the environment) starts a local Ray with at least
    ``num_cpus`` CPUs, so N one-CPU workers fit even on a smaller machine; an address joins an
    existing cluster, whose resources are its own.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None and "RAY_ADDRESS" not in os.environ:
        ray.init(num_cpus=max(os.cpu_count() or 1, num_cpus or 1))
    else:
        ray.init(address=address)


class _ReturnBox:
    """Holds rank 0's return value for the driver (an actor: rank 0 may run on another node)."""

    def __init__(self):
        self.value = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def _worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: ``fn(**kwargs)``; rank 0 hands its value to the box."""
    import ray
    import ray.train

    value = config["fn"](**config["kwargs"])
    if ray.train.get_context().get_world_rank() == 0:
        ray.get(config["box"].put.remote(value))


def fit_on_ray(
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    num_workers: int,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    address: str | None = None,
    storage_path: str | Path,
    name: str,
    callbacks: Sequence[Any] | None = None,
    backend: str = "auto",
    timeout_s: int = 1800,
    max_failures: int = 0,
) -> tuple[Any, ray.train.Result]:
    """``fn(**kwargs)`` on ``num_workers`` Ray Train workers with torch.distributed joined;
    returns rank 0's return value and Ray's ``Result`` (the last reported checkpoint and its
    metrics: ``Result.metrics`` stays empty unless a report carried a checkpoint).

    ``backend``: ``"auto"`` is NCCL when ``gpus_per_worker > 0``, else gloo. ``callbacks``: Ray
    Train ``UserCallback``s, e.g. ``ray.tune.integration.ray_train.TuneReportCallback()`` inside
    a Tune trial. ``max_failures``: restarts of the whole worker group after a worker fails (each
    restart resumes from the last reported checkpoint). A worker's exception is raised here as
    itself (the lowest failing rank's), not wrapped in Ray's error.
    """
    require_ray()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import WorkerGroupError

    if num_workers < 1:
        raise TrainingError(f"num_workers={num_workers}: expected at least 1 Ray worker")
    connect(address, num_cpus=math.ceil(num_workers * cpus_per_worker))
    box = ray.remote(num_cpus=0)(_ReturnBox).remote()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"fn": fn, "kwargs": dict(kwargs or {}), "box": box},
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": cpus_per_worker, "GPU": gpus_per_worker},
        ),
        torch_config=TorchConfig(
            backend=None if backend == "auto" else backend, timeout_s=timeout_s
        ),
        run_config=RunConfig(
            name=name,
            storage_path=_absolute(storage_path),
            callbacks=list(callbacks or []),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train's print patch doubles every line printed in a worker (logger + tee)
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    try:
        result = trainer.fit()
        return ray.get(box.get.remote()), result
    except WorkerGroupError as exc:
        raise _original(exc) from exc
    finally:
        ray.kill(box)


def run_on_ray(fn: Callable[..., Any], kwargs: Mapping[str, Any] | None = None, **options) -> Any:
    """``fn(**kwargs)`` on Ray Train workers; rank 0's return value (options as fit_on_ray)."""
    value, _ = fit_on_ray(fn, kwargs, **options)
    return value


def _original(error: Exception) -> Exception:
    """The lowest failing rank's own exception inside Ray's WorkerGroupError, else the error."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        return error
    failure = failures[min(failures)]
    cause = getattr(failure, "cause", None)  # a RayTaskError carries the user's exception
    return cause if isinstance(cause, Exception) else failure


def _absolute(path: str | Path) -> str:
    text = str(path)
    return text if "://" in text else str(Path(text).expanduser().resolve())


# The config's file and folder keys: resolved against the caller's working directory before the
# config travels, because Ray workers (and Tune trials) run in folders of their own.
_PATH_KEYS = (
    ("data", "root"),
    ("data", "synthetic", "cache_dir"),
    ("model", "pretrained"),
    ("engine", "deepspeed_config"),
    ("logging", "output_dir"),
)


def with_absolute_paths(config: Config) -> Config:
    data = config.to_dict()
    for keys in _PATH_KEYS:
        section = data
        for key in keys[:-1]:
            section = section[key]
        if section.get(keys[-1]):
            section[keys[-1]] = _absolute(section[keys[-1]])
    return Config.model_validate(data)


def worker_config(config: Config, gpus_per_worker: float) -> Config:
    """``config`` as Ray workers must get it: its paths absolute (they run in folders of their
    own), and ``engine.device=auto`` made ``cuda`` when a worker has GPUs, else ``cpu``."""
    config = with_absolute_paths(config)
    if config.engine.device == "auto":
        device = "cuda" if gpus_per_worker > 0 else "cpu"
        config = config.model_copy(
            update={"engine": config.engine.model_copy(update={"device": device})}
        )
    if config.engine.device == "cuda" and gpus_per_worker <= 0:
        raise TrainingError("engine.device=cuda on Ray needs --gpus-per-worker 1 (or more)")
    return config


def train_on_ray(
    config: Config,
    *,
    num_workers: int,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    address: str | None = None,
    resume: str | None = "auto",
    max_steps: int | None = None,
    callbacks: Sequence[Any] | None = None,
    max_failures: int = 0,
    storage_path: str | Path | None = None,
    name: str = "ray",
) -> ray.train.Result:
    """``train(config)`` on ``num_workers`` Ray Train workers; returns Ray's ``Result``.

    Every evaluation (periodic and final), and a stop at ``max_steps``, is reported to Ray from
    every rank with the scalar metrics (``rank-1``, ``mAP``, ``mINP``, ``step``, ``epoch``,
    ``final``, or ``stopped_at_step``); rank 0 attaches a checkpoint folder holding the trainer's
    checkpoint file and ``metrics.json``. A restarted or re-run Ray run resumes from the latest of
    those; otherwise ``resume`` is passed to ``train`` (``"auto"``: the run folder's newest).
    Ray's files go to ``<storage_path>/<name>``, by default ``<run folder>/ray``.
    ``engine.device=auto`` means CUDA with ``gpus_per_worker > 0``, else CPU.
    """
    from hpc_reid.engine.trainer import run_dir_of

    config = worker_config(config, gpus_per_worker)
    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if config.engine.device == "cuda" else "gloo"
    _, result = fit_on_ray(
        train_worker,
        {"config": config, "resume": resume, "max_steps": max_steps},
        num_workers=num_workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        address=address,
        storage_path=storage_path or run_dir_of(config),
        name=name,
        callbacks=callbacks,
        backend=backend,
        timeout_s=config.distributed.timeout_s,
        max_failures=max_failures,
    )
    return result


def train_worker(
    config: Config, resume: str | None = "auto", max_steps: int | None = None
) -> dict[str, Any]:
    """One Ray Train worker of ``train_on_ray``: resume from Ray's checkpoint if it has one,
    train, report. Returns ``train``'s result."""
    import ray.train
    import ray.train.torch

    from hpc_reid.engine.checkpoint import CheckpointManager
    from hpc_reid.engine.trainer import run_dir_of, train

    context = ray.train.get_context()
    if config.engine.device == "cuda":
        # train() takes cuda:LOCAL_RANK; Ray's device for this worker is the first of its GPUs
        # among the node's (shared) CUDA_VISIBLE_DEVICES, which differs with 2+ GPUs a worker.
        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index or 0)

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (bool, int, float, str))}
        if checkpoint is None:
            ray.train.report(scalars)
            return
        # beside the file (hidden): the same file system; Ray deletes it after its upload
        folder = Path(tempfile.mkdtemp(prefix=f".ray-{checkpoint.stem}.", dir=checkpoint.parent))
        try:  # a hard link where the file system allows: no second copy before Ray's upload
            os.link(checkpoint, folder / checkpoint.name)
        except OSError:
            shutil.copy2(checkpoint, folder / checkpoint.name)
        text = json.dumps(metrics, indent=2, default=float) + "\n"
        (folder / "metrics.json").write_text(text)
        ray.train.report(
            scalars,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            delete_local_checkpoint_after_upload=True,
        )

    previous = ray.train.get_checkpoint()
    with previous.as_directory() if previous else nullcontext() as folder:
        if folder is not None:
            files = sorted(Path(folder).glob("*.pt"))
            if len(files) != 1:
                raise TrainingError(f"Ray checkpoint {previous.path} holds {files}, expected 1")
            resume = str(files[0])
        result = train(config, resume=resume, max_steps=max_steps, reporter=report)
    if "stopped_at_step" in result:  # max_steps: report that checkpoint too, from every rank
        main = context.get_world_rank() == 0
        latest = CheckpointManager(run_dir_of(config)).latest() if main else None
        report({**result, "step": result["stopped_at_step"], "final": False}, latest)
    return result
