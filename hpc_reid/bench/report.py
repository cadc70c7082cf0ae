"""Benchmark reports: the aggregate of a run's ranks, its table, and the scaling summary of runs.

A run (``bench.json``, :func:`~hpc_reid.bench.runner.run_bench`) holds every rank's results; its
aggregate sums img/s over ranks (the job's throughput) and gives min/max/mean of every time. A
scaling summary reads several runs (1, 2, ... nodes) and computes, against the run with the fewest
nodes of the same scaling mode,

    efficiency(N) = (img/s at N nodes / img/s at N0 nodes) / (N / N0).

Under weak scaling (fixed per-rank batch) that is the fraction of linear throughput growth kept;
under strong scaling (fixed global batch) img/s ratios are speed-ups of a fixed amount of work, so
it is the classic speed-up / N. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hpc_reid.atomic import write_atomic
from hpc_reid.bench.comm_model import fit_latency_bandwidth, predict_step
from hpc_reid.config import ConfigError

SUMMED = "img_per_s"  # per-rank throughputs add up; every other number gets min/max/mean


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(_finite(data), indent=2) + "\n")


def _finite(x: Any) -> Any:
    """JSON has no infinity or NaN: those become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _combine(values: list[Any], key: str) -> Any:
    if all(isinstance(v, dict) for v in values):
        keys = [k for k in values[0] if all(k in v for v in values)]
        return {k: _combine([v[k] for v in values], k) for k in keys}
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        if key == SUMMED:
            return sum(values)
        return {"min": min(values), "max": max(values), "mean": statistics.fmean(values)}
    return None


