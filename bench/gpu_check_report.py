"""Reading the GPU check's step outputs (pytest's junit XML, the bench scripts' markdown tables,
``hpc-reid bench``'s bench.json) into numbers, and writing the report as a bench/RESULTS.md entry.
Plain functions of text and dicts, so that the CPU tests can check them on canned outputs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

#: A test file that fails to import one of these is counted as not importable (the package was
#: not carried to the machine), not as an error.
OPTIONAL_MODULES = {"pydantic", "pydantic_core", "nvidia", "deepspeed", "ray", "ax"}


def junit_counts(path: Path) -> dict[str, Any]:
    """Counts of a pytest junit XML: passed, failed, errors, skipped, the failing test ids, and
    the files whose import failed on a package in OPTIONAL_MODULES (``unavailable``)."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing, unavailable = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = "::".join(x for x in (case.get("classname"), case.get("name")) if x)
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            text = f"{outcome.get('message', '')}\n{outcome.text or ''}"
            missing = re.search(r"No module named '([\w.]+)'", text)
            if missing and missing.group(1).split(".")[0] in OPTIONAL_MODULES:
                unavailable[name] = f"missing {missing.group(1)}"
                continue
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failing.append(name)
    counts["failing"] = failing
    counts["unavailable"] = unavailable
    return counts


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables in a script's output: each a list of rows keyed by the header."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            header = block[0]
            tables.append([dict(zip(header, row, strict=False)) for row in block[2:]])
        block = []
    return tables


def table_lines(text: str) -> list[str]:
    """The markdown tables of a script's output, each with the line right after it (its note),
    blocks separated by a blank line, as they go into bench/RESULTS.md."""
    lines, keep = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("|"):
            if keep and not keep[-1].startswith("|"):
                keep.append("")
            keep.append(line)
        elif i and lines[i - 1].startswith("|") and line.strip():
            keep += ["", line]
    return keep


def number(text: str) -> float:
    return float(text.replace(",", ""))


def train_summary(bench: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """img/s of ``hpc-reid bench``'s phases and end-to-end / compute-only per loader."""
    agg = bench["aggregate"]
    compute = agg["compute"]["img_per_s"]
    results: dict[str, Any] = {"compute_only_img_s": compute, "loaders": {}}
    parts = [f"compute-only {compute:.0f} img/s"]
    for name, loader in agg.get("loaders", {}).items():
        e2e, alone = loader["end_to_end"]["img_per_s"], loader["loader_only"]["img_per_s"]
        results["loaders"][name] = {
            "end_to_end_img_s": e2e,
            "loader_only_img_s": alone,
            "end_to_end_over_compute": e2e / compute,
        }
        parts.append(f"{name} loader + step {e2e:.0f} ({e2e / compute:.2f}), alone {alone:.0f}")
    st = bench.get("settings", {})
    results["settings"] = {k: st.get(k) for k in ("backbone", "height", "width", "precision")}
    results["settings"].update(
        channels_last=st.get("channels_last"), batch=st.get("per_rank_batch")
    )
    return results, "; ".join(parts)


def loader_summary(text: str) -> tuple[dict[str, Any], str]:
    """The rows of loader_bench's table and DALI's img/s against the best torch loader."""
    rows = markdown_tables(text)[0]
    rates = {r["loader"]: number(r["img/s"]) for r in rows}
    dali = next((v for k, v in rates.items() if k.startswith("DALI")), None)
    torch_best = max((v for k, v in rates.items() if k.startswith("torch")), default=None)
    if dali is None or torch_best is None:
        raise ValueError(f"loader_bench printed no DALI or torch row: {rates}")
    summary = f"DALI {dali:.0f} img/s = {dali / torch_best:.2f}x the best torch loader"
    results = {"img_s": rates, "dali_over_best_torch": dali / torch_best}
    results["table"] = table_lines(text)
    return results, f"{summary} ({torch_best:.0f})"


def rerank_summary(text: str) -> tuple[dict[str, Any], str]:
    """rerank_bench's rows: seconds, peak memory and mAP of each case."""
    rows = markdown_tables(text)[0]
    cases = {
        r["case"]: {
            "size": r["Q x G"],
            "seconds": number(r["time s"]),
            "over_baseline": number(r["time / baseline"]),
            "peak_mib": number(r["peak mem MiB"]),
            "mAP": number(r["mAP"]),
        }
        for r in rows
    }
    blocks = next((v for k, v in cases.items() if "blocks" in k), None)
    base = next(iter(cases.values()))
    diff = re.search(r"max \|dense - sparse\|[^:]*: ([0-9.e+-]+)", text)
    results = {"cases": cases, "max_dense_sparse_diff": float(diff.group(1)) if diff else None}
    results["table"] = table_lines(text)
    if blocks is None:
        return results, f"{len(cases)} cases"
    return results, (
        f"sparse rerank (blocks ranked) {blocks['seconds']:.2f} s = "
        f"{blocks['over_baseline']:.1f}x distances only ({base['seconds']:.2f} s), mAP "
        f"{base['mAP']:.4f} -> {blocks['mAP']:.4f}"
    )


def markdown(report: dict[str, Any], env: dict[str, Any]) -> str:
    """The report as a bench/RESULTS.md entry: heading with date and machine, the command, one
    row per step, then the benchmark tables the steps printed."""
    date = report["started"].replace("T", " ")[:16] + " UTC"
    torch = env.get("torch") or "not importable"
    lines = [
        f"## gpu_check, {date}, {report['device']}, torch {torch} (CUDA {env.get('torch_cuda')})",
        "",
        f"`{report['command']}`",
        "",
        f"{env.get('nvidia_smi') or 'nvidia-smi: none'}; {env.get('cpu_count')} CPUs; Python "
        f"{env.get('python')}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s "
        f"budget. {report['headline']}.",
        "",
        "| step | status | seconds | result |",
        "|---|---|---:|---|",
    ]
    for s in report["steps"]:
        text = s.get("summary") or s.get("reason", "")
        text = " ".join(text.split()).replace("|", "\\|")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {text[:300]} |")
    for s in report["steps"]:
        r = s.get("results") or {}
        if s["name"] == "fused-vs-gemm" and s["status"] == "ok":
            lines += [
                "",
                f"fused-vs-gemm: {r['queries']} x {r['gallery']} x {r['dim']} float32, cosine, "
                f"query tile {r['query_tile']}, best of {r['repeats']}; mAP {r['fused_mAP']:.4f}; "
                f"first {r['check_queries']} queries' mAP vs the numpy ranking of torch "
                f"distances: |diff| {r['check_mAP_abs_diff']:.1e}",
                "",
                "| method | seconds | / fp32 GEMM |",
                "|---|---:|---:|",
            ]
            for label, key in (
                ("distance GEMM, fp32 (baseline)", "gemm_fp32_s"),
                ("distance GEMM, TF32", "gemm_tf32_s"),
                ("distance GEMM fp32 + full row sort", "gemm_fp32_sort_s"),
                ("fused kernel: evaluate_features_cuda (CMC, mAP, mINP)", "fused_s"),
            ):
                lines.append(f"| {label} | {r[key]:.4f} | {r[key] / r['gemm_fp32_s']:.2f} |")
        elif r.get("table") and s["status"] == "ok":
            lines += ["", f"{s['name']}: `{r.get('command', '')}`", "", *r["table"]]
    return "\n".join(lines) + "\n"
