"""AlignedReID's local (DMLI) test distance at Market-1501 size: time and peak RSS of
``dmli_distance`` streamed by query tiles, against the reference codes' numpy batched DP.

Features: random Gaussian stripes (fixed seed), float32, each stripe L2-normalised (as
huanghoujing's ``normalize_feature`` does; unnormalised 128-d Gaussians would put every e_ij near
16 and every d_ij at 1.0, a degenerate table). The timing does not depend on the values.

Cases, in one process, on the same query tiles (``--query-tile`` rows x the whole gallery, each
tile's (tq, G) block handed to a consumer that keeps every query's top-k, so Q x G is never held):
- ``dmli_distance``: all tiles, streamed; the full local distance;
- ``numpy DP``: huanghoujing's ``parallel_local_dist`` (utils/distance.py, float32: the stripe
  distances by a BLAS GEMM, (exp(e) - 1) / (exp(e) + 1), reshaped to [S, S, tq, tg] and the DP
  looped over whole arrays with ``np.min(np.stack(...))``), over the gallery in chunks of 200 as
  its ``low_memory_local_dist`` does, on ``--numpy-tiles`` of the query tiles spread over the set
  (0: all) -- its full time is extrapolated linearly from them when they are a subset;
- ``dmli_distance`` again on exactly those tiles, timed right after numpy on each, so the ratio
  compares the two under the same load (the machine may be shared);
- ``stripe GEMM only``: the tile GEMMs alone on the same tiles, the floor of any exact float32
  method that computes the S^2 stripe distances by matrix product (numpy's included).

Peak RSS: the process's VmHWM (reset through /proc/self/clear_refs before each case), which
includes the features and the Python/torch runtime; ``ru_maxrss`` where /proc is missing.

    python bench/dmli_bench.py                          # Market size, 2 threads
    python bench/dmli_bench.py --threads 1 --numpy-tiles 0
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpc_reid.methods.alignedreid.dmli import CPU_TILE, CUDA_TILE, dmli_distance

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NUMPY_GALLERY_SPLIT = 200  # huanghoujing's low_memory_local_dist: len(y) / 200 + 1 chunks


# ----------------------------------------------------------------------------- the numpy reference


def numpy_compute_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """huanghoujing's ``compute_dist(..., 'euclidean')``: (m1, m2) euclidean distances."""
    square1 = np.sum(np.square(a), axis=1)[..., np.newaxis]
    square2 = np.sum(np.square(b), axis=1)[np.newaxis, ...]
    squared = -2 * np.matmul(a, b.T) + square1 + square2
    squared[squared < 0] = 0
    return np.sqrt(squared)


def numpy_shortest_dist(dist_mat: np.ndarray) -> np.ndarray:
    """huanghoujing's ``shortest_dist``: the DP over [m, n, ...] arrays, one whole array a cell."""
    m, n = dist_mat.shape[:2]
    dist = np.zeros_like(dist_mat)
    for i in range(m):
        for j in range(n):
            if i == 0 and j == 0:
                dist[i, j] = dist_mat[i, j]
            elif i == 0:
                dist[i, j] = dist[i, j - 1] + dist_mat[i, j]
            elif j == 0:
                dist[i, j] = dist[i - 1, j] + dist_mat[i, j]
            else:
                dist[i, j] = (
                    np.min(np.stack([dist[i - 1, j], dist[i, j - 1]], axis=0), axis=0)
                    + dist_mat[i, j]
                )
    return dist[-1, -1]


def numpy_local_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """huanghoujing's ``parallel_local_dist``: x [M, m, d], y [N, n, d] -> [M, N]."""
    big_m, m, d = x.shape
    big_n, n, _ = y.shape
    dist_mat = numpy_compute_dist(x.reshape(big_m * m, d), y.reshape(big_n * n, d))
    dist_mat = (np.exp(dist_mat) - 1.0) / (np.exp(dist_mat) + 1.0)
    dist_mat = dist_mat.reshape(big_m, m, big_n, n).transpose(1, 3, 0, 2)
    return numpy_shortest_dist(dist_mat)


