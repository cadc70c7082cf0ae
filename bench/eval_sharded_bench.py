"""Sharded exact evaluation: time and per-rank peak memory on gloo CPU processes, checked exact.

Each of ``--world`` processes generates only its shard of ``--gallery`` x ``--queries`` random
``--dim``-d features (identity centres plus noise, 6 cameras, distractor pid 0; rows generated in
blocks seeded by their global position, so that any rank can make any rows) and runs
``evaluate_sharded``. Then, as the baseline, one process runs ``evaluate_features`` on the first
``--subset-gallery`` x ``--subset-queries`` rows, which the ranks also evaluate sharded: the two
results must be identical. Prints a table and appends it to bench/RESULTS.md.

    python bench/eval_sharded_bench.py --world 4 --gallery 1000000 --queries 10000 --dim 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_reid.bench.machine import cpu_model
from hpc_reid.evaluation import evaluate_features
from hpc_reid.evaluation.sharded import evaluate_sharded, shard_range

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BLOCK = 5000  # rows generated per seeded block
IMAGES_PER_ID = 20  # gallery images per identity, on average
CAMERAS = 6


def rows(kind: str, start: int, stop: int, num_gallery: int, dim: int, seed: int):
    """Features (float32), pids and camids of global rows [start, stop) of ``kind`` ("query" or
    "gallery"), the same whichever process makes them."""
    num_ids = max(1, num_gallery // IMAGES_PER_ID)
    centres = np.random.default_rng([seed, 0]).standard_normal((num_ids + 1, dim), np.float32)
    feats, pids, cams = [], [], []
    for b in range(start // BLOCK, -(-stop // BLOCK)):
        rng = np.random.default_rng([seed, 1 if kind == "query" else 2, b])
        # pid 0 (5% of the gallery) are distractors: random features, never a positive
        low = 1 if kind == "query" else 0
        pid = rng.integers(low, num_ids + 1, BLOCK)
        if kind == "gallery":
            pid[rng.random(BLOCK) < 0.05] = 0
        centre = centres[pid]
        centre[pid == 0] = rng.standard_normal((int((pid == 0).sum()), dim), np.float32)
        feats.append(centre + 1.2 * rng.standard_normal((BLOCK, dim), np.float32))
        pids.append(pid)
        cams.append(rng.integers(0, CAMERAS, BLOCK))
    lo = start - (start // BLOCK) * BLOCK
    n = stop - start
    return (
        torch.from_numpy(np.concatenate(feats)[lo : lo + n]),
        np.concatenate(pids)[lo : lo + n],
        np.concatenate(cams)[lo : lo + n],
    )


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def shard(rank, world, num_q, num_g, args):
    qs, gs = shard_range(num_q, rank, world), shard_range(num_g, rank, world)
    qf, q_pids, q_cams = rows("query", qs.start, qs.stop, args.gallery, args.dim, args.seed)
    gf, g_pids, g_cams = rows("gallery", gs.start, gs.stop, args.gallery, args.dim, args.seed)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def _rank_worker(rank: int, world: int, store: str, out: str, args) -> None:
    start_rss = rss_mib()  # torch and numpy imported, no data yet
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=3600),
    )
    try:
        stats = {}
        for name, num_q, num_g in (
            ("full", args.queries, args.gallery),
            ("subset", args.subset_queries, args.subset_gallery),
        ):
            local = shard(rank, world, num_q, num_g, args)
            before = rss_mib()
            dist.barrier()
            tic = time.perf_counter()
            r = evaluate_sharded(*local, metric=args.metric, query_tile=args.query_tile)
            dist.barrier()
            stats[name] = {
                "seconds": time.perf_counter() - tic,
                "rss_start_mib": start_rss,
                "rss_before_mib": before,
                "peak_rss_mib": peak_rss_mib(),  # process lifetime peak: full run first
                "local_gallery": len(local[1]),
                "summary": r.summary(),
            }
            if rank == 0:
                np.savez(Path(out) / f"{name}.npz", cmc=r.cmc, ap=r.ap, inp=r.inp, valid=r.valid)
            del local, r
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(stats))
    finally:
        dist.destroy_process_group()


def _baseline_worker(out: str, args) -> None:
    start_rss = rss_mib()
    torch.set_num_threads(args.baseline_threads)
    qf, gf, q_pids, g_pids, q_cams, g_cams = shard(
        0, 1, args.subset_queries, args.subset_gallery, args
    )
    before = rss_mib()
    tic = time.perf_counter()
    r = evaluate_features(
        qf,
        gf,
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        metric=args.metric,
        query_tile=args.query_tile,
        backend="numpy",
    )
    seconds = time.perf_counter() - tic
    np.savez(Path(out) / "baseline.npz", cmc=r.cmc, ap=r.ap, inp=r.inp, valid=r.valid)
    stats = {"seconds": seconds, "rss_start_mib": start_rss, "rss_before_mib": before}
    stats["peak_rss_mib"] = peak_rss_mib()
    (Path(out) / "baseline.json").write_text(json.dumps(stats))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--subset-gallery", type=int, default=100_000)
    p.add_argument("--subset-queries", type=int, default=1_000)
    p.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--query-tile", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--baseline-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_worker, args=(args.world, f"{tmp}/store", tmp, args), nprocs=args.world)
        ctx = mp.get_context("spawn")
        baseline = ctx.Process(target=_baseline_worker, args=(tmp, args))
        baseline.start()
        baseline.join()
        if baseline.exitcode != 0:
            raise SystemExit(f"baseline process failed with exit code {baseline.exitcode}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
        base = json.loads(Path(tmp, "baseline.json").read_text())
        sub, ref = np.load(f"{tmp}/subset.npz"), np.load(f"{tmp}/baseline.npz")
        identical = all(np.array_equal(sub[k], ref[k], equal_nan=k != "valid") for k in ref.files)
        max_diff = max(float(np.nanmax(np.abs(sub[k] - ref[k]))) for k in ("cmc", "ap", "inp"))
    load_end = os.getloadavg()[0]

    def row(label, gal, q, procs, seconds, stats):
        ratio = seconds / base["seconds"]
        mib = [max(s[k] for s in stats) for k in ("rss_start_mib", "rss_before_mib")]
        mib.append(max(s["peak_rss_mib"] for s in stats))
        return (
            f"| {label} | {gal:,} x {q:,} | {procs} | {seconds:.1f} | {ratio:.2f} | "
            + " | ".join(f"{m:.0f}" for m in mib)
            + " |"
        )

    lines = [
        "| run | gallery x queries | processes | seconds | time / baseline | RSS after import "
        "| RSS with data | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
        row(
            f"baseline: evaluate_features, {args.baseline_threads} threads",
            args.subset_gallery,
            args.subset_queries,
            1,
            base["seconds"],
            [base],
        ),
    ]
    for name, gal, q in (
        ("subset", args.subset_gallery, args.subset_queries),
        ("full", args.gallery, args.queries),
    ):
        lines.append(
            row(
                f"evaluate_sharded ({name}), {args.threads} thread/rank",
                gal,
                q,
                args.world,
                max(r[name]["seconds"] for r in ranks),
                [r[name] for r in ranks],
            )
        )
    full = ranks[0]["full"]["summary"]
    feature_mib = args.gallery * args.dim * 4 / 2**20
    lines += [
        "",
        f"- subset: sharded result identical to evaluate_features: **{identical}** "
        f"(max |diff| of cmc/ap/inp {max_diff:.1e}); subset mAP "
        f"{ranks[0]['subset']['summary']['mAP']:.4f}",
        f"- full: rank-1 {full['rank-1']:.4f}, mAP {full['mAP']:.4f}, mINP {full['mINP']:.4f}; "
        f"per-rank gallery {ranks[0]['full']['local_gallery']:,} rows; query tile "
        f"{args.query_tile}, metric {args.metric}",
        f"- for scale: all gallery features on every rank (the all-gather it replaces) would be "
        f"{feature_mib:.0f} MiB per rank, plus a {args.query_tile} x {args.gallery:,} float32 "
        f"distance tile ({args.query_tile * args.gallery * 4 / 2**20:.0f} MiB)",
        "- RSS in MiB, the largest over the ranks; the peak is over the process's life (the full "
        f"run comes first); load average {load_start:.1f} at start, {load_end:.1f} at end",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        today = datetime.date.today().isoformat()
        cmd = shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv])
        with RESULTS.open("a") as f:
            f.write(
                f"\n## {today}: sharded exact evaluation ({args.world} gloo ranks)\n\n"
                f"Machine: {os.cpu_count()}-core CPU ({cpu_model()}), no GPU. "
                f"Command: `{cmd}`\n\n{table}\n"
            )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