def aggregate(settings: dict[str, Any], ranks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The job's numbers from every rank's: img/s summed, times as min/max/mean; with several
    ranks, the latency/bandwidth fit (from the mean timings over ranks) and the model's
    all-reduce time per step beside the measured one."""
    out = {}
    for part in ("compute", "compute_no_sync", "loaders", "eval", "comm"):
        if all(part in r for r in ranks):
            out[part] = _combine([r[part] for r in ranks], part)
    comm = out.get("comm")
    if comm is not None:
        out["comm"] = {k: v for k, v in comm.items() if v is not None}
        world = len(ranks)
        sizes = ranks[0]["comm"]["fit_sizes_bytes"]
        seconds = [
            statistics.fmean(r["comm"]["fit_seconds"][i] for r in ranks) for i in range(len(sizes))
        ]
        latency, bandwidth = fit_latency_bandwidth(sizes, seconds, world)
        pred = predict_step(
            settings["params"], world, bandwidth, latency, bucket_mb=settings["bucket_cap_mb"]
        )
        out["comm"]["model"] = {
            "latency_us": latency * 1e6,
            "bandwidth_gbps": bandwidth * 8 / 1e9,
            "fit_sizes_bytes": sizes,
            "fit_seconds": seconds,
            "predicted_allreduce_s": pred.seconds,
            "measured_allreduce_s": out["comm"]["allreduce_s"]["mean"],
            "buckets": pred.buckets,
        }
    peaks = [r["peak_memory_gib"] for r in ranks]
    out["peak_memory_gib"] = {"min": min(peaks), "max": max(peaks)}
    return out


# --- one run -------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "" if x is None else f"{1e3 * x:.1f}"


def run_markdown(report: dict[str, Any]) -> str:
    """The table of one run: throughput of every phase (all ranks), the mean per-step time split
    (max over ranks), and the ratio to compute-only measured in the same run."""
    agg, env, st = report["aggregate"], report["environment"], report["settings"]
    compute = agg["compute"]["img_per_s"]
    # a video set's sample is a tracklet of T frames: its rate in tracklets and in frames
    frames = report["ranks"][0].get("frames_per_sample", 1) if report.get("ranks") else 1
    rate = (
        "img/s (all ranks)" if frames == 1 else f"tracklets/s (all ranks) | frames/s (T={frames})"
    )
    align = "---:|" if frames == 1 else "---:|---:|"
    lines = [
        f"{env['nodes']} node(s), {env['world_size']} rank(s), {env['backend'] or 'no'} backend, "
        f"{', '.join(env['devices'])}; {st['backbone']} {st['height']}x{st['width']} "
        f"{st['precision']}, batch {st['per_rank_batch']} per rank ({st['scaling']} scaling), "
        f"{st['steps']} timed steps after {st['warmup']}",
        "",
        f"| phase | {rate} | / compute-only | data wait ms | fwd ms | bwd ms "
        "| optimizer ms | step ms |",
        "|---|" + align + "---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, phase: dict[str, Any]) -> str:
        ips = phase["img_per_s"]
        times = [_ms(phase.get(k, {}).get("max")) for k in ("data_wait_s", "forward_s")]
        times += [_ms(phase.get(k, {}).get("max")) for k in ("backward_s", "optimizer_s", "step_s")]
        rates = f"{ips:.0f}" if frames == 1 else f"{ips:.0f} | {ips * frames:.0f}"
        return f"| {name} | {rates} | {ips / compute:.2f} | " + " | ".join(times) + " |"

    lines.append(row("compute-only", agg["compute"]))
    if "compute_no_sync" in agg:
        lines.append(row("compute-only, no gradient sync", agg["compute_no_sync"]))
    for name, loader in agg.get("loaders", {}).items():
        lines.append(row(f"{name} loader only", loader["loader_only"]))
        lines.append(row(f"{name} loader + step", loader["end_to_end"]))
    comm = agg.get("comm")
    if comm:
        m = comm["model"]
        lines += [
            "",
            f"Gradient all-reduce per step ({m['buckets']} bucket(s), {st['params'] / 1e6:.2f} M "
            f"params): measured {_ms(m['measured_allreduce_s'])} ms, model "
            f"{_ms(m['predicted_allreduce_s'])} ms (fitted latency {m['latency_us']:.0f} us, "
            f"bandwidth {_fmt_gbps(m['bandwidth_gbps'])}); exposed in the step (sync - no_sync): "
            f"{_ms(comm['exposed_s']['mean'])} ms.",
        ]
    ev = agg.get("eval")
    if ev:
        kind = report["ranks"][0]["eval"]["memory_kind"]
        lines += [
            "",
            f"Sharded evaluation, {st['eval_query']} x {st['eval_gallery']} x {st['eval_dim']} "
            f"random features: {ev['seconds']['max']:.2f} s, peak memory "
            f"{ev['peak_memory_gib']['max']:.2f} GiB per rank ({kind}).",
        ]
    return "\n".join(lines) + "\n"


def _fmt_gbps(x: float | None) -> str:
    return "unresolved" if x is None or not math.isfinite(x) else f"{x:.2f} Gbit/s"


# --- scaling over runs ---------------------------------------------------------------------------


def load_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """``bench.json`` files, or folders holding one."""
    runs = []
    for p in paths:
        path = Path(p)
        file = path / "bench.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                f"bench summarize: {file} not found (give bench.json files or folders)"
            )
        try:
            run = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"bench summarize: {file} is not JSON: {exc}") from None
        if "aggregate" not in run or "environment" not in run:
            raise ConfigError(f"bench summarize: {file} is not a bench.json (no aggregate)")
        run["path"] = str(file)
        runs.append(run)
    if not runs:
        raise ConfigError("bench summarize: no runs given")
    return runs


def scaling_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, sorted by (mode, nodes, ranks), with efficiency against the same mode's
    run with the fewest nodes."""
    rows = []
    for run in runs:
        env, st, agg = run["environment"], run["settings"], run["aggregate"]
        loader = st["loaders"][0] if st.get("loaders") else None
        comm = agg.get("comm", {}).get("model", {})
        rows.append(
            {
                "mode": st["scaling"],
                "nodes": env["nodes"],
                "ranks": env["world_size"],
                "per_rank_batch": st["per_rank_batch"],
                "global_batch": st["global_batch"],
                "compute_img_per_s": agg["compute"]["img_per_s"],
                "loader": loader,
                "end_to_end_img_per_s": (
                    agg["loaders"][loader]["end_to_end"]["img_per_s"] if loader else None
                ),
                "measured_allreduce_s": comm.get("measured_allreduce_s"),
                "predicted_allreduce_s": comm.get("predicted_allreduce_s"),
                "exposed_comm_s": agg.get("comm", {}).get("exposed_s", {}).get("mean"),
                "eval_s": agg.get("eval", {}).get("seconds", {}).get("max"),
                "path": run.get("path"),
            }
        )
    rows.sort(key=lambda r: (r["mode"], r["nodes"], r["ranks"]))
    for mode in {r["mode"] for r in rows}:
        same = [r for r in rows if r["mode"] == mode]
        base = same[0]
        for r in same:
            scale = r["nodes"] / base["nodes"]
            for key in ("compute", "end_to_end"):
                ips, ips0 = r[f"{key}_img_per_s"], base[f"{key}_img_per_s"]
                r[f"{key}_efficiency"] = ips / ips0 / scale if ips and ips0 else None
    return rows


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def scaling_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| scaling | nodes | ranks | batch/rank | global batch | compute img/s | efficiency "
        "| end-to-end img/s (loader) | efficiency | all-reduce ms/step measured | model "
        "| exposed comm ms | eval s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e2e = _num(r["end_to_end_img_per_s"], ".0f")
        e2e += f" ({r['loader']})" if e2e else ""
        lines.append(
            f"| {r['mode']} | {r['nodes']} | {r['ranks']} | {r['per_rank_batch']} "
            f"| {r['global_batch']} | {r['compute_img_per_s']:.0f} "
            f"| {_num(r['compute_efficiency'], '.2f')} | {e2e} "
            f"| {_num(r['end_to_end_efficiency'], '.2f')} | {_ms(r['measured_allreduce_s'])} "
            f"| {_ms(r['predicted_allreduce_s'])} | {_ms(r['exposed_comm_s'])} "
            f"| {_num(r['eval_s'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot_scaling(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """img/s and efficiency against nodes, per scaling mode (compute-only and end-to-end), with
    the linear ideal; written atomically."""
    from hpc_reid.evaluation.plots import new_figure  # imports matplotlib

    fig = new_figure(figsize=(10, 4))
    ax_ips, ax_eff = fig.subplots(1, 2)
    for mode in sorted({r["mode"] for r in rows}):
        same = [r for r in rows if r["mode"] == mode]
        nodes = [r["nodes"] for r in same]
        for key, style in (("compute", "o-"), ("end_to_end", "s--")):
            if any(r[f"{key}_img_per_s"] is None for r in same):
                continue
            label = f"{mode}, {key.replace('_', '-')}"
            ips = [r[f"{key}_img_per_s"] for r in same]
            ax_ips.plot(nodes, ips, style, label=label)
            ideal = [ips[0] * n / nodes[0] for n in nodes]
            ax_ips.plot(nodes, ideal, ":", color="grey")
            ax_eff.plot(nodes, [r[f"{key}_efficiency"] for r in same], style, label=label)
    ax_ips.set(xlabel="nodes", ylabel="img/s (all ranks)", title="throughput (dotted: linear)")
    ax_eff.set(xlabel="nodes", ylabel="efficiency vs fewest nodes", title="scaling efficiency")
    ax_eff.axhline(1.0, color="grey", linestyle=":")
    ax_eff.set_ylim(0, 1.2)
    for ax in (ax_ips, ax_eff):
        ax.set_xticks(sorted({r["nodes"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))


def write_scaling(runs: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """``scaling.json``, ``scaling.md`` and ``scaling.png`` of ``runs`` in ``out_dir``."""
    out = Path(out_dir)
    rows = scaling_rows(runs)
    return {
        "json": write_json_atomic(out / "scaling.json", {"rows": rows}),
        "md": write_atomic(out / "scaling.md", scaling_markdown(rows)),
        "png": plot_scaling(rows, out / "scaling.png"),
    }
