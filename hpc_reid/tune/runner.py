"""``hpc-reid tune``: Bayesian search (Ax) over real training runs, scheduled by Ray Tune.

Each trial is a real ``train()`` of the base config with the suggested values, on one process or
(``workers_per_trial > 1``) on Ray Train workers. Every periodic evaluation reports the objective
(mAP, or (rank-1 + mAP) / 2), mAP and rank-1 to Tune with the trainer's checkpoint; ASHA stops
trials whose objective trails at an evaluation epoch; :class:`AxClientSearcher` feeds every
evaluation to Ax. Everything lives in ``<logging.output_dir>/tune/<name>``: Tune's experiment
state and trial folders, each trial's training run under ``trials/<trial id>``, and the outputs
``results.csv``, ``best.yaml``, ``progress.png``, ``params.png``, ``ax_experiment.json``.
``resume=True`` restores that folder's Tune experiment (finished trials stay finished, running
ones continue from their last checkpoint) with the Ax state saved beside it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from hpc_reid.atomic import write_atomic
from hpc_reid.config import SYNTHETIC, Config, ConfigError, build_config
from hpc_reid.data.build import dataset_root
from hpc_reid.engine.errors import TrainingError
from hpc_reid.tune import report
from hpc_reid.tune.searcher import AxClientSearcher
from hpc_reid.tune.space import SearchSpace, parse_space, set_key

Objective = Literal["map", "mean", "rank1"]
#: each objective's label in the plots
OBJECTIVE_LABELS = {"map": "mAP", "mean": "(rank-1 + mAP) / 2", "rank1": "rank-1"}
INSTALL = "pip install 'hpc-reid[ray]'"
SETUP_FILE = "search.yaml"  # what a resumed search reloads: base config, space, settings
# launcher variables a trial must not inherit (an srun'ed `ray start` exports SLURM_*): a
# one-process trial is one process whatever the allocation looks like
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")


def objective_value(metrics: dict[str, Any], objective: Objective) -> float:
    """mAP, rank-1 (the fine-grained ReID search's choice on CUHK01, iLIDS-VID, PRID 2011), or
    their mean (fractions in [0, 1])."""
    if objective == "map":
        return float(metrics["mAP"])
    if objective == "rank1":
        return float(metrics["rank-1"])
    return 0.5 * (float(metrics["rank-1"]) + float(metrics["mAP"]))


@dataclass
class SearchSettings:
    trials: int
    concurrent: int
    objective: Objective = "map"
    seed: int = 0
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1
    early_stopping: bool = True
    init_trials: int | None = None

    def check(self) -> None:
        if self.trials < 1 or self.concurrent < 1:
            raise ConfigError(f"--trials {self.trials} / --concurrent {self.concurrent}: need >= 1")
        if self.cpus_per_trial <= 0 or self.workers_per_trial < 1:
            raise ConfigError("--cpus-per-trial must be > 0 and --workers-per-trial >= 1")
        if self.objective not in OBJECTIVE_LABELS:
            raise ConfigError(
                f"--objective {self.objective!r}: expected one of {', '.join(OBJECTIVE_LABELS)}"
            )


def require_tune() -> None:
    """Raise TrainingError with the install command when Ray Tune or Ax is missing."""
    try:
        import ax  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError as exc:
        raise TrainingError(f"hpc-reid tune needs Ray Tune and Ax ({exc}): {INSTALL}") from None


def search_dir_of(config: Config, name: str | None) -> Path:
    return (Path(config.logging.output_dir) / "tune" / (name or config.name)).resolve()


# ---------------------------------------------------------------------------- the trial


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    objective: Objective,
    trial_root: str,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    space: SearchSpace | None = None,
) -> None:
    """One Tune trial: train the base config with ``params`` (and the values ``space`` derives
    from them), reporting every evaluation."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    data = json.loads(json.dumps(base))
    values = {**params, **(space.derived_values(params) if space is not None else {})}
    for key, value in values.items():
        set_key(data, key, value)
    set_key(data, "logging.output_dir", trial_root)
    set_key(data, "logging.run_name", trial_id)
    set_key(data, "logging.progress_bar", False)
    config = build_config(data, f"trial {trial_id}")
    if workers > 1:
        _run_trial_on_ray_train(config, objective, workers, cpus_per_worker, trial_root, trial_id)
        return
    import torch

    from hpc_reid.engine.trainer import train

    for var in _LAUNCHER_VARS:
        os.environ.pop(var, None)

    def reporter(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, bool | int | float)}
        scalars["objective"] = objective_value(metrics, objective)
        # CPU numbers depend on the thread count (Ray sets OMP_NUM_THREADS to the trial's
        # CPUs): recorded so best.yaml can say how to retrain to the same numbers
        scalars["threads"] = torch.get_num_threads()
        if checkpoint is None:
            tune.report(scalars)
            return
        with tempfile.TemporaryDirectory(prefix="hpc-reid-tune-") as folder:
            shutil.copy2(checkpoint, Path(folder) / "checkpoint.pt")
            tune.report(scalars, checkpoint=tune.Checkpoint.from_directory(folder))

    previous = tune.get_checkpoint()
    if previous is None:
        # a trial restarted from scratch (no report yet when the search was interrupted)
        shutil.rmtree(Path(trial_root) / trial_id, ignore_errors=True)
        train(config, reporter=reporter)
        return
    with previous.as_directory() as folder:
        train(config, resume=str(Path(folder) / "checkpoint.pt"), reporter=reporter)


