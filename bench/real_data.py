"""Recipes on real images: every (variant, data set, split) trained and evaluated, then mean ± std
over splits and each variant's paired difference from a reference, split by split.

A plan (``configs/ablation/real_data.yaml``) names a base config, the variants (``--set`` overrides
of it, another config, or an evaluation of another variant's checkpoint with ``evaluation.*`` or
``model.retrieval_feature`` overrides), the reference variant, and the data sets with their folders
under ``--shared-data`` (``viper: viper``, or ``LABEL: {dataset: NAME, root: FOLDER, options:
{...}}`` for a set under another protocol, e.g. VehicleID's ``test_size``: each label its own
rows).
Split ``s`` of data set ``d`` is the partition ``data.options = {split_id: s, seed: --seed}``
gives (each parser draws its test identities with ``np.random.default_rng([seed, split_id])``),
the same for every variant: splits vary more than recipes, so variants are compared split by split
(the paired difference), not only by their means.

Each run is one ``hpc-reid train`` (or ``hpc-reid eval --checkpoint``) process writing
``OUT/runs/DATASET/split_S/VARIANT/results.json``; a run whose results.json exists is skipped, so an
interrupted campaign continues where it stopped. Then ``OUT/summary.json`` and ``OUT/summary.md``
(a table per data set, ready for the README) are written from whatever results exist; a missing run
is listed there, never silently dropped.

    python bench/real_data.py --plan configs/ablation/real_data.yaml --splits 5 --out runs/ablation
    python bench/real_data.py ... --variants bot,flip_average --datasets viper   # a subset
    python bench/real_data.py ... --set schedule.epochs=1 --set schedule.milestones=[1]  # smoke
    python bench/real_data.py ... --only-aggregate                               # tables only
    python bench/real_data.py ... --record       # and append the tables to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import yaml

from hpc_reid.atomic import write_atomic
from hpc_reid.bench.machine import cpu_model
from hpc_reid.cli import add_overrides
from hpc_reid.config import (
    Config,
    ConfigError,
    config_with_overrides,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
METRICS = ("rank-1", "rank-5", "rank-10", "mAP")
#: The split count every registered small set defines (viper, prid2011, ilids: NUM_SPLITS).
MAX_SPLITS = 10
#: Settings of every run that only concern output: no progress bar, TensorBoard or plots.
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "evaluation.plots=false"]


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Variant:
    """One recipe: ``config`` with ``overrides`` (with ``init_from``, trained from the final
    weights of that variant's run on the same split: a stage 2); or, with ``start_of``, the
    evaluation of that variant's initial weights (its run evaluates them before training: the
    untrained row); or, with ``eval_of``, no training: the checkpoint of that variant's run on the
    same split evaluated with ``overrides``."""

    name: str
    config: Path | None
    overrides: tuple[str, ...] = ()
    eval_of: str | None = None
    start_of: str | None = None
    init_from: str | None = None


@dataclass(frozen=True)
class PlanDataset:
    """One data set of a plan: its registered name, its folder under the shared data folder and
    ``data.options`` beside each split's (e.g. VehicleID's ``test_size``)."""

    name: str
    folder: str
    options: dict = field(default_factory=dict)


@dataclass
class Plan:
    source: Path
    reference: str
    variants: dict[str, Variant]
    datasets: dict[str, PlanDataset]  # label (run folders, --datasets, {dataset}) -> data set
    shared_paths: dict[str, str] = field(default_factory=dict)
    splits: int = 5  # the default of --splits for this plan


def _strings(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of KEY=VALUE strings, got {value!r}")
    return tuple(value)


def _variant(
    name: str, spec, base: Path, here: Path, where: str, common: tuple[str, ...] = ()
) -> Variant:
    """One variant of a plan; ``common`` (the plan's ``set``) goes before the overrides of every
    variant that trains (an evaluation inherits it with the checkpoint's config)."""
    if spec is None or isinstance(spec, list):
        return Variant(name, base, common + _strings(spec, where))
    if not isinstance(spec, dict) or set(spec) - {
        "config",
        "set",
        "eval_of",
        "start_of",
        "init_from",
    }:
        raise ConfigError(
            f"{where}: expected a list of overrides or a mapping with keys config, set, eval_of, "
            f"start_of, init_from; got {spec!r}"
        )
    if "start_of" in spec:
        if set(spec) != {"start_of"}:
            raise ConfigError(f"{where}: start_of reads another variant's run; nothing else")
        return Variant(name, None, (), start_of=str(spec["start_of"]))
    if "eval_of" in spec and ("config" in spec or "init_from" in spec):
        raise ConfigError(
            f"{where}: eval_of evaluates another variant's checkpoint; it trains none"
        )
    overrides = _strings(spec.get("set"), f"{where}.set")
    if "eval_of" in spec:
        return Variant(name, None, overrides, str(spec["eval_of"]))
    config = (here / spec["config"]).resolve() if "config" in spec else base
    init_from = str(spec["init_from"]) if "init_from" in spec else None
    return Variant(name, config, common + overrides, init_from=init_from)


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file; every error names the file and the key."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"plan {path}: cannot read it: {exc}") from None
    allowed = {"base", "reference", "datasets", "shared_paths", "variants", "splits", "set"}
    if not isinstance(raw, dict) or set(raw) - allowed or not {"base", "variants"} <= set(raw):
        raise ConfigError(f"plan {path}: expected a mapping with keys {sorted(allowed)}")
    base = (path.parent / raw["base"]).resolve()
    if not isinstance(raw["variants"], dict) or not raw["variants"]:
        raise ConfigError(f"plan {path}: variants must map names to variants")
    common = _strings(raw.get("set"), f"plan {path}: set")
    variants = {
        str(name): _variant(
            str(name), spec, base, path.parent, f"plan {path}: variants.{name}", common
        )
        for name, spec in raw["variants"].items()
    }
    reference = str(raw.get("reference") or next(iter(variants)))
    if reference not in variants:
        raise ConfigError(f"plan {path}: reference {reference!r} is not one of the variants")
    order = list(variants)
    for v in variants.values():
        for key in ("eval_of", "start_of", "init_from"):
            name = getattr(v, key)
            source = variants.get(name) if name else None
            if name and (source is None or source.eval_of or source.start_of):
                raise ConfigError(
                    f"plan {path}: variants.{v.name}.{key}={name!r} must name a variant that trains"
                )
            if key == "init_from" and name and order.index(name) > order.index(v.name):
                raise ConfigError(  # training variants run in the plan's order
                    f"plan {path}: variants.{v.name}.init_from={name!r}: define {name!r} first"
                )
    if variants[reference].start_of:
        raise ConfigError(f"plan {path}: the reference {reference!r} must be a variant that runs")
    splits = raw.get("splits", 5)
    if not isinstance(splits, int) or not 1 <= splits <= MAX_SPLITS:
        raise ConfigError(f"plan {path}: splits={splits!r}: expected 1..{MAX_SPLITS}")
    datasets = raw.get("datasets") or {}
    shared = raw.get("shared_paths") or {}
    for key, value in (("datasets", datasets), ("shared_paths", shared)):
        if not isinstance(value, dict):
            raise ConfigError(f"plan {path}: {key} must be a mapping, got {value!r}")
    entries = {
        str(label): _plan_dataset(str(label), spec, f"plan {path}: datasets.{label}")
        for label, spec in datasets.items()
    }
    return Plan(path, reference, variants, entries, dict(shared), splits)


def _plan_dataset(label: str, spec, where: str) -> PlanDataset:
    """``LABEL: FOLDER`` (LABEL is the registered name) or ``LABEL: {dataset: NAME, root: FOLDER,
    options: {...}}``, e.g. ``vehicleid_1600: {dataset: vehicleid, root: VehicleID, options:
    {test_size: 1600}}``: one set under several protocols, each its own rows and run folders."""
    if isinstance(spec, str):
        return PlanDataset(label, spec)
    keys = {"dataset", "root", "options"}
    if not isinstance(spec, dict) or set(spec) - keys or "root" not in spec:
        raise ConfigError(
            f"{where}: expected a folder under the shared data folder or a mapping with root and "
            f"optionally dataset (the registered name, default {label!r}) and options; got {spec!r}"
        )
    options = spec.get("options") or {}
    if not isinstance(options, dict) or {"split_id", "seed"} & set(options):
        raise ConfigError(
            f"{where}.options: expected a mapping of data.options without split_id and seed (the "
            f"runner sets those per split), got {options!r}"
        )
    return PlanDataset(str(spec.get("dataset", label)), str(spec["root"]), dict(options))


def select(plan: Plan, names: Iterable[str] | None) -> list[Variant]:
    """The variants named (all when None), with the reference and every eval_of source added,
    in the plan's order: a variant that trains comes before the evaluations of its checkpoint."""
    if names is None:
        wanted = set(plan.variants)
    else:
        wanted = set(names)
        unknown = sorted(wanted - set(plan.variants))
        if unknown:
            raise ConfigError(f"--variants: {unknown} not in {plan.source}: {list(plan.variants)}")
    wanted.add(plan.reference)
    for _ in plan.variants:  # sources of sources (an evaluation of a stage 2 needs its stage 1)
        for key in ("eval_of", "start_of", "init_from"):
            wanted |= {getattr(plan.variants[n], key) for n in set(wanted)} - {None}
    chosen = [v for v in plan.variants.values() if v.name in wanted]
    derived = [v for v in chosen if v.eval_of or v.start_of]
    return [v for v in chosen if v not in derived] + derived


# ----------------------------------------------------------------------------- runs


def split_options(seed: int, split: int, dataset: str | None = None) -> dict[str, int]:
    """``data.options`` of split ``split``: the partition is a function of (seed, split) only; a
    set whose splits are fixed in its files (iLIDS-VID, PRID 2011 multi-shot) takes no seed, so
    it gets ``split_id`` alone."""
    options = {"split_id": split, "seed": seed}
    if dataset is not None:
        from hpc_reid.data.build import check_options

        try:
            check_options(dataset, {"seed": seed})
        except ConfigError:
            del options["seed"]
    return options


def run_folder(out: Path, dataset: str, split: int, variant: str) -> Path:
    return out / "runs" / dataset / f"split_{split}" / variant


def entry_options(plan: Plan, dataset: str, split: int, seed: int) -> dict:
    """``data.options`` of a plan's data set ``dataset`` on split ``split``: its own options with
    the split's beside them."""
    entry = plan.datasets[dataset]
    return {**entry.options, **split_options(seed, split, entry.name)}


def data_overrides(plan: Plan, dataset: str, split: int, seed: int, shared: Path) -> list[str]:
    """The ``--set`` list that puts a run on split ``split`` of ``dataset`` (applied last, so no
    variant can move it to another partition) with the plan's shared paths."""
    if dataset not in plan.datasets:
        raise ConfigError(f"data set {dataset!r} is not in {plan.source}: {list(plan.datasets)}")
    entry = plan.datasets[dataset]
    options = entry_options(plan, dataset, split, seed)
    sets = [
        f"data.dataset={entry.name}",
        f"data.root={shared / entry.folder}",
        f"data.options={json.dumps(options).replace(chr(34), '')}",
    ]
    return sets + [f"{key}={shared / rel}" for key, rel in plan.shared_paths.items()]


@dataclass(frozen=True)
class Run:
    variant: Variant
    dataset: str
    split: int
    folder: Path
    argv: tuple[str, ...]  # the hpc-reid command line
    config: Config = field(compare=False)  # what that command line resolves to


def fill(override: str, dataset: str, out: Path) -> str:
    """A plan's override with ``{dataset}`` (the data set's label in the plan) and ``{out}`` (the
    campaign's ``--out`` folder) filled in: per-data-set inputs a recipe reads, e.g. SAN's pseudo
    textures generated for each set (``data.textures.root={out}/textures/{dataset}.h5``)."""
    return override.replace("{dataset}", dataset).replace("{out}", str(out))


def plan_runs(
    plan: Plan,
    variants: Sequence[Variant],
    datasets: Sequence[str],
    splits: Sequence[int],
    seed: int,
    shared: Path,
    out: Path,
    extra: Sequence[str] = (),
) -> list[Run]:
    """Every run in order (data set, split, then training variants before evaluations), its
    config resolved and validated now, so a bad key fails before hours of training."""
    for s in splits:
        if not 0 <= s < MAX_SPLITS:
            raise ConfigError(f"split {s}: the small sets define splits 0..{MAX_SPLITS - 1}")
    runs = []
    for dataset in datasets:
        for split in splits:
            data = data_overrides(plan, dataset, split, seed, shared)
            resolved = {}
            starts = {v.start_of for v in variants if v.start_of}
            for v in variants:
                if v.start_of:  # read from its source's run (results_start.json)
                    continue
                folder = run_folder(out, dataset, split, v.name)
                where = f"variant {v.name!r} of {plan.source}"
                overrides = [fill(o, dataset, out) for o in v.overrides]
                if v.eval_of:
                    source = resolved[v.eval_of].to_dict()
                    config = config_with_overrides(source, overrides, where)
                    weights = resolved[v.eval_of].model.weights_part()
                    changed = sorted(
                        k for k, x in config.model.weights_part().items() if x != weights[k]
                    )
                    if changed:  # model.retrieval_feature, a test-time choice, may change
                        raise ConfigError(
                            f"{where}: eval_of runs evaluate the same weights; they may not change "
                            f"{', '.join('model.' + k for k in changed)}"
                        )
                    ckpt = run_folder(out, dataset, split, v.eval_of) / "checkpoints" / "latest"
                    argv = ["eval", "--checkpoint", str(ckpt), "--out", str(folder)]
                    argv += [f"--set={s}" for s in (*overrides, *QUIET)]
                else:
                    logging = [f"logging.output_dir={folder.parent}", f"logging.run_name={v.name}"]
                    sets = [*overrides, *extra, *data, *QUIET, *logging]
                    if v.init_from:  # stage 2: the final weights of that variant on this split
                        sets.append(f"model.init_from={folder.parent / v.init_from}")
                    if v.name in starts:  # the untrained row: evaluated before training
                        sets.append("evaluation.at_start=true")
                    try:
                        config = load_config(v.config, sets)
                    except ConfigError as exc:
                        raise ConfigError(f"{where} on {dataset} split {split}: {exc}") from None
                    argv = ["train", "--config", str(v.config), "--resume", "auto"]
                    argv += [f"--set={s}" for s in sets]
                if config.data.options != entry_options(plan, dataset, split, seed):
                    raise ConfigError(f"{where}: data.options {config.data.options} moved")
                resolved[v.name] = config
                runs.append(Run(v, dataset, split, folder, tuple(argv), config))
    return runs


def _checkpoint_of(run: Run) -> list[str]:
    """An eval run's argv with the source run's newest checkpoint in place of ``.../latest``."""
    argv = list(run.argv)
    pointer = Path(argv[2])
    if not pointer.is_file():
        raise FileNotFoundError(
            f"{run.variant.name}: no checkpoint of {run.variant.eval_of} at {pointer.parent} "
            "(removed after its split finished? rerun with --keep-checkpoints after deleting "
            f"{pointer.parent.parent / 'results.json'})"
        )
    argv[2] = str(pointer.parent / pointer.read_text().strip())
    return argv


def run_logged(
    argv: Sequence[str], folder: Path, threads: int | None = None, in_process: bool = False
) -> dict:
    """One ``hpc-reid ARGV`` process (this interpreter's), with ``threads`` OpenMP threads (default:
    the environment's), its output appended to ``FOLDER/log.txt`` and its record (argv, exit
    status, wall seconds, threads) written to ``FOLDER/run.json``. ``in_process``: the same
    command line in this process (tests: no interpreter start-up)."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = list(argv)
    start = time.monotonic()
    with open(folder / "log.txt", "a") as log:
        prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
        log.write(f"$ {prefix}hpc-reid {shlex.join(argv)}\n")
        log.flush()
        if in_process:
            from contextlib import redirect_stderr, redirect_stdout

            from hpc_reid.cli import main

            with redirect_stdout(log), redirect_stderr(log):
                code = main(argv)
        else:
            cmd = [sys.executable, "-m", "hpc_reid.cli", *argv]
            env = dict(os.environ)
            if threads:
                env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            code = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
            ).returncode
    record = {"argv": argv, "returncode": code, "seconds": round(time.monotonic() - start, 1)}
    if threads:
        record["threads"] = threads
    (folder / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def execute(run: Run, in_process: bool = False, threads: int | None = None) -> dict:
    """Run one plan run (an eval_of run on its source's newest checkpoint): :func:`run_logged`."""
    argv = _checkpoint_of(run) if run.variant.eval_of else list(run.argv)
    return run_logged(argv, run.folder, None if in_process else threads, in_process)


def drop_checkpoints(runs: Sequence[Run]) -> None:
    """Remove the checkpoints of one (data set, split) once every run of it has results."""
    if all((r.folder / "results.json").is_file() for r in runs):
        for r in runs:
            shutil.rmtree(r.folder / "checkpoints", ignore_errors=True)


# ----------------------------------------------------------------------------- aggregation

Key = tuple[str, str, int]  # (variant, data set, split)


def collect(
    out: Path,
    variants: Iterable[str],
    datasets: Iterable[str],
    splits: Iterable[int],
    starts: Mapping[str, str] | None = None,
):
    """{(variant, data set, split): {metric: value}} of every run whose results.json exists;
    a variant in ``starts`` (variant -> source) reads its source's results_start.json."""
    found = {}
    starts = starts or {}
    for v in variants:
        for d in datasets:
            for s in splits:
                if v in starts:
                    path = run_folder(out, d, s, starts[v]) / "results_start.json"
                else:
                    path = run_folder(out, d, s, v) / "results.json"
                if path.is_file():
                    data = json.loads(path.read_text())
                    found[(v, d, s)] = {m: float(data[m]) for m in METRICS}
    return found


def _stats(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (n - 1; None below 2 values) of ``values``."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()) if len(a) else None,
        "std": float(a.std(ddof=1)) if len(a) > 1 else None,
        "n": len(a),
    }


def aggregate(
    results: Mapping[Key, Mapping[str, float]],
    variants: Sequence[str],
    datasets: Sequence[str],
    splits: Sequence[int],
    reference: str,
) -> dict:
    """Per data set and variant: mean ± std over splits of each metric; against ``reference``,
    the paired per-split difference (variant - reference) over the splits both have, its mean ±
    std, and the splits it wins (>), ties and loses; each split's own values under ``per_split``
    (so the pairs can be checked, or paired again later without the runs). Every (variant, data
    set, split) without a result is listed under ``missing``."""
    missing = [
        {"variant": v, "dataset": d, "split": s}
        for d in datasets
        for v in variants
        for s in splits
        if (v, d, s) not in results
    ]
    tables = {}
    for d in datasets:
        rows = {}
        for v in variants:
            have = [s for s in splits if (v, d, s) in results]
            row = {"splits": have}
            for m in METRICS:
                row[m] = _stats([results[(v, d, s)][m] for s in have])
            row["per_split"] = {str(s): dict(results[(v, d, s)]) for s in have}
            paired = [s for s in have if (reference, d, s) in results]
            row["paired_splits"] = paired
            row["vs_reference"] = {}
            for m in METRICS:
                diff = [results[(v, d, s)][m] - results[(reference, d, s)][m] for s in paired]
                row["vs_reference"][m] = {
                    **_stats(diff),
                    "wins": sum(x > 0 for x in diff),
                    "ties": sum(x == 0 for x in diff),
                    "losses": sum(x < 0 for x in diff),
                }
            rows[v] = row
        tables[d] = rows
    return {
        "reference": reference,
        "splits": list(splits),
        "metrics": list(METRICS),
        "datasets": tables,
        "missing": missing,
    }


def _pm(stats: dict, signed: bool = False) -> str:
    """``55.3 ± 2.1`` in percent (``+1.2 ± 0.8`` when ``signed``); ``–`` with no value."""
    if stats["mean"] is None:
        return "–"
    mean = f"{100 * stats['mean']:+.1f}" if signed else f"{100 * stats['mean']:.1f}"
    return mean if stats["std"] is None else f"{mean} ± {100 * stats['std']:.1f}"


def _per_split_table(splits: Sequence[int], rows: Mapping[str, dict]) -> list[str]:
    """Each variant's metrics on each split, rank-1 / rank-5 / rank-10 / mAP in percent to two
    decimals (``–`` where the run is missing): the pairs behind the Δ columns."""
    lines = [
        "Per split, " + " / ".join(METRICS) + ":",
        "",
        "| variant | " + " | ".join(f"split {s}" for s in splits) + " |",
        "|---|" + "---:|" * len(splits),
    ]
    for v, row in rows.items():
        got = [row["per_split"].get(str(s)) for s in splits]
        cells = [
            "–" if g is None else " / ".join(f"{100 * g[m]:.2f}" for m in METRICS) for g in got
        ]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, header: str = "") -> str:
    """A table per data set: each metric's mean ± std over splits, in percent; then the paired
    difference from the reference in rank-1 and mAP, and the splits won out of those paired;
    below it each split's four metrics (:func:`_per_split_table`)."""
    ref = summary["reference"]
    lines = [header] if header else []
    for d, rows in summary["datasets"].items():
        lines += [
            f"**{d}**, {len(summary['splits'])} split(s), mean ± std; Δ: paired difference "
            f"from {ref} split by split (wins of the paired splits)",
            "",
            "| variant | rank-1 | rank-5 | rank-10 | mAP | Δ rank-1 | Δ mAP |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for v, row in rows.items():
            name = f"{v} (reference)" if v == ref else v
            if len(row["splits"]) < len(summary["splits"]):
                name += f" ({len(row['splits'])} of {len(summary['splits'])} splits)"
            cells = [_pm(row[m]) for m in METRICS]
            for m in ("rank-1", "mAP"):
                vs = row["vs_reference"][m]
                n = len(row["paired_splits"])
                cells.append("–" if v == ref or not n else f"{_pm(vs, True)} ({vs['wins']}/{n})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", *_per_split_table(summary["splits"], rows), ""]
    if summary["missing"]:
        gone = ", ".join(
            f"{m['dataset']}/{m['variant']}/split {m['split']}" for m in summary["missing"]
        )
        lines += [f"Missing runs ({len(summary['missing'])}): {gone}", ""]
    return "\n".join(lines)


def run_seconds(out: Path, runs: Sequence[Run]) -> dict[str, float]:
    """Wall seconds of each variant's runs, summed, from their run.json."""
    total: dict[str, float] = {}
    for r in runs:
        record = r.folder / "run.json"
        if record.is_file():
            seconds = json.loads(record.read_text())["seconds"]
            total[r.variant.name] = total.get(r.variant.name, 0.0) + seconds
    return total


def stamped(tool: str, argv: Sequence[str], machine: str) -> dict[str, str]:
    """The command, date and machine of a bench run, and the RESULTS.md heading made of them."""
    command = f"python bench/{tool}.py " + shlex.join(argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    header = f"## {tool}, {stamp}, {machine}\n\n`{command}`\n"
    return {"command": command, "date": stamp, "machine": machine, "header": header}


def publish(out: Path, summary: dict, table: str, record: bool) -> None:
    """``out/summary.json`` and ``out/summary.md`` (``table``), each written to a temporary name
    then renamed; with ``record``, ``table`` appended to bench/RESULTS.md the same way (the file
    is never left half-written)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "summary.json", out / "summary.md"
    write_atomic(paths[0], json.dumps(summary, indent=2) + "\n")
    write_atomic(paths[1], table)
    print(table)
    print(f"wrote {paths[0]}, {paths[1]}")
    if record:
        before = RESULTS.read_text() if RESULTS.is_file() else ""
        write_atomic(RESULTS, before + "\n" + table)
        print(f"appended to {RESULTS}")


# ----------------------------------------------------------------------------- command line


def default_shared() -> Path:
    """``$HPC_REID_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("HPC_REID_SHARED_DATA") or REPO.parent / "shared" / "data")


ORDERS = ("splits", "variants")


RunKey = tuple[str, int, str]  # (data set, split, variant)


def _key(run: Run) -> RunKey:
    return (run.dataset, run.split, run.variant.name)


def _sources(run: Run) -> set[RunKey]:
    """The runs ``run`` reads, on its data set and split: an evaluation's trained run, a stage 2's
    stage 1."""
    names = (run.variant.eval_of, run.variant.init_from)
    return {(run.dataset, run.split, name) for name in names if name}


def ordered(todo: Sequence[Run], order: str) -> list[Run]:
    """``splits``: the plan's order (data set, split, then the variants), so a split's
    checkpoints go early; ``variants``: each variant's row over every data set and split first, so
    a campaign cut short leaves whole rows, with an evaluation straight after the run it reads."""
    if order == "splits":
        return list(todo)

    def root(run: Run) -> str:  # the training variant a run belongs to
        return run.variant.eval_of or run.variant.name

    first: dict[str, int] = {}
    for i, run in enumerate(todo):
        first.setdefault(root(run), i)
    return sorted(todo, key=lambda r: first[root(r)])


def run_queue(runs: Sequence[Run], todo: Sequence[Run], args, threads: int) -> list[str]:
    """Run ``todo`` on ``args.parallel`` workers, each process with ``threads`` OpenMP threads.
    A worker takes the first run (in ``--order``) whose sources (:func:`_sources`) have finished,
    so a slot waits only while every remaining run waits on one still running; a run whose source
    failed is not started and fails too. A (data set, split)'s checkpoints are removed once all
    its runs have results (unless ``--keep-checkpoints``). Returns one line per failed run."""
    todo = ordered(todo, args.order)
    numbered = {id(run): i for i, run in enumerate(todo, 1)}
    keys = {_key(r) for r in todo}
    waits = {id(r): _sources(r) & keys for r in todo}  # the others have results already
    pending, finished, failed = list(todo), {}, []
    turn = threading.Condition()

    def take() -> Run | None:
        with turn:
            while pending:
                run = next((r for r in pending if waits[id(r)] <= finished.keys()), None)
                if run is not None:
                    pending.remove(run)
                    return run
                turn.wait()
            return None

    def one(run: Run) -> bool:
        tag = f"[{numbered[id(run)]}/{len(todo)}] {run.dataset} split {run.split} "
        tag += run.variant.name
        broken = sorted(k[2] for k in waits[id(run)] if not finished[k])
        if broken:
            print(f"{tag}: FAILED, not run: {', '.join(broken)} failed", flush=True)
            failed.append(f"{tag}: not run, its source {', '.join(broken)} failed")
            return False
        if (run.folder / "results.json").is_file():  # another campaign finished it since
            print(f"{tag}: done meanwhile, skipped", flush=True)
            return True
        print(f"{tag} ...", flush=True)
        try:
            record = execute(run, args.in_process, threads)
        except Exception as exc:  # a missing checkpoint, say: reported, and the others go on
            record = {"returncode": None, "seconds": 0, "error": f"{type(exc).__name__}: {exc}"}
        ok = record["returncode"] == 0 and (run.folder / "results.json").is_file()
        print(f"{tag}: {'done' if ok else 'FAILED'} in {record['seconds']} s", flush=True)
        if not ok:
            failed.append(f"{tag}: {record.get('error') or run.folder / 'log.txt'}")
        return ok

    def worker() -> None:
        while (run := take()) is not None:
            ok = False
            try:
                ok = one(run)
            finally:  # whatever happened, the runs waiting on this one are released
                with turn:
                    finished[_key(run)] = ok
                    turn.notify_all()
            if not args.keep_checkpoints:
                drop_checkpoints(
                    [r for r in runs if (r.dataset, r.split) == (run.dataset, run.split)]
                )

    if args.parallel == 1 or args.in_process:  # in this thread: the trainer sets signal handlers
        worker()
    else:
        pool = [
            threading.Thread(target=worker, name=f"real_data-{i}") for i in range(args.parallel)
        ]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    return sorted(failed)


def add_parallel(p: argparse.ArgumentParser, what: str) -> None:
    """``--parallel N`` (``what``) and ``--threads`` (per process; :func:`threads_per_run`)."""
    p.add_argument("--parallel", type=int, default=1, help=what)
    p.add_argument("--threads", type=int, help="OpenMP threads a run (default: cores / --parallel)")


def threads_per_run(args: argparse.Namespace) -> int:
    """``--threads``, else this machine's cores shared by the ``--parallel`` runs (at least 1);
    a ConfigError for ``--parallel`` below 1."""
    if args.parallel < 1:
        raise ConfigError(f"--parallel={args.parallel}: expected 1 or more")
    return args.threads or max(1, (os.cpu_count() or 1) // args.parallel)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default=str(REPO / "configs/ablation/real_data.yaml"))
    p.add_argument("--out", required=True, help="folder for runs/, summary.json, summary.md")
    p.add_argument(
        "--splits", type=int, help="splits 0..N-1 of every data set (default: the plan's, or 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="the splits' seed (data.options.seed)")
    p.add_argument("--datasets", help="comma-separated subset of the plan's data sets")
    p.add_argument("--variants", help="comma-separated subset (the reference is always added)")
    p.add_argument("--shared-data", type=Path, default=default_shared())
    add_overrides(
        p, help="override for every training run, after the variant's (e.g. schedule.epochs=1)"
    )
    add_parallel(p, "runs at once (an evaluation after the run it reads); default 1")
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="splits",
        help="splits: a split's variants together (its checkpoints go early); variants: each "
        "variant's row over all splits first, so a campaign cut short leaves whole rows",
    )
    p.add_argument("--only-aggregate", action="store_true", help="no runs: tables from results")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's weights")
    p.add_argument("--in-process", action="store_true", help="runs in this process (tests)")
    p.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = load_plan(args.plan)
        variants = select(plan, args.variants.split(",") if args.variants else None)
        datasets = args.datasets.split(",") if args.datasets else list(plan.datasets)
        splits = list(range(args.splits or plan.splits))
        out = Path(args.out).resolve()
        shared = args.shared_data.resolve()
        runs = plan_runs(plan, variants, datasets, splits, args.seed, shared, out, args.overrides)
        threads = threads_per_run(args)
    except ConfigError as exc:
        print(f"real_data: error: {exc}", file=sys.stderr)
        return 2
    failed = []
    if not args.only_aggregate:
        todo = [r for r in runs if not (r.folder / "results.json").is_file()]
        print(
            f"{len(runs)} runs, {len(runs) - len(todo)} done before, {len(todo)} to run, "
            f"{args.parallel} at once x {threads} thread(s), by {args.order}",
            flush=True,
        )
        failed = run_queue(runs, todo, args, threads)
    names = [v.name for v in variants]
    starts = {v.name: v.start_of for v in variants if v.start_of}
    summary = aggregate(
        collect(out, names, datasets, splits, starts), names, datasets, splits, plan.reference
    )
    summary["seed"] = args.seed
    summary["seconds"] = run_seconds(out, runs)
    machine = f"{os.cpu_count()}-core CPU ({cpu_model()}), torch {version('torch')}"
    stamp = stamped("real_data", sys.argv[1:] if argv is None else argv, machine)
    header = stamp.pop("header")
    summary.update(stamp)
    publish(out, summary, markdown(summary, header), args.record)
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed or (summary["missing"] and not args.only_aggregate) else 0


if __name__ == "__main__":
    sys.exit(main())