def numpy_block(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(tq, G): the gallery in chunks of 200, as ``low_memory_local_dist`` splits it."""
    chunks = range(0, len(g), NUMPY_GALLERY_SPLIT)
    return np.concatenate([numpy_local_dist(q, g[c : c + NUMPY_GALLERY_SPLIT]) for c in chunks], 1)


# ----------------------------------------------------------------------------- measuring


class TopK:
    """The consumer of streamed (tq, G) blocks: every query's k nearest gallery items."""

    def __init__(self, num_query: int, k: int):
        self.k = k
        self.values = torch.empty(num_query, k)
        self.indices = torch.empty(num_query, k, dtype=torch.long)

    def __call__(self, q0: int, block: torch.Tensor) -> None:
        v, i = torch.topk(block, min(self.k, block.shape[1]), dim=1, largest=False)
        self.values[q0 : q0 + len(block), : v.shape[1]] = v.cpu()
        self.indices[q0 : q0 + len(block), : i.shape[1]] = i.cpu()


def _vm_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def peak_rss(result: dict):
    """Sets result["peak"], the process's peak RSS in bytes during the block."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        resettable = True
    except OSError:
        resettable = False
    yield
    if resettable:
        result["peak"] = _vm_bytes("VmHWM")
    else:  # no /proc: the peak since the process started (KiB on Linux)
        result["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stripe_features(n: int, stripes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, stripes, dim, generator=generator)
    return torch.nn.functional.normalize(x, dim=2)


def gemm_only(q: torch.Tensor, g: torch.Tensor, tile: tuple[int, int]) -> None:
    """The tile GEMMs of ``dmli_distance`` alone (same shapes, same stripe-major layout, the same
    rearrangement of each tile's features), results dropped."""
    tq, tg = tile
    c = q.shape[2]
    for g0 in range(0, len(g), tg):
        g_rows = g[g0 : g0 + tg].transpose(0, 1).reshape(-1, c)
        for q0 in range(0, len(q), tq):
            q_rows = q[q0 : q0 + tq].transpose(0, 1).reshape(-1, c)
            torch.mm(q_rows, g_rows.t())


def spread(n_tiles: int, wanted: int) -> list[int]:
    """``wanted`` tile numbers spread evenly over ``n_tiles`` (all when wanted is 0 or more)."""
    if wanted <= 0 or wanted >= n_tiles:
        return list(range(n_tiles))
    return sorted({round(k * (n_tiles - 1) / max(wanted - 1, 1)) for k in range(wanted)})


def run(args) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    qf = stripe_features(args.queries, args.stripes, args.dim, gen)
    gf = stripe_features(args.gallery, args.stripes, args.dim, gen)
    tile = (args.tile_q, args.tile_g)
    tq = args.query_tile
    starts = list(range(0, args.queries, tq))
    res: dict = {"tiles": len(starts), "tile": tile}

    # Ours, streamed over every query tile.
    q_dev, g_dev = qf.to(device), gf.to(device)
    dmli_distance(q_dev[:2], g_dev[:50], tile)  # warm-up (CUDA context, MKL)
    res["base_rss"] = _vm_bytes("VmRSS") if os.path.exists("/proc/self/status") else None
    consumer = TopK(args.queries, args.topk)
    mem: dict = {}
    with peak_rss(mem):
        _sync(device)
        tic = time.perf_counter()
        for q0 in starts:
            consumer(q0, dmli_distance(q_dev[q0 : q0 + tq], g_dev, tile))
        _sync(device)
        res["ours_s"] = time.perf_counter() - tic
    res["ours_rss"] = mem["peak"]

    # The same tiles, numpy then ours then the GEMM alone, one tile after the other.
    picked = spread(len(starts), args.numpy_tiles)
    res["picked"] = picked
    res["picked_rows"] = sum(min(tq, args.queries - starts[t]) for t in picked)
    g_np = gf.numpy()
    numpy_consumer = TopK(args.queries, args.topk)
    res["numpy_s"] = res["ours_same_s"] = res["gemm_s"] = 0.0
    res["max_diff"] = 0.0
    mem = {}
    with peak_rss(mem):
        for t in picked:
            q0 = starts[t]
            tic = time.perf_counter()
            block_np = torch.from_numpy(numpy_block(qf[q0 : q0 + tq].numpy(), g_np))
            numpy_consumer(q0, block_np)
            res["numpy_s"] += time.perf_counter() - tic

            _sync(device)
            tic = time.perf_counter()
            block = dmli_distance(q_dev[q0 : q0 + tq], g_dev, tile)
            consumer(q0, block)
            _sync(device)
            res["ours_same_s"] += time.perf_counter() - tic

            tic = time.perf_counter()
            gemm_only(q_dev[q0 : q0 + tq], g_dev, tile)
            _sync(device)
            res["gemm_s"] += time.perf_counter() - tic
            res["max_diff"] = max(res["max_diff"], float((block.cpu() - block_np).abs().max()))
    res["numpy_rss"] = mem["peak"]
    return res


def table(args, res: dict) -> str:
    scale = args.queries / res["picked_rows"]  # linear in the number of query rows
    subset = len(res["picked"]) < res["tiles"]
    gib = 2**30

    def row(name, tiles, seconds, full, rss, ratio):
        rss_s = f"{rss / gib:.2f}" if rss is not None else "-"
        return f"| {name} | {tiles} | {seconds:.2f} | {full:.1f} | {rss_s} | {ratio} |"

    n_picked = f"{len(res['picked'])} of {res['tiles']}"
    numpy_full = "extrapolated" if subset else "full"
    full_np = res["numpy_s"] * scale
    lines = [
        "| case | query tiles timed | seconds, those tiles | seconds, full Q x G "
        "| peak RSS GiB | numpy / this (same tiles) |",
        "|---|---|---|---|---|---|",
        row("numpy DP (huanghoujing)", n_picked, res["numpy_s"],
            full_np, res["numpy_rss"], "1.0"),
        row("dmli_distance", n_picked, res["ours_same_s"], res["ours_same_s"] * scale, None,
            f"{res['numpy_s'] / res['ours_same_s']:.1f}x"),
        row("dmli_distance, streamed", f"all {res['tiles']}", res["ours_s"], res["ours_s"],
            res["ours_rss"],
            f"{full_np / res['ours_s']:.1f}x (vs numpy's {numpy_full} time)"),
        row("stripe GEMM only (floor)", n_picked, res["gemm_s"], res["gemm_s"] * scale, None,
            f"{res['numpy_s'] / res['gemm_s']:.1f}x (the most any GEMM method can gain)"),
    ]  # fmt: skip
    if subset:
        lines.append(
            f"\nnumpy timed on {len(res['picked'])} of {res['tiles']} query tiles "
            f"({res['picked_rows']} of {args.queries} queries); its full-size seconds are "
            f"extrapolated linearly (x {scale:.2f}), as are the same-tile rows'."
        )
    lines.append(
        f"max |ours - numpy| on the timed tiles: {res['max_diff']:.1e} (distances in "
        f"[0, {2 * args.stripes - 1}))"
    )
    if res["base_rss"] is not None:
        lines.append(
            f"process RSS before the cases (Python, torch, the features): "
            f"{res['base_rss'] / gib:.2f} GiB; the peaks above include it"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--stripes", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads")
    parser.add_argument(
        "--numpy-tiles", type=int, default=4, help="query tiles the numpy DP runs on (0: all)"
    )
    parser.add_argument(
        "--query-tile",
        type=int,
        default=200,
        help="query rows a streamed block (200: huanghoujing's)",
    )
    parser.add_argument(
        "--tile-q", type=int, default=None, help="dmli_distance's tile (default by device)"
    )
    parser.add_argument("--tile-g", type=int, default=None)
    parser.add_argument(
        "--topk", type=int, default=100, help="the consumer keeps each query's top-k"
    )
    parser.add_argument("--device", default="cpu", help="dmli_distance's device; numpy is on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args(argv)
    default = CUDA_TILE if args.device.startswith("cuda") else CPU_TILE
    args.tile_q = args.tile_q or default[0]
    args.tile_g = args.tile_g or default[1]

    torch.set_num_threads(args.threads)
    try:  # numpy's BLAS threads too (torch's OpenMP and MKL pools are limited as well)
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads)
    except ImportError:
        limits = contextlib.nullcontext()
        print("threadpoolctl missing: numpy's BLAS threads are not limited", file=sys.stderr)
    load = os.getloadavg()[0]
    with limits:
        res = run(args)
    out = table(args, res)
    machine = f"{os.cpu_count()}-core {platform.machine()} CPU, {args.threads} threads"
    if args.device.startswith("cuda"):
        machine += f", dmli_distance on {torch.cuda.get_device_name(torch.device(args.device))}"
    notes = (
        f"Q={args.queries} x G={args.gallery}, {args.stripes} stripes of {args.dim}-d float32, "
        f"L2-normalised random stripes (seed {args.seed}); streamed blocks of {args.query_tile} "
        f"queries, dmli_distance tile {res['tile']}, numpy's gallery in chunks of "
        f"{NUMPY_GALLERY_SPLIT}; top-{args.topk} consumer; 1-min load average at start {load:.2f}"
    )
    command = shlex.join(
        ["python", "bench/dmli_bench.py", *(sys.argv[1:] if argv is None else argv)]
    )
    stamp = datetime.date.today().isoformat()
    entry = (
        f"## dmli_bench, {stamp}, {machine}, torch {torch.__version__}, numpy {np.__version__}"
        f"\n\n`{command}`\n\n{out}\n\n{notes}\n"
    )
    print(entry)
    if args.record:
        with open(RESULTS, "a") as f:
            f.write("\n" + entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
