"""k-reciprocal re-ranking at Market-1501 size: time and peak memory of the sparse version.

Cases, all in one process on one device (features float32, euclidean, k1=20, k2=6, lambda=0.3):
- baseline: the plain (Q, G) distance matrix (what evaluation costs without re-ranking);
- sparse: ``rerank`` returning the full (Q, G) matrix;
- sparse, blocks: ``rerank_blocks``, each block ranked (``query_ranks``) and dropped, so Q x G is
  never held -- the way evaluation would use it;
- dense reference vs sparse at a smaller size (the dense one holds several N x N arrays and loops
  in Python), with the largest difference between their results.

Peak memory: on CPU the growth of the process's peak RSS during the case (VmHWM, reset through
/proc/self/clear_refs), on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated
before. Features: identities as clusters (a low-rank identity signal plus per-camera shifts and
isotropic noise, with look-alike pairs and distractors), so neighbour lists look like real ones
and mAP before/after is printed as a sanity column; ``--features random`` for plain Gaussians.

    python bench/rerank_bench.py                  # CPU, Market-1501 size
    python bench/rerank_bench.py --device cuda    # the same code on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpc_reid.bench.machine import cpu_model
from hpc_reid.evaluation import pairwise_distance
from hpc_reid.evaluation.ranking import combine, query_ranks
from hpc_reid.evaluation.rerank import rerank, rerank_blocks, rerank_dense

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def clustered_features(num_q, num_g, dim, seed, num_ids=750, rank=64):
    """(qf, gf, q_pids, g_pids, q_cams, g_cams): Market-like ids, 6 cameras, 15% distractors."""
    rng = np.random.default_rng(seed)
    centres = 2.5 * rng.normal(size=(num_ids + 1, rank))
    centres[2::2] = centres[1:-1:2] + 1.0 * rng.normal(size=(num_ids // 2, rank))  # look-alikes
    cameras = 0.8 * rng.normal(size=(6, rank))
    q_pids = rng.integers(1, num_ids + 1, size=num_q)
    g_pids = rng.integers(1, num_ids + 1, size=num_g)
    g_pids[rng.random(num_g) < 0.15] = 0  # distractors: pid 0, never a query's
    q_cams, g_cams = rng.integers(0, 6, size=num_q), rng.integers(0, 6, size=num_g)

    def images(pids, cams):
        f = rng.normal(size=(pids.size, dim)).astype(np.float32)
        signal = centres[pids] + cameras[cams]
        signal[pids == 0] = 3.75 * rng.normal(size=((pids == 0).sum(), rank))
        f[:, :rank] += signal
        return torch.from_numpy(f)

    return images(q_pids, q_cams), images(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


class PeakMemory:
    """Peak memory growth (bytes) during a ``with`` block, on the given device."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.base = self._status("VmRSS")
        self.tic = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = self._status("VmHWM") - self.base
        self.seconds = time.perf_counter() - self.tic


def distances_float64(x: torch.Tensor, metric: str) -> np.ndarray:
    """All-pairs (N, N) distances in float64, by the formulas of ``pairwise_distance``."""
    x = x.double().cpu().numpy()
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return 1.0 - x @ x.T
    sq = (x * x).sum(axis=1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None] - 2.0 * (x @ x.T), 0.0))