def _run_trial_on_ray_train(config, objective, workers, cpus_per_worker, trial_root, trial_id):
    """A multi-worker trial: ``train_on_ray`` inside the trial; Ray Train's reports reach Tune
    through Ray's TuneReportCallback, with the objective added."""
    try:
        from hpc_reid.launch.ray_launcher import train_on_ray
    except ImportError as exc:
        raise TrainingError(
            f"--workers-per-trial > 1 needs the Ray Train launcher ({exc})"
        ) from None
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**m, "objective": objective_value(m, objective)} for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    train_on_ray(
        config,
        num_workers=workers,
        cpus_per_worker=cpus_per_worker,
        resume="auto",
        callbacks=[ObjectiveReport()],
        storage_path=Path(trial_root) / trial_id,
        name="ray-train",
    )


# ---------------------------------------------------------------------------- the search


def _absolute(config: Config) -> Config:
    """File and folder keys resolved here: trials run in folders (and on nodes) of their own."""
    from hpc_reid.launch.ray_launcher import with_absolute_paths

    return with_absolute_paths(config)


def prepare(
    config: Config,
    space_raw: dict[str, Any] | None,
    space_source: str,
    settings: SearchSettings | None,
    name: str | None,
    resume: bool,
) -> tuple[Path, Config, SearchSpace, SearchSettings, dict[str, Any]]:
    """Validate everything before Ray starts; a resumed search reloads its saved setup
    (``config`` then only locates its folder: ``logging.output_dir`` and the name)."""
    require_tune()
    if resume:
        folder = search_dir_of(config, name)
        setup_path = folder / SETUP_FILE
        if not setup_path.is_file():
            raise ConfigError(f"tune --resume: no search to resume in {folder} ({SETUP_FILE})")
        setup = yaml.safe_load(setup_path.read_text())
        base = build_config(setup["config"], str(setup_path))
        space = parse_space(setup["space"], base, f"{setup_path} (space)")
        return folder, base, space, SearchSettings(**setup["settings"]), setup
    assert space_raw is not None and settings is not None
    settings.check()
    folder = search_dir_of(config, name)
    if (folder / SETUP_FILE).exists():
        raise ConfigError(
            f"a search already exists in {folder}: add --resume to continue it, or give --name"
        )
    space = parse_space(space_raw, config, space_source)
    setup = {
        "config": config.to_dict(),
        "space": space_raw,
        "space_file": space_source,
        "settings": settings.__dict__,
    }
    return folder, config, space, settings, setup


