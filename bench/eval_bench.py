"""Evaluation speed: the counting ranking backends against a full-argsort evaluation, and features
to metrics at MSMT17 size.

Sections (both by default):

- ``market``: a Market-1501-size (3,368 x 15,913) float32 distance matrix with Market-like ids
  (750 query identities, 6 cameras, distractors pid 0 and junk pid -1 in the gallery), random with
  no model (``--shifts 0``) and with closer positives (0.8; 0.95 gives Market's typical mINP of a
  trained model, ~0.5). Times the
  full-argsort evaluation torchreid's ``eval_market1501`` does (argsort every row, mask, cumsum;
  written below, with its per-query AP loop vectorised in numpy, which only helps it) against
  ``rank_metrics`` with each backend, in the same run; checks that all agree; prints ratios.
  Distances are distinct within a row, so the argsort's tie order cannot matter.
- ``msmt-features``: MSMT17-size (11,659 query x 82,161 gallery x 2048-d float32) random features
  with identity structure through ``evaluate_features(..., backend=...)`` on the CPU, one child
  process per backend so that each reports its own peak RSS, and the same distance tiles without
  ranking, to tell the ranking's share. ``--scale`` shrinks Q and G.

    python bench/eval_bench.py                       # both sections, appended to RESULTS.md
    python bench/eval_bench.py --section market --no-record
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpc_reid.bench.machine import proc_status_gib
from hpc_reid.evaluation.distances import evaluate_features, pairwise_distance
from hpc_reid.evaluation.ranking import BACKENDS, rank_metrics

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MAX_RANK = 50
DISTANCES_ONLY = "distances-only"


def market_ids(rng, num_q=3368, num_g=15913, num_ids=750, num_cams=6):
    """Market-1501-like query/gallery pids and cameras: ~17 gallery images per identity over the
    cameras, 2,793 distractors (pid 0) and a few junk images (pid -1) in the gallery."""
    num_distractors, num_junk = 2793, 300
    ids = np.arange(1, num_ids + 1)
    g_pids = np.concatenate(
        [
            rng.choice(ids, num_g - num_distractors - num_junk),
            np.zeros(num_distractors, np.int64),
            np.full(num_junk, -1),
        ]
    )
    g_pids = rng.permutation(g_pids)
    g_cams = rng.integers(0, num_cams, num_g)
    q_pids = rng.choice(ids, num_q)
    q_cams = rng.integers(0, num_cams, num_q)
    return q_pids, g_pids, q_cams, g_cams


def market_distances(rng, q_pids, g_pids, shift: float) -> np.ndarray:
    """(Q, G) float32 distances in (0, 2), distinct within each row: ranks of uniform scores, with
    same-identity scores lowered by ``shift`` (0: no model at all; 0.8: roughly a trained one)."""
    score = rng.random((q_pids.size, g_pids.size))
    score -= shift * (q_pids[:, None] == g_pids[None, :])
    order = np.argsort(score, axis=1)
    distmat = np.empty(score.shape, dtype=np.float32)
    np.put_along_axis(distmat, order, (np.arange(g_pids.size, dtype=np.float32) + 0.5), axis=1)
    return distmat * np.float32(2.0 / g_pids.size)


def argsort_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=MAX_RANK):
    """What torchreid's ``eval_market1501`` does: sort every row, then mask and cumsum per query.
    Returns (cmc, mAP, mINP, per-query AP with NaN for invalid queries)."""
    num_q = distmat.shape[0]
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_inp = [], []
    ap = np.full(num_q, np.nan)
    for q in range(num_q):
        order = indices[q]
        remove = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        raw_cmc = matches[q][~remove]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        pos_idx = np.flatnonzero(raw_cmc == 1)
        all_inp.append(cmc[pos_idx[-1]] / (pos_idx[-1] + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        precision = raw_cmc.cumsum() / np.arange(1, raw_cmc.size + 1)
        ap[q] = (precision * raw_cmc).sum() / raw_cmc.sum()
    cmc = np.asarray(all_cmc, dtype=np.float64).sum(0) / len(all_cmc)
    return cmc, float(np.nanmean(ap)), float(np.mean(all_inp)), ap


def best_time(repeats, fn, *args, **kwargs):
    """(result, best wall seconds over ``repeats`` calls of ``fn(*args, **kwargs)``)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - tic)
    return out, best


