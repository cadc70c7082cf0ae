"""How much a recipe's outcome depends on its seed: one config trained once per ``engine.seed``,
then each metric's mean ± std over the seeds, each seed's numbers and each run's wall time.

A single run's rank-1 is one draw: on the synthetic main job it moved by 20 points between seeds
and machines (float kernels differ across CPUs), so a number worth reporting is a mean ± std over
seeds, measured by one command. The data set's own seed (``data.synthetic.seed``) is left alone:
only the training seed varies.

Each seed is one ``hpc-reid train`` process (``python -m hpc_reid.cli`` of this interpreter) with
``OMP_NUM_THREADS`` = cores / ``--parallel``, writing ``OUT/seed{S}/`` (its results.json, log.txt,
and run.json with the wall time); a seed whose results.json exists is skipped and one stopped
part-way resumes from its newest checkpoint (``--resume auto``), so an interrupted measurement
continues where it stopped. Then ``OUT/summary.json`` and ``OUT/summary.md``.

    python bench/seed_spread.py --config configs/synthetic/bot.yaml --seeds 0 1 2 3 4 \\
        --out runs/seed_spread/bot --parallel 2
    python bench/seed_spread.py ... --set schedule.epochs=150     # a candidate recipe
    python bench/seed_spread.py --config configs/synthetic/anchor_stage2.yaml \
        --set 'model.init_from=runs/seed_spread/bot/seed{seed}' ...   # stage 2 of each seed
    python bench/seed_spread.py ... --only-aggregate --record     # tables only, into RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

# bench/real_data.py: mean, std, ±, output, the process runner and the --parallel arguments
from real_data import (
    _pm,
    _stats,
    add_parallel,
    publish,
    run_logged,
    stamped,
    threads_per_run,
)

from hpc_reid.bench.machine import cpu_model
from hpc_reid.cli import add_overrides
from hpc_reid.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
METRICS = ("rank-1", "rank-5", "rank-10", "mAP", "mINP")
#: with flip-averaged evaluation (the default), the image-only features' metrics of the same pass
METRICS += tuple(f"without_flip/{m}" for m in METRICS)
#: Settings of every run that only concern output: no progress bar, TensorBoard or plots.
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "evaluation.plots=false"]


def seed_folder(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def run_argv(config: Path, seed: int, out: Path, overrides: Sequence[str] = ()) -> list[str]:
    """The ``hpc-reid`` arguments of seed ``seed``: the overrides (``{seed}`` in one replaced by
    the seed: a stage-2 run from its seed's stage 1, ``model.init_from=OUT1/seed{seed}``), then
    the seed and the run folder (last, so no override can move them)."""
    sets = [*(o.replace("{seed}", str(seed)) for o in overrides), *QUIET, f"engine.seed={seed}"]
    sets += [f"logging.output_dir={out}", f"logging.run_name={seed_folder(out, seed).name}"]
    # --resume auto: a seed stopped part-way (a killed campaign) continues from its checkpoint
    return ["train", "--config", str(config), "--resume", "auto", *[f"--set={s}" for s in sets]]


# ----------------------------------------------------------------------------- aggregation


def collect(out: Path, seeds: Sequence[int]) -> dict[int, dict]:
    """{seed: {metric: value, ..., "seconds": wall time or None}} of every seed with results."""
    found = {}
    for s in seeds:
        folder = seed_folder(out, s)
        if (folder / "results.json").is_file():
            data = json.loads((folder / "results.json").read_text())
            row = {m: float(data[m]) for m in METRICS if m in data}
            record = folder / "run.json"
            run = json.loads(record.read_text()) if record.is_file() else {}
            row["seconds"], row["threads"] = run.get("seconds"), run.get("threads")
            found[s] = row
    return found


def aggregate(results: Mapping[int, Mapping[str, float]], seeds: Sequence[int]) -> dict:
    """Each metric's mean and sample std (n - 1) over the seeds that have it, the wall time's too,
    each seed's row, and the seeds without results under ``missing``."""
    have = [s for s in seeds if s in results]
    metrics = [m for m in METRICS if have and all(m in results[s] for s in have)]
    times = [results[s]["seconds"] for s in have if results[s].get("seconds") is not None]
    return {
        "seeds": list(seeds),
        "metrics": metrics,
        "stats": {m: _stats([results[s][m] for s in have]) for m in metrics},
        "seconds": _stats(times),
        "per_seed": {str(s): dict(results[s]) for s in have},
        "missing": [s for s in seeds if s not in results],
    }


def markdown(summary: dict, header: str = "") -> str:
    """Mean ± std over seeds per metric (percent), then each seed's rank-1, mAP and wall time."""
    stats, n = summary["stats"], len(summary["per_seed"])
    lines = [header] if header else []
    lines += [
        f"mean ± std (n - 1) over {n} seed(s) ({', '.join(summary['per_seed'])}), percent",
        "",
        "| " + " | ".join(summary["metrics"]) + " | wall time per run |",
        "|" + "---:|" * (len(summary["metrics"]) + 1),
    ]
    secs = summary["seconds"]
    wall = "–" if secs["mean"] is None else f"{secs['mean']:.0f} s"
    if secs["std"] is not None:
        wall += f" ± {secs['std']:.0f}"
    lines.append("| " + " | ".join(_pm(stats[m]) for m in summary["metrics"]) + f" | {wall} |")
    lines += ["", "| seed | rank-1 | mAP | wall time (threads) |", "|---:|---:|---:|---:|"]
    for s, row in summary["per_seed"].items():
        t = "–" if row.get("seconds") is None else f"{row['seconds']:.0f} s ({row.get('threads')})"
        r1, ap = (f"{100 * row[m]:.2f}" if m in row else "–" for m in ("rank-1", "mAP"))
        lines.append(f"| {s} | {r1} | {ap} | {t} |")
    if summary["missing"]:
        lines.append(f"\nMissing seeds: {', '.join(map(str, summary['missing']))}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    add_overrides(p, "override for every run (engine.seed and the run folder are set per seed)")
    p.add_argument("--out", required=True, type=Path, help="folder for seed*/ and summary.*")
    add_parallel(p, "runs at once; default 1")
    p.add_argument("--only-aggregate", action="store_true", help="no runs: tables from results")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out.resolve()
    config = args.config.resolve()
    plans = {s: run_argv(config, s, out, args.overrides) for s in args.seeds}
    try:  # every seed's config resolved now, so a bad key fails before the first run
        threads = threads_per_run(args)
        for a in plans.values():
            load_config(config, [x.removeprefix("--set=") for x in a if x.startswith("--set=")])
    except ConfigError as exc:
        print(f"seed_spread: error: {exc}", file=sys.stderr)
        return 2
    failed = []
    if not args.only_aggregate:
        todo = [s for s in args.seeds if not (seed_folder(out, s) / "results.json").is_file()]
        print(
            f"{len(args.seeds)} seeds, {len(todo)} to run, "
            f"{args.parallel} at once x {threads} thread(s)"
        )

        def one(seed: int) -> None:
            record = run_logged(plans[seed], seed_folder(out, seed), threads)
            ok = record["returncode"] == 0 and (seed_folder(out, seed) / "results.json").is_file()
            print(f"seed {seed}: {'done' if ok else 'FAILED'} in {record['seconds']} s", flush=True)
            if not ok:
                failed.append(f"seed {seed}: {seed_folder(out, seed) / 'log.txt'}")

        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(one, todo))
    summary = aggregate(collect(out, args.seeds), args.seeds)
    machine = f"{os.cpu_count()}-core CPU ({cpu_model()}), torch {version('torch')}"
    stamp = stamped("seed_spread", sys.argv[1:] if argv is None else argv, machine)
    header = stamp.pop("header")
    summary.update(stamp, parallel=args.parallel)
    publish(out, summary, markdown(summary, header), args.record)
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed or summary["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