def run_cases(args, device: torch.device) -> tuple[list[tuple], float]:
    """Rows (case, Q, G, PeakMemory, mAP) and the largest |dense - sparse| at the small size."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = clustered_features(
        args.num_query, args.num_gallery, args.dim, args.seed
    )
    if args.features == "random":
        gen = torch.Generator().manual_seed(args.seed)
        qf, gf = (torch.randn(f.shape, generator=gen) for f in (qf, gf))
    qf, gf = qf.to(device), gf.to(device)
    params = dict(k1=args.k1, k2=args.k2, lambda_value=args.lambda_value, metric=args.metric)
    num_q, num_g = args.num_query, args.num_gallery

    def m_ap(dist, nq=num_q, ng=num_g):
        dist = dist.cpu().numpy() if torch.is_tensor(dist) else dist
        ranks = query_ranks(dist, q_pids[:nq], g_pids[:ng], q_cams[:nq], g_cams[:ng])
        return combine(ranks).mAP

    rows = []
    with PeakMemory(device) as base:
        dist = pairwise_distance(qf, gf, metric=args.metric)
    rows.append(("baseline: distances only", num_q, num_g, base, m_ap(dist)))
    del dist
    with PeakMemory(device) as full:
        dist = rerank(qf, gf, tile=args.tile, **params)
    rows.append(("sparse rerank, full Q x G", num_q, num_g, full, m_ap(dist)))
    del dist
    with PeakMemory(device) as blocks:
        parts = []
        for s, block in rerank_blocks(qf, gf, tile=args.tile, **params):
            e = s + block.shape[0]
            parts.append(query_ranks(block.cpu().numpy(), q_pids[s:e], g_pids, q_cams[s:e], g_cams))
    rows.append(("sparse rerank, blocks ranked", num_q, num_g, blocks, combine(parts).mAP))

    nq, ng = min(args.dense_query, num_q), min(args.dense_gallery, num_g)
    with PeakMemory(device) as dense:
        d = distances_float64(torch.cat([qf[:nq], gf[:ng]]), args.metric)
        expected = rerank_dense(
            d[:nq, nq:], d[:nq, :nq], d[nq:, nq:], args.k1, args.k2, args.lambda_value
        )
    rows.append(("dense reference, float64", nq, ng, dense, m_ap(expected, nq, ng)))
    with PeakMemory(device) as sparse:
        got = rerank(qf[:nq].double(), gf[:ng].double(), tile=args.tile, **params)
    rows.append(("sparse rerank, float64", nq, ng, sparse, m_ap(got, nq, ng)))
    return rows, float(np.abs(got.cpu().numpy() - expected).max())


def table(rows: list[tuple]) -> str:
    """Markdown table; ratios against the baseline row of the same size (the first of each)."""
    lines = [
        "| case | Q x G | time s | time / baseline | peak mem MiB | mAP |",
        "|---|---|---|---|---|---|",
    ]
    baseline = {}
    for name, q, g, mem, m_ap in rows:
        ref = baseline.setdefault((q, g), mem.seconds)
        lines.append(
            f"| {name} | {q} x {g} | {mem.seconds:.2f} | {mem.seconds / ref:.2f} "
            f"| {mem.peak / 2**20:.0f} | {m_ap:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-query", type=int, default=3368)
    parser.add_argument("--num-gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--features", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lambda-value", type=float, default=0.3)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--dense-query", type=int, default=600, help="size of the dense case")
    parser.add_argument("--dense-gallery", type=int, default=2800)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    rows, max_diff = run_cases(args, device)
    out = table(rows)
    machine = (
        f"{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"{os.cpu_count()}-core CPU ({cpu_model()}), no GPU used, "
        f"{torch.get_num_threads()} torch threads"
    )
    notes = (
        f"{args.features} features, {args.dim}-d float32, {args.metric}, k1={args.k1}, "
        f"k2={args.k2}, lambda={args.lambda_value}, tile={args.tile}; max |dense - sparse| at "
        f"the small size: {max_diff:.1e}; 1-min load average at start: {load:.2f}"
    )
    print(out)
    print(notes)
    if not args.no_record:
        command = shlex.join(
            ["python", "bench/rerank_bench.py", *(sys.argv[1:] if argv is None else argv)]
        )
        stamp = datetime.date.today().isoformat()
        entry = (
            f"\n## rerank_bench, {stamp}, {machine}, torch {torch.__version__}\n\n"
            f"`{command}`\n\n{out}\n\n{notes}\n"
        )
        with open(RESULTS, "a") as f:
            f.write(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