def section_market(args) -> list[str]:
    lines = []
    for shift in args.shifts:
        rng = np.random.default_rng(args.seed)
        ids = market_ids(rng)
        distmat = market_distances(rng, ids[0], ids[1], shift)
        (cmc, mAP, mINP, ap), base = best_time(args.repeats, argsort_eval, distmat, *ids)
        q, g = distmat.shape
        lines += [
            f"market: {q} x {g} float32 distances, {len(set(ids[0]))} query ids, 6 cameras, "
            f"positive shift {shift} (mAP {mAP:.3f}, mINP {mINP:.3f}, rank-1 {cmc[0]:.3f}); "
            f"best of {args.repeats}",
            "",
            "| method | seconds | speed-up vs argsort |",
            "|---|---:|---:|",
            f"| full argsort (torchreid eval_market1501) | {base:.3f} | 1.0x |",
        ]
        for name in args.backends:
            if name not in BACKENDS:
                lines.append(f"| {name} | not available here | |")
                continue
            result, sec = best_time(
                args.repeats, rank_metrics, distmat, *ids, max_rank=MAX_RANK, backend=name
            )
            np.testing.assert_allclose(result.cmc, cmc, rtol=0, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(result.ap, ap, rtol=0, atol=1e-12, err_msg=name)
            assert abs(result.mAP - mAP) < 1e-12 and abs(result.mINP - mINP) < 1e-12, name
            lines.append(f"| rank_metrics backend={name} | {sec:.3f} | {base / sec:.1f}x |")
        lines += ["", "All backends agree with the argsort evaluation (CMC, AP, mAP, mINP).", ""]
    return lines


def msmt_one(args) -> dict:
    """One backend through evaluate_features on MSMT17-size random features (in a child)."""
    num_q, num_g = round(11659 * args.scale), round(82161 * args.scale)
    num_ids, num_cams, dim = 3060, 15, 2048
    gen = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(num_ids, dim, generator=gen)
    g_pids = torch.randint(0, num_ids, (num_g,), generator=gen)
    q_pids = torch.randint(0, num_ids, (num_q,), generator=gen)
    # Identity centre + noise, the noise added in slices so that no full-size temporary inflates
    # the peak RSS; a noise 4x the centre's scale leaves the task far from trivial.
    gf, qf = centers[g_pids], centers[q_pids]
    del centers
    for feats in (gf, qf):
        for s in range(0, feats.shape[0], 8192):
            feats[s : s + 8192].add_(torch.randn(feats[s : s + 8192].shape, generator=gen), alpha=4)
    g_cams = torch.randint(0, num_cams, (num_g,), generator=gen).numpy()
    q_cams = torch.randint(0, num_cams, (num_q,), generator=gen).numpy()
    rss_before = proc_status_gib("VmRSS")
    # Reset the high-water mark (Linux proc(5), clear_refs "5"); ru_maxrss would not do: it keeps
    # the parent's peak across fork + exec.
    Path("/proc/self/clear_refs").write_text("5")
    tic = time.perf_counter()
    if args.one == DISTANCES_ONLY:  # the same tiles as evaluate_features, not ranked
        for s in range(0, num_q, args.query_tile):
            pairwise_distance(qf[s : s + args.query_tile], gf, "cosine", tile=args.query_tile)
        metrics = {"mAP": None, "rank1": None}
    else:
        result = evaluate_features(
            qf,
            gf,
            q_pids.numpy(),
            g_pids.numpy(),
            q_cams,
            g_cams,
            metric="cosine",
            query_tile=args.query_tile,
            backend=args.one,
        )
        metrics = {"mAP": result.mAP, "rank1": float(result.cmc[0])}
    return {
        "backend": args.one,
        "q": num_q,
        "g": num_g,
        "seconds": time.perf_counter() - tic,
        "peak_rss_gib": proc_status_gib("VmHWM"),
        "rss_before_gib": rss_before,
        **metrics,
    }


def section_msmt(args) -> list[str]:
    rows = []
    for name in [DISTANCES_ONLY, *args.backends]:
        if name not in (DISTANCES_ONLY, *BACKENDS):
            continue
        cmd = [sys.executable, __file__, "--one", name, "--scale", str(args.scale)]
        cmd += ["--query-tile", str(args.query_tile), "--seed", str(args.seed)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  msmt-features {name}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    base, ranked = rows[0], rows[1:]
    q, g = base["q"], base["g"]
    lines = [
        f"msmt-features: {q} x {g} x 2048 float32 features (scale {args.scale}), cosine, "
        f"query_tile {args.query_tile}; one process per row; mAP {ranked[0]['mAP']:.4f}",
        "",
        "| evaluate_features backend | seconds | of which ranking | peak RSS (GiB) "
        "| RSS before (GiB) |",
        "|---|---:|---:|---:|---:|",
        f"| {DISTANCES_ONLY} (same tiles, not ranked) | {base['seconds']:.1f} | | "
        f"{base['peak_rss_gib']:.2f} | {base['rss_before_gib']:.2f} |",
    ]
    for r in ranked:
        assert abs(r["mAP"] - ranked[0]["mAP"]) < 1e-12 and r["rank1"] == ranked[0]["rank1"], r
        lines.append(
            f"| {r['backend']} | {r['seconds']:.1f} | ~{r['seconds'] - base['seconds']:.1f} | "
            f"{r['peak_rss_gib']:.2f} | {r['rss_before_gib']:.2f} |"
        )
    if args.scale != 1.0:
        full = 11659 * 82161 / (q * g)
        lines.append("")
        lines.append(
            f"Scaled run: Q x G is 1/{full:.1f} of MSMT17's; time grows with Q x G (distances and "
            "ranking), features' memory with Q + G."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["market", "msmt-features", "all"], default="all")
    parser.add_argument("--backends", nargs="+", default=["cython", "torch", "numpy"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.8, 0.95], help="market")
    parser.add_argument("--scale", type=float, default=1.0, help="msmt-features: Q, G fraction")
    parser.add_argument("--query-tile", type=int, default=1024, help="evaluate_features tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--note", default="", help="a line to record with the table (load, ...)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: one msmt-features backend
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(msmt_one(args)))
        return 0
    lines = []
    if args.section in ("market", "all"):
        lines += [*section_market(args), ""]
    if args.section in ("msmt-features", "all"):
        lines += [*section_msmt(args), ""]
    table = "\n".join(lines).rstrip()
    print(table)
    if not args.no_record:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        machine = f"{os.cpu_count()}-core CPU, {gpu}"
        cmd = shlex.join(["python", "bench/eval_bench.py", *(argv or sys.argv[1:])])
        with RESULTS.open("a") as f:
            f.write(f"\n## eval_bench, {date}\n\nMachine: {machine}. Command: `{cmd}`\n\n")
            f.write(table + "\n" + (f"\n{args.note}\n" if args.note else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
