"""Stages: a run that starts from another run's weights, and a chain of runs as one command.

Several recipes train in stages, each a run of its own with its own optimizer, schedule and
sampler: the anchor loss fine-tunes a trained BoT model for 40 more epochs with Adam at a constant
3.5e-6 and random batches (Chen et al., Cluster-level Feature Alignment for Person
Re-identification, arXiv 2008.06810; its released scripts restart from the stage-1 checkpoint), SAN
starts after SAN-PG, a trunk moves to another data set. Stage 2 takes stage 1's weights and nothing
else (``model.init_from``), and lives in its own run folder, so that ``--resume auto`` continues
stage 2 from its own checkpoints, never stage 1's, and still works once stage 1's files are gone.

:func:`init_weights_from` loads any checkpoint the project writes (DDP, ``best.pt``, a DeepSpeed
run's, an ``export-weights`` file, or a run / checkpoints folder / ``latest`` pointer: its newest)
into the model :func:`hpc_reid.models.build_model` made, refusing one of another architecture or
data set with the keys that differ. :func:`run_stages` runs ``train --config s1.yaml --then
s2.yaml`` on every rank of one launch.
"""

from __future__ import annotations

import copy
import re
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from hpc_reid.config import Config, ConfigError
from hpc_reid.engine import checkpoint
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.errors import CheckpointError, TrainingError
from hpc_reid.engine.trainer import StopSignal, run_dir_of, select_device, train
from hpc_reid.launch.distributed import choose_backend, detect_env, process_group

#: Names shown per kind of mismatching key in a refusal (the counts are always given).
SHOWN = 5
# CheckpointManager.save's file names: epoch_EEEE_step_SSSSSSSS.pt (epochs done, global step)
_PERIODIC = re.compile(r"epoch_(\d+)_step_(\d+)\.pt")
# DeepSpeed's sharded checkpoint (a tag folder under checkpoints/deepspeed/): one model-states
# file per model-parallel rank, or per data-parallel rank under ZeRO-3
_ZERO_SHARDS = "*model_states.pt"


# ------------------------------------------------------------------------ init_from: weights


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names, as ``hpc-reid eval --checkpoint`` reads it
    (:func:`hpc_reid.engine.checkpoint.resolve_checkpoint`); DeepSpeed's sharded folders are
    refused with what to give instead."""
    path = Path(path)
    if path.is_dir() and (zero := _zero_folder(path)) is not None:
        raise CheckpointError(_zero_folder_message(path, zero))
    return checkpoint.resolve_checkpoint(path)


def _zero_folder(path: Path) -> Path | None:
    """``path`` as DeepSpeed's tag folder (``checkpoints/deepspeed/step_N``), or the newest tag
    folder when ``path`` is their parent; None when it is neither."""
    if any(path.glob(_ZERO_SHARDS)):
        return path
    tags = sorted(p for p in path.glob("step_*") if p.is_dir() and any(p.glob(_ZERO_SHARDS)))
    return tags[-1] if tags else None


def _zero_folder_message(given: Path, tag: Path) -> str:
    # The trainer's .pt written with tag step_N is checkpoints/epoch_*_step_N.pt (both count the
    # trainer's steps), two levels up from the tag folder.
    step = tag.name.removeprefix("step_")
    found = sorted(tag.parent.parent.glob(f"epoch_*_step_{step}.pt"))
    pt = str(found[-1]) if found else f"{tag.parent.parent}/epoch_*_step_{step}.pt"
    return (
        f"model.init_from={given}: {tag} is DeepSpeed's sharded ZeRO checkpoint, not an hpc-reid "
        f"checkpoint. Give the checkpoint the trainer wrote with it ({pt}; its fp32 master "
        f"weights are consolidated on loading), or export them first: hpc-reid export-weights "
        f"{pt} --out weights.pt, then model.init_from=weights.pt"
    )


def _is_16bit_deepspeed(state: dict[str, Any]) -> bool:
    """Whether the checkpoint is a DeepSpeed run's with bf16/fp16 weights: its ``.pt`` then holds
    the 16-bit copy of the model, and the fp32 master weights are only in the ZeRO shards."""
    info = state["strategy"].get("deepspeed")
    if info is None:
        return False
    ds = info.get("config", {})
    return any((ds.get(name) or {}).get("enabled", False) for name in ("bf16", "fp16"))


def _fp32_master_weights(file: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a DeepSpeed checkpoint, consolidated from its ZeRO shards as
    ``hpc-reid export-weights`` does (through a temporary export, read back)."""
    from hpc_reid.engine.deepspeed_strategy import export_weights

    with tempfile.TemporaryDirectory(prefix="hpc-reid-init-from-") as tmp:
        try:
            out = export_weights(file, Path(tmp) / "weights.pt")
        except ImportError as exc:  # deepspeed is an optional extra
            raise CheckpointError(
                f"model.init_from={file}: a DeepSpeed checkpoint with 16-bit weights, whose fp32 "
                f"master weights need deepspeed to consolidate ({exc}); pip install "
                "'hpc-reid[deepspeed]', or run hpc-reid export-weights where it is installed "
                "and set model.init_from to the exported file"
            ) from None
        return load_checkpoint(out)["strategy"]["model"]


