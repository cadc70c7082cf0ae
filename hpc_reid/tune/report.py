"""A finished (or interrupted) search's outputs: the results table, the best config, the plots.

Rows come from Ray Tune's results joined with Ax's trial indices (the order Ax suggested them):
one per trial, with its status (``completed``, ``early-stopped`` by ASHA, ``failed``), the last
reported epoch, objective, mAP and rank-1, and the parameter values. Only a completed trial can
be the best: an early-stopped one's numbers are from before its last epoch, so its config would
not retrain to them.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc_reid.atomic import write_atomic
from hpc_reid.tune.space import RangeParam, SearchSpace

METRIC_COLUMNS = ("objective", "mAP", "rank-1")


def results_rows(results, trial_index: dict[str, int], space: SearchSpace) -> list[dict[str, Any]]:
    """One row per Tune ``Result`` (a ``ResultGrid``'s items), ordered by Ax trial index."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if result.error is not None:
            status = "failed"
        elif metrics.get("final"):
            status = "completed"
        elif "objective" in metrics:
            status = "early-stopped"
        else:
            status = "no result"
        row: dict[str, Any] = {
            "trial": trial_index.get(trial_id, -1),
            "trial_id": trial_id,
            "status": status,
            "epoch": metrics.get("epoch"),
            "step": metrics.get("step"),
        }
        row.update({k: metrics.get(k) for k in METRIC_COLUMNS})
        row["threads"] = metrics.get("threads")
        params = {k: (result.config or {}).get(k) for k in space.params}
        row.update(params)
        if space.derived and None not in params.values():
            row.update(space.derived_values(params))
        else:
            row.update(dict.fromkeys(space.derived))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["trial"], r["trial_id"]))


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "completed" and _finite(r["objective"])]
    return max(done, key=lambda r: r["objective"]) if done else None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return write_atomic(path, out.getvalue())


def format_table(rows: Sequence[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """The results as an aligned text table; the best trial marked with ``*``."""
    if not rows:
        return "(no trials)\n"
    columns = [c for c in rows[0] if c != "trial_id"]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    table = [[" ", *columns]]
    for row in rows:
        mark = "*" if best is not None and row["trial_id"] == best["trial_id"] else " "
        table.append([mark, *(cell(row[c]) for c in columns)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "".join(
        "  ".join(text.rjust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in table
    )


def write_best_yaml(
    base: dict[str, Any],
    space: SearchSpace,
    best: dict[str, Any],
    path: Path,
    search_dir: Path,
    workers: int = 1,
) -> Path:
    """The base config with the best trial's values: ``hpc-reid train --config best.yaml``.

    On a validation holdout (``data.validation``) the trial's numbers are validation numbers;
    the header also gives the command that retrains on all training identities and reports the
    test split's numbers (the search never saw them)."""
    values = {k: best[k] for k in space.params}
    config = space.config(base, values, f"best trial {best['trial']} of {search_dir}")
    if workers == 1:  # on CPU the numbers depend on the thread count too
        threads = f"OMP_NUM_THREADS={best['threads']} " if best.get("threads") else ""
        retrain = f"{threads}hpc-reid train --config {path.name}"
    else:  # the global batch and the sampler's shards depend on the world size
        retrain = f"torchrun --nproc-per-node {workers} -m hpc_reid.cli train --config {path.name}"
    derived = space.derived_values(values)
    validation = config.data.validation
    split = (
        f"\n# on the validation split (data.validation.fraction={validation.fraction} of the train "
        "identities held out; the test split unseen)"
    )
    header = (
        f"# The best trial ({best['trial']}, Ray trial {best['trial_id']}) of the search in "
        f"{search_dir}:\n# objective {best['objective']:.6f}, mAP {best['mAP']:.6f}, "
        f"rank-1 {best['rank-1']:.6f}"
        + (split if validation.fraction > 0 else "")
        + f". Retrain to these numbers:\n#   {retrain}\n"
        + "".join(f"#   {k}: {v!r}\n" for k, v in values.items())
        + "".join(f"#   {k}: {v!r} ({space.derived[k].text})\n" for k, v in derived.items())
    )
    if validation.fraction > 0:
        header += (
            "# Retrain on all training identities and report the test split's numbers:\n"
            f"#   {retrain} --set data.validation.fraction=0\n"
        )
    return write_atomic(path, header + config.to_yaml())


def plot_progress(rows: Sequence[dict[str, Any]], path: Path, objective: str) -> Path:
    """Objective against trial index (by status), with the best-so-far of completed trials."""
    from hpc_reid.evaluation.plots import new_figure  # imports matplotlib

    fig = new_figure(figsize=(6, 4))
    ax = fig.subplots()
    styles = {"completed": "o", "early-stopped": "x", "failed": "s"}
    for status, marker in styles.items():
        pts = [(r["trial"], r["objective"]) for r in rows if r["status"] == status]
        pts = [(t, v) for t, v in pts if _finite(v)]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=status)
    best, xs, ys = -math.inf, [], []
    for r in rows:
        if r["status"] == "completed" and _finite(r["objective"]):
            best = max(best, r["objective"])
            xs.append(r["trial"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="k", lw=1, label="best so far")
    ax.set_xlabel("trial (Ax order)")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_params(
    rows: Sequence[dict[str, Any]], space: SearchSpace, path: Path, objective: str
) -> Path:
    """One panel per parameter: each trial's objective against that parameter's value."""
    from matplotlib.ticker import NullFormatter

    from hpc_reid.evaluation.plots import new_figure  # imports matplotlib

    keys = list(space.params)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = new_figure(figsize=(4 * cols, 3 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        param = space.params[key]
        for status, marker in (("completed", "o"), ("early-stopped", "x")):
            pts = [(r[key], r["objective"]) for r in rows if r["status"] == status]
            pts = [(x, v) for x, v in pts if x is not None and _finite(v)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter([str(x) for x in xs] if _categorical(param) else xs, ys, marker=marker)
        if isinstance(param, RangeParam) and param.log:
            ax.set_xscale("log")
            ticks = [param.low * (param.high / param.low) ** (i / 3) for i in range(4)]
            ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])  # a range may span < 1 decade
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(key, fontsize=9)
        ax.set_ylabel(objective, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _categorical(param) -> bool:
    return not isinstance(param, RangeParam) and any(isinstance(v, str) for v in param.values)