def run_search(
    folder: Path,
    base: Config,
    space: SearchSpace,
    settings: SearchSettings,
    setup: dict[str, Any],
    *,
    address: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the search in ``folder``; write and return its outputs."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # Tune snapshots its experiment state (with the Ax state) at most this often: often enough
    # that an interrupted search loses at most a couple of seconds of bookkeeping
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # ... and, with CheckpointConfig(num_to_keep=1), after every trial checkpoint: wanted here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_atomic(folder / SETUP_FILE, yaml.safe_dump(setup, sort_keys=False, width=100))
    base = space.config(base.to_dict(), {}, f"{space.source} (its fixed values)")
    trial_base = _absolute(base)
    if trial_base.data.dataset == SYNTHETIC:
        # generated once here, not by the first concurrent trials racing for the same folder
        dataset_root(trial_base.data)
    trial_base = trial_base.to_dict()
    env = {k: os.environ[k] for k in ("HPC_REID_CACHE",) if k in os.environ}
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            include_dashboard=False,
            runtime_env={"env_vars": env} if env else None,
            log_to_driver=True,
        )
    nodes = [n for n in ray.nodes() if n["Alive"]]
    total_cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    print(f"hpc-reid tune: Ray cluster of {len(nodes)} node(s), {total_cpus:g} CPUs, {gpus:g} GPUs")
    workers = settings.workers_per_trial
    trainable = tune.with_parameters(
        run_trial,
        base=trial_base,
        objective=settings.objective,
        trial_root=str(folder / "trials"),
        workers=workers,
        cpus_per_worker=settings.cpus_per_trial,
        space=space,
    )
    # a multi-worker trial only coordinates: its Ray Train workers hold the CPUs (Tune refuses
    # a trial of no resources at all)
    cpus = settings.cpus_per_trial if workers == 1 else 0.01
    trainable = tune.with_resources(trainable, {"cpu": cpus})
    if resume:
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric="objective",
                mode="max",
                search_alg=AxClientSearcher(
                    space,
                    seed=settings.seed,
                    init_trials=settings.init_trials,
                    name=folder.name,
                    snapshot_path=folder / "ax_experiment.json",
                ),
                scheduler=_scheduler(base, space, settings, ASHAScheduler, FIFOScheduler),
                num_samples=settings.trials,
                max_concurrent_trials=settings.concurrent,
            ),
            run_config=tune.RunConfig(
                name=folder.name,
                storage_path=str(folder.parent),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    try:
        results = tuner.fit()
        return write_outputs(folder, base, space, settings, results)
    finally:
        if started:
            ray.shutdown()  # also flushes the trials' log lines before the summary is printed


def _scheduler(base: Config, space: SearchSpace, settings, asha, fifo):
    """ASHA on the objective at evaluation epochs: a trial reaching an evaluation epoch whose
    objective is below the top 1/2 of those reported there is stopped."""
    every = base.evaluation.every_epochs
    if not settings.early_stopping or every == 0:
        return fifo()
    epochs = space.params.get("schedule.epochs")
    max_t = int(epochs.extremes()[-1]) if epochs is not None else base.schedule.epochs
    max_t = max(max_t, int(space.fixed.get("schedule.epochs", max_t)))
    if every >= max_t:
        return fifo()
    return asha(time_attr="epoch", max_t=max_t, grace_period=every, reduction_factor=2)


def _searcher_state(folder: Path) -> dict[str, Any]:
    """The Ax state Tune saved last with the experiment (see AxClientSearcher.save)."""
    files = sorted(glob.glob(str(folder / "searcher-state-*.pkl")))
    states = []
    for file in files:
        try:
            data = json.loads(Path(file).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # Tune's own wrapper state, not ours
        if "ax_client" in data:
            states.append(data)
    if not states:
        raise TrainingError(f"no Ax searcher state in {folder}")
    return states[-1]


def write_outputs(folder: Path, base: Config, space: SearchSpace, settings, results) -> dict:
    state = _searcher_state(folder)
    write_atomic(folder / "ax_experiment.json", json.dumps(state["ax_client"]))
    rows = report.results_rows(results, state["trial_index"], space)
    best = report.best_row(rows)
    outputs = {
        "folder": folder,
        "rows": rows,
        "best": best,
        "results": report.write_csv(rows, folder / "results.csv"),
        "ax_experiment": folder / "ax_experiment.json",
    }
    label = OBJECTIVE_LABELS[settings.objective]
    outputs["progress"] = report.plot_progress(rows, folder / "progress.png", label)
    outputs["params"] = report.plot_params(rows, space, folder / "params.png", label)
    if best is not None:
        outputs["best_yaml"] = report.write_best_yaml(
            base.to_dict(), space, best, folder / "best.yaml", folder, settings.workers_per_trial
        )
    return outputs