def _shown(keys: Sequence[str]) -> str:
    more = f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _meta_differences(stored: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    if not (stored and ours):  # a checkpoint or a caller that states none
        return []
    keys = [*ours, *(k for k in stored if k not in ours)]
    return [
        f"{k}: checkpoint {stored.get(k)!r}, this run {ours.get(k)!r}"
        for k in keys
        if stored.get(k) != ours.get(k)
    ]


def _mismatch_message(
    file: Path,
    missing: Sequence[str],
    unexpected: Sequence[str],
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    stored_meta: dict[str, Any],
    meta: dict[str, Any],
) -> str:
    parts = [f"model.init_from: checkpoint {file} holds another model's weights"]
    ours, theirs = meta.get("num_classes"), stored_meta.get("num_classes")
    if ours is not None and theirs is not None and ours != theirs:
        parts.append(
            f"its ID classifier has {theirs} classes and this run's training set has {ours} "
            "identities: it was trained on another data set, and its classifier cannot start "
            "this one"
        )
    differences = _meta_differences(stored_meta, meta)
    if differences:
        parts.append("model: " + "; ".join(differences))
    if missing:
        parts.append(
            f"{len(missing)} missing key(s) (this model's, not in the checkpoint): "
            + _shown(missing)
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected key(s) (the checkpoint's, not in this "
            "model): " + _shown(unexpected)
        )
    if shapes:
        shown = [f"{k} {list(a)} vs {list(b)}" for k, (a, b) in shapes.items()]
        parts.append(
            f"{len(shapes)} shape mismatch(es) (checkpoint vs this model): " + _shown(shown)
        )
    return "; ".join(parts)


def load_fitting_weights(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    file: Path,
    stored_meta: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Load ``weights`` into ``model`` when they are exactly its state dict's keys and shapes;
    otherwise a :class:`CheckpointError` naming ``file`` and the missing, unexpected and
    shape-mismatched keys (with ``meta``, this run's :func:`~hpc_reid.engine.trainer.model_meta`,
    also the architecture keys that differ and, plainly, a classifier of another data set).

    A refused checkpoint leaves the model untouched. Keys that differ only by name are tried on
    a copy of the model first: ``load_state_dict``'s pre-hooks rename the keys of checkpoints
    written before heads were registered (``classifier.*`` -> ``head.classifier.*``)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = {
        k: (tuple(weights[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    }
    if (missing or unexpected) and not shapes:
        try:
            copy.deepcopy(model).load_state_dict(weights)
        except RuntimeError:  # not renamed into a fit: refused below, listing the keys as given
            pass
        else:
            missing, unexpected = [], []
    if missing or unexpected or shapes:
        raise CheckpointError(
            _mismatch_message(file, missing, unexpected, shapes, stored_meta or {}, meta or {})
        )
    model.load_state_dict(weights)


def init_weights_from(
    model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None
) -> str:
    """Load the weights of the checkpoint ``path`` names into ``model`` (weights only: nothing of
    its optimizer, schedule, sampler, RNG or loss state); returns the line for the run log,
    naming the file and the run, epoch and step it was written at.

    ``meta``: this run's :func:`~hpc_reid.engine.trainer.model_meta`, for a plain refusal of a
    checkpoint of another data set and a note of architecture keys that differ without changing
    any weight's shape (``last_stride``, say). A DeepSpeed run's checkpoint with 16-bit weights
    gives its fp32 master weights, consolidated from its ZeRO shards."""
    file = resolve_checkpoint(path)
    state = load_checkpoint(file)
    weights, how = state["strategy"]["model"], ""
    if _is_16bit_deepspeed(state):
        weights = _fp32_master_weights(file)
        how = "; fp32 master weights consolidated from its DeepSpeed ZeRO shards"
    stored_meta = state.get("model_meta") or {}
    load_fitting_weights(model, weights, file, stored_meta, meta)
    config = state.get("config") or {}
    run = (config.get("logging") or {}).get("run_name") or config.get("name")
    epochs = (config.get("schedule") or {}).get("epochs")
    where = ", ".join(
        part
        for part in (
            f"run {run}" if run else "",
            f"epoch {state.get('epoch')}" + (f" of {epochs}" if epochs else ""),
            f"step {state.get('step')}",
            f"exported from {state['exported_from']}" if "exported_from" in state else "",
        )
        if part
    )
    notes = _meta_differences(stored_meta, meta or {})
    return (
        f"model.init_from: weights of {file.resolve()} ({where}{how})"
        + (f"; the model differs in {'; '.join(notes)} (every weight fits)" if notes else "")
        + "; optimizer, schedule, sampler and RNG start anew"
    )


def check_separate_run(init_from: str | Path, run_dir: Path) -> None:
    """Refuse a stage that starts from a checkpoint inside its own run folder: ``--resume auto``
    of that run would then find the earlier stage's checkpoints and continue the earlier stage
    (a stage-2 config inheriting stage 1's name with ``_base_`` and no run name of its own)."""
    source, folder = Path(init_from).resolve(), run_dir.resolve()
    if folder == source or folder in source.parents:
        raise CheckpointError(
            f"model.init_from={init_from} is in this run's own folder {run_dir}: --resume auto "
            "would continue the run it starts from. Give this stage a run folder of its own "
            "(logging.run_name, or another name)"
        )


def init_stage(
    model: nn.Module,
    init_from: str,
    meta: dict[str, Any],
    run_dir: Path,
    resume_path: Path | None,
) -> str:
    """The trainer's step for ``model.init_from``: checks the stage has its own run folder, then
    loads the weights unless the run resumes (a resumed stage takes everything from its own
    checkpoint; the file it started from may be gone by then). Returns the run-log line."""
    check_separate_run(init_from, run_dir)
    if resume_path is not None:
        return f"model.init_from={init_from} not loaded: resuming from {resume_path}"
    return init_weights_from(model, init_from, meta)


# ------------------------------------------------------------------------ a chain of stages

T = TypeVar("T")


def final_checkpoint(run_dir: Path, epochs: int) -> Path | None:
    """The run's checkpoint at the end of its last epoch (``epochs`` done), if written."""
    found = [(p, _PERIODIC.fullmatch(p.name)) for p in CheckpointManager(run_dir).checkpoints()]
    finals = [p for p, m in found if m and int(m.group(1)) == epochs]
    return finals[-1] if finals else None


def finished_stage(run_dir: Path, epochs: int) -> Path | None:
    """The final checkpoint of a run that completed (its final evaluation wrote
    ``results.json`` after it), else None."""
    if not (run_dir / "results.json").is_file():
        return None
    return final_checkpoint(run_dir, epochs)


def _from_main(compute: Callable[[], T]) -> T:
    """Rank 0's ``compute()`` on every rank: the stage decisions rest on files that a network
    file system may show another node late, and every rank must follow the same chain. The work
    is a few file lookups, so the other ranks barely wait in the broadcast."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_stage_folders(stages: Sequence[tuple[str, Config]], resume: str | None) -> None:
    """Every stage in a run folder of its own, and (without ``--resume auto``) none holding
    checkpoints yet, so the chain fails now rather than after the earlier stages trained."""
    seen: dict[Path, str] = {}
    for source, config in stages:
        folder = run_dir_of(config).resolve()
        if folder in seen:
            raise ConfigError(
                f"train --then: stages {seen[folder]} and {source} both write to run folder "
                f"{folder}; give each stage config its own name or logging.run_name (a --set "
                "applies to every stage: set logging.output_dir there rather than "
                "logging.run_name)"
            )
        seen[folder] = source
        if resume is None and CheckpointManager(folder).latest() is not None:
            raise TrainingError(
                f"run folder {folder} of stage {source} already holds checkpoints; pass "
                "--resume auto to continue the chain (finished stages are skipped), or choose "
                "other run folders"
            )


def run_stages(
    stages: Sequence[tuple[str, Config]],
    resume: str | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """``hpc-reid train --config s1.yaml --then s2.yaml ...``: train each ``(source, config)``
    in turn, in one launch; every rank runs the same chain.

    A stage whose ``model.init_from`` is null starts from the previous stage's final checkpoint.
    With ``resume="auto"`` a finished stage (``results.json`` and a final-epoch checkpoint in its
    run folder) is skipped and the first unfinished one resumes from its own checkpoints.
    ``max_steps`` applies to each stage's own step count. A stage that stops early (pre-emption
    signal, ``max_steps``) ends the chain: its result, with ``stage`` (1-based), is returned so
    that the caller requeues; otherwise the last stage's summary (``{"skipped": run folder}``
    when it was skipped).

    The process group is joined once for the whole chain and each stage's ``train`` finds it
    ready: joining a fresh one per stage would make rank 0 host a new rendezvous store while
    slower ranks may still reach the previous one.
    """
    if resume not in (None, "auto"):
        raise ConfigError(f"train --then: --resume {resume}: a chain resumes with auto only")
    check_stage_folders(stages, resume)
    env = detect_env()
    configs = [config for _, config in stages]
    device = select_device(configs[0].engine.device, env.local_rank)
    backends = {choose_backend(c.distributed.backend, device) for c in configs}
    if len(backends) > 1 or {c.engine.device for c in configs} != {configs[0].engine.device}:
        raise ConfigError(
            "train --then: the stages share one process group, so engine.device and "
            "distributed.backend must be the same in every stage"
        )
    timeout_s = max(c.distributed.timeout_s for c in configs)
    with process_group(env, backends.pop(), timeout_s):
        # Between stages (and while a stage builds) USR1/TERM are recorded rather than ending the
        # process, and a stop agreed at a stage boundary ends the chain for a requeue.
        stop = StopSignal()

        def say(line: str) -> None:
            if env.rank == 0:
                print(f"hpc-reid: {line}", flush=True)

        try:
            previous: Path | None = None
            result: dict[str, Any] = {}
            for i, (source, config) in enumerate(stages, 1):
                name = f"stage {i}/{len(stages)} ({source})"
                if stop.agreed(device):
                    say(f"stop signal before {name}: the chain ends here")
                    return {"stopped_at_step": None, "preempted": True, "stage": i}
                if previous is not None and config.model.init_from is None:
                    config = config.model_copy(deep=True)
                    config.model.init_from = str(previous)
                run_dir, epochs = run_dir_of(config), config.schedule.epochs
                done = _from_main(partial(finished_stage, run_dir, epochs)) if resume else None
                if done is not None:
                    say(f"{name} already finished in {run_dir}: skipped")
                    previous, result = done, {"skipped": str(run_dir)}
                    continue
                say(f"{name} in {run_dir}")
                result = train(config, resume=resume, max_steps=max_steps)
                if "stopped_at_step" in result:
                    say(f"{name} stopped at step {result['stopped_at_step']}")
                    return {**result, "stage": i}
                previous = _from_main(partial(final_checkpoint, run_dir, epochs))
                if previous is None:
                    raise TrainingError(f"{name} ended without a final checkpoint in {run_dir}")
            return {**result, "stage": len(stages)}
        finally:
            stop.restore()
