"""AlignedReID's local (DMLI) test distance and its global+local evaluation at Market-1501 size:
time and peak RSS of ours against the reference codes' numpy, measured in the same run.

Case ``local`` (``--cases local``): the local distance alone. Features: random Gaussian stripes
(fixed seed), float32, each stripe L2-normalised (as huanghoujing's ``normalize_feature`` does;
unnormalised 128-d Gaussians would put every e_ij near 16 and every d_ij at 1.0, a degenerate
table). The timing does not depend on the values. On the same query tiles (``--query-tile`` rows x
the whole gallery, each tile's (tq, G) block handed to a consumer that keeps every query's top-k,
so Q x G is never held):
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

Case ``evaluation`` (``--cases evaluation``): the whole global+local evaluation from features,
CMC and mAP under the Market protocol. Rows are a 2048-d global feature and 8 x 128 stripes
(``--global-dim``, ``--stripes``, ``--dim``), each L2-normalised (huanghoujing's
``normalize_feature``, its default), drawn around one random centre per identity
(``--signal`` x centre + N(0, I); a distractor has no centre) so that the ranking is neither
trivial nor chance. Labels have Market-1501's structure (:func:`market_like_labels`): 750 test
identities over 6 cameras, one query per camera that saw the identity (3,368 queries, 4.5 an
identity), 13,120 gallery images of those identities (17.5 an identity, in every camera that saw
it, so each query has same-camera junk and positives in other cameras) and 2,793 distractors
(pid 0), 15,913 in all.
- ours: one ``evaluate_features`` call with ``RowDistance(layout, "global+local",
  metric="euclidean")``: the global euclidean distance plus ``dmli_distance``, tile by tile,
  ranked by the library's ranker (no Q x G matrix);
- the reference, as huanghoujing's test code computes it (plain numpy, float32): the global
  distance by ``compute_dist(..., 'euclidean')`` (Q x G), the local one by
  ``low_memory_local_dist`` (both sets in len / 200 + 1 chunks, ``parallel_local_dist`` on each
  pair, concatenated to Q x G), their sum, then CMC and mAP from ``np.argsort`` of the whole
  matrix, query by query, as open-reid's ``cmc``/``mean_ap`` and torchreid's ``eval_market1501``
  do (vectorised numpy, one argsort for both: the cheaper form of the reference).
Our CMC and mAP are checked against the reference's (their largest difference is printed; they
can differ only where float32 rounding reorders two gallery items whose distances differ by ~1e-6).

Peak RSS: the process's VmHWM (reset through /proc/self/clear_refs before each case), which
includes the case's features and the Python/torch runtime; ``ru_maxrss`` where /proc is missing.
The 1-minute load average is printed before and after the cases (the machine may be shared).

    python bench/dmli_bench.py                          # Market size, both cases, 2 threads
    python bench/dmli_bench.py --threads 1 --cases evaluation --record
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from real_data import stamped  # bench/real_data.py: the RESULTS.md heading of a bench run

from hpc_reid.atomic import write_atomic
from hpc_reid.bench.machine import cpu_model
from hpc_reid.evaluation.distances import RowDistance, evaluate_features
from hpc_reid.evaluation.parts import METRIC, RowLayout
from hpc_reid.evaluation.ranking import rank_metrics
from hpc_reid.methods.alignedreid.dmli import CPU_TILE, CUDA_TILE, dmli_distance

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NUMPY_GALLERY_SPLIT = 200  # huanghoujing's low_memory_local_dist: len(y) / 200 + 1 chunks
MARKET_IDS = 750  # Market-1501's test identities
MARKET_DISTRACTORS = 2793  # its gallery's pid-0 images (15,913 once the junk, pid -1, is dropped)
IDENTITY_SIGNAL = 0.35  # global: E d^2 is 2D for a positive, 2D(1 + 0.35^2) for a negative


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


def numpy_low_memory_local_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """huanghoujing's ``low_memory_local_dist``: x and y each in len / 200 + 1 near-equal chunks
    (``np.array_split``), ``parallel_local_dist`` on every pair, concatenated to [M, N]."""
    x_parts = np.array_split(x, len(x) // NUMPY_GALLERY_SPLIT + 1)
    y_parts = np.array_split(y, len(y) // NUMPY_GALLERY_SPLIT + 1)
    rows = [np.concatenate([numpy_local_dist(a, b) for b in y_parts], axis=1) for a in x_parts]
    return np.concatenate(rows, axis=0)


def reference_cmc_map(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int,
    kind: str = "quicksort",
) -> tuple[np.ndarray, float, int]:
    """CMC (first ``max_rank``), mAP and the number of valid queries of a full (Q, G) matrix, as
    the reference codes rank it (open-reid's ``cmc``/``mean_ap``, torchreid's
    ``eval_market1501``): every row sorted by ``np.argsort``, the same-pid-same-camera gallery
    items removed, a query without a positive left out; AP is the mean over the positives of the
    precision at each (sklearn's ``average_precision_score`` where no distances tie).

    ``kind``: numpy's default sort, as the reference codes use it, leaves tied distances (several a
    row in float32 at Market size) in no defined order; "stable" breaks ties by gallery index, as
    this library's ranker does."""
    indices = np.argsort(distmat, axis=1, kind=kind)
    matches = g_pids[indices] == q_pids[:, np.newaxis]
    cmc = np.zeros(max_rank)
    aps = []
    for i in range(len(distmat)):
        order = indices[i]
        keep = (g_pids[order] != q_pids[i]) | (g_camids[order] != q_camids[i])
        hits = np.flatnonzero(matches[i][keep])  # 0-based places of the positives, in rank order
        if hits.size == 0:
            continue
        if hits[0] < max_rank:
            cmc[hits[0] :] += 1
        aps.append(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))
    if not aps:
        raise ValueError("no valid query: every query lost its positives to the junk removal")
    return cmc / len(aps), float(np.mean(aps)), len(aps)


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


# ----------------------------------------------------------------------------- the evaluation case


def market_like_labels(
    rng: np.random.Generator, queries: int, gallery: int, ids: int, cameras: int, distractors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(q_pids, q_camids, g_pids, g_camids)`` with Market-1501's structure (module docstring).

    Each identity 1..``ids`` is seen by 2 to ``cameras`` cameras (``queries`` in all, spread at
    random) and has one query per camera that saw it, as Market's queries are chosen; its gallery
    holds one image in each of those cameras (every query has same-camera junk and a positive in
    another camera, so every query is valid) and the rest of the ``gallery - distractors``
    identity images go to random identities, each in one of its cameras. ``distractors`` gallery
    images are pid 0 (Market's distractor id, never a query) on random cameras. The gallery is
    shuffled, so that its order says nothing of the pids."""
    if cameras < 2 or not 2 * ids <= queries <= cameras * ids:
        raise ValueError(
            f"{queries} queries of {ids} identities over {cameras} cameras: expected cameras >= 2 "
            "and 2 to `cameras` queries an identity (one per camera that saw it)"
        )
    if not 0 <= distractors <= gallery - queries:
        raise ValueError(
            f"gallery {gallery} with {distractors} distractors: expected 0 <= distractors <= "
            f"gallery - queries ({gallery - queries}), one gallery image per query's camera"
        )
    # Cameras per identity: 2 each, plus queries - 2 * ids extra slots drawn without replacement.
    slots = np.repeat(np.arange(ids), cameras - 2)
    extra = rng.choice(len(slots), queries - 2 * ids, replace=False)
    seen_by = 2 + np.bincount(slots[extra], minlength=ids)
    q_pids = np.repeat(np.arange(1, ids + 1), seen_by)
    q_camids = np.concatenate([rng.permutation(cameras)[:k] for k in seen_by])
    first = np.concatenate([[0], np.cumsum(seen_by)[:-1]])  # each identity's first query
    more = gallery - distractors - queries
    who = rng.integers(0, ids, more)
    which = first[who] + (rng.random(more) * seen_by[who]).astype(np.int64)
    g_pids = np.concatenate([q_pids, q_pids[which], np.zeros(distractors, np.int64)])
    g_camids = np.concatenate([q_camids, q_camids[which], rng.integers(0, cameras, distractors)])
    order = rng.permutation(gallery)
    return q_pids, q_camids, g_pids[order], g_camids[order]


def identity_rows(
    pids: np.ndarray, centres: torch.Tensor, signal: float, layout: RowLayout, gen: torch.Generator
) -> torch.Tensor:
    """(N, W) float32 retrieval rows ``signal * centres[pid] + N(0, I)``, each part of ``layout``
    L2-normalised along its last dimension (the global feature; each stripe). ``centres[0]`` is 0:
    a distractor is isotropic noise, which after normalisation is a random person of its own."""
    rows = torch.randn(len(pids), layout.width, generator=gen)
    rows.add_(centres[torch.from_numpy(pids)], alpha=signal)
    for part in layout.parts:
        view = rows[:, part.start : part.stop].view(len(rows), *part.shape)
        view.div_(view.norm(dim=-1, keepdim=True).clamp_(min=1e-12))
    return rows


def run_evaluation(args) -> dict:
    """The ``evaluation`` case: ours, then the reference, on the same rows and labels."""
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    q_pids, q_camids, g_pids, g_camids = market_like_labels(
        rng, args.queries, args.gallery, args.ids, args.cameras, args.distractors
    )
    layout = RowLayout.build(
        {
            "global": ("global", METRIC, (args.global_dim,)),
            "local": ("local", "dmli", (args.stripes, args.dim)),
        }
    )
    gen = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.ids + 1, layout.width, generator=gen)
    centres[0] = 0.0
    qrows = identity_rows(q_pids, centres, args.signal, layout, gen).to(device)
    grows = identity_rows(g_pids, centres, args.signal, layout, gen).to(device)
    distance = RowDistance(layout, "global+local", metric="euclidean")
    distance(qrows[:2], grows[:50])  # warm-up (CUDA context, MKL)
    res: dict = {"load": [os.getloadavg()[0]]}
    res["ours_base_rss"] = _vm_bytes("VmRSS") if os.path.exists("/proc/self/status") else None
    mem: dict = {}
    with peak_rss(mem):
        _sync(device)
        tic = time.perf_counter()
        ours = evaluate_features(
            qrows, grows, q_pids, g_pids, q_camids, g_camids, distance, args.max_rank
        )
        _sync(device)
        res["ours_s"] = time.perf_counter() - tic
    res["ours_rss"], res["ours"] = mem["peak"], ours
    res["load"].append(os.getloadavg()[0])

    # The reference holds its features as the test code does: a (N, D) global and an (N, S, C)
    # local array each, copied out of the rows, which are then freed.
    def arrays(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        rows = rows.cpu()
        return tuple(np.ascontiguousarray(layout.part(n).of(rows).numpy()) for n in layout.names)

    (qg, ql), (gg, gl) = arrays(qrows), arrays(grows)
    del qrows, grows
    res["reference_base_rss"] = _vm_bytes("VmRSS") if os.path.exists("/proc/self/status") else None
    phases: dict[str, float] = {}
    mem = {}
    with peak_rss(mem):
        tic = time.perf_counter()
        global_dist = numpy_compute_dist(qg, gg)
        phases["global distance"] = time.perf_counter() - tic
        local_dist = numpy_low_memory_local_dist(ql, gl)
        phases["local distance"] = time.perf_counter() - tic - sum(phases.values())
        dist = global_dist + local_dist  # both kept, as the test code keeps (and ranks) each
        phases["sum"] = time.perf_counter() - tic - sum(phases.values())
        cmc, mean_ap, valid = reference_cmc_map(
            dist, q_pids, g_pids, q_camids, g_camids, args.max_rank
        )
        phases["argsort CMC/mAP"] = time.perf_counter() - tic - sum(phases.values())
        res["reference_s"] = time.perf_counter() - tic
    res["reference_rss"] = mem["peak"]
    res["load"].append(os.getloadavg()[0])
    res["reference"] = {"cmc": cmc, "mAP": mean_ap, "num_valid": valid, "phases": phases}
    res["cmc_diff"] = float(np.abs(ours.cmc - cmc).max())
    res["map_diff"] = abs(ours.mAP - mean_ap)

    # Untimed checks that say where a difference comes from: our distance on a few query rows
    # against the reference's rows, and the library's ranker on the reference's own matrix
    # against the reference's ranking with ties broken alike (the same protocol: equal up to the
    # means' rounding).
    rows = torch.cat([torch.from_numpy(a).flatten(1) for a in (qg[:200], ql[:200])], dim=1)
    g_rows = torch.cat([torch.from_numpy(a).flatten(1) for a in (gg, gl)], dim=1)
    ours_rows = distance(rows.to(device), g_rows.to(device)).cpu().numpy()
    res["dist_diff"] = float(np.abs(ours_rows - dist[: len(rows)]).max())
    res["dist_rows"] = len(rows)
    same = rank_metrics(dist, q_pids, g_pids, q_camids, g_camids, max_rank=args.max_rank)
    cmc_stable, map_stable, _ = reference_cmc_map(
        dist, q_pids, g_pids, q_camids, g_camids, args.max_rank, kind="stable"
    )
    res["protocol_diff"] = max(
        float(np.abs(same.cmc - cmc_stable).max()), abs(same.mAP - map_stable)
    )
    res["agree"] = (
        ours.num_valid == valid == same.num_valid
        and max(res["cmc_diff"], res["map_diff"]) <= args.tol
        and res["protocol_diff"] <= 1e-12
    )
    return res


def evaluation_table(args, res: dict) -> str:
    gib = 2**30
    ours, ref = res["ours"], res["reference"]

    def rss(key: str) -> str:
        return f"{res[key] / gib:.2f}" if res[key] is not None else "-"

    def metrics(cmc: np.ndarray, mean_ap: float) -> str:
        ranks = [k for k in (1, 5, 10) if k <= len(cmc)]
        return ", ".join(f"rank-{k} {100 * cmc[k - 1]:.2f}" for k in ranks) + (
            f", mAP {100 * mean_ap:.2f}"
        )

    lines = [
        "| global+local evaluation | seconds | peak RSS GiB | reference / this |",
        "|---|---|---|---|",
        f"| reference: numpy Q x G global + batched DP local, argsort CMC/mAP "
        f"| {res['reference_s']:.1f} | {rss('reference_rss')} | 1.0 |",
        f"| evaluate_features, RowDistance global+local (euclidean + dmli) "
        f"| {res['ours_s']:.1f} | {rss('ours_rss')} "
        f"| {res['reference_s'] / res['ours_s']:.1f}x |",
        "",
        "reference phases: "
        + ", ".join(f"{name} {sec:.1f} s" for name, sec in ref["phases"].items()),
        f"this: {metrics(ours.cmc, ours.mAP)} ({ours.num_valid} valid queries)",
        f"reference: {metrics(ref['cmc'], ref['mAP'])} ({ref['num_valid']} valid queries)",
        f"max |this - reference|: CMC@1..{args.max_rank} {res['cmc_diff']:.1e}, "
        f"mAP {res['map_diff']:.1e} (tolerance {args.tol:g}); from the distances' float32 "
        f"rounding: max |this - reference| distance {res['dist_diff']:.1e} on "
        f"{res['dist_rows']} queries x the gallery, and numpy's quicksort order of tied "
        f"distances; this library's ranker on the reference's own matrix gives the "
        f"reference's CMC/mAP, ties broken by gallery index (a stable argsort), to "
        f"{res['protocol_diff']:.1e}",
    ]
    if res["ours_base_rss"] is not None:
        lines.append(
            f"process RSS before each case (Python, torch, the case's features): this "
            f"{res['ours_base_rss'] / gib:.2f} GiB, reference "
            f"{res['reference_base_rss'] / gib:.2f} GiB; the peaks above include it"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=["local", "evaluation"],
        default=["local", "evaluation"],
        help="local: the local distance alone; evaluation: global+local CMC/mAP",
    )
    parser.add_argument("--global-dim", type=int, default=2048, help="evaluation: global feature")
    parser.add_argument("--ids", type=int, default=MARKET_IDS, help="evaluation: test identities")
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument(
        "--distractors", type=int, default=MARKET_DISTRACTORS, help="gallery images of pid 0"
    )
    parser.add_argument(
        "--signal", type=float, default=IDENTITY_SIGNAL, help="identity centre's weight"
    )
    parser.add_argument("--max-rank", type=int, default=50, help="CMC ranks compared")
    parser.add_argument(
        "--tol", type=float, default=1e-4, help="largest CMC/mAP difference to the reference"
    )
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args(argv)
    default = CUDA_TILE if args.device.startswith("cuda") else CPU_TILE
    args.tile_q = args.tile_q or default[0]
    args.tile_g = args.tile_g or default[1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    torch.set_num_threads(args.threads)
    try:  # numpy's BLAS threads too (torch's OpenMP and MKL pools are limited as well)
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads)
    except ImportError:
        limits = contextlib.nullcontext()
        print("threadpoolctl missing: numpy's BLAS threads are not limited", file=sys.stderr)
    sections, loads, agree = [], [f"start {os.getloadavg()[0]:.2f}"], True
    with limits:
        if "local" in args.cases:
            res = run(args)
            loads.append(f"after the local case {os.getloadavg()[0]:.2f}")
            sections.append(
                f"{table(args, res)}\n\nLocal distance alone: {args.stripes} stripes of "
                f"{args.dim}-d float32, L2-normalised random stripes (seed {args.seed}); streamed "
                f"blocks of {args.query_tile} queries, dmli_distance tile {res['tile']}, numpy's "
                f"gallery in chunks of {NUMPY_GALLERY_SPLIT}; top-{args.topk} consumer."
            )
        if "evaluation" in args.cases:
            res = run_evaluation(args)
            loads += [
                f"before this {res['load'][0]:.2f}",
                f"after this {res['load'][1]:.2f}",
                f"after the reference {res['load'][2]:.2f}",
            ]
            agree = res["agree"]
            sections.append(
                f"{evaluation_table(args, res)}\n\nGlobal+local evaluation: {args.global_dim}-d "
                f"global (euclidean) + {args.stripes} x {args.dim}-d stripes (DMLI), each "
                f"L2-normalised, {args.signal:g} x an identity centre + N(0, I) (seed "
                f"{args.seed}); Market-like labels: {args.ids} identities over {args.cameras} "
                f"cameras, {args.distractors} distractors; evaluate_features' default query tile "
                f"(1024) and dmli_distance's default tile; "
                f"the reference in huanghoujing's 200-row chunks."
            )
    machine = (
        f"{os.cpu_count()}-core CPU ({cpu_model()}), {args.threads} thread(s) "
        f"(torch, OpenMP and BLAS), torch {torch.__version__}, numpy {np.__version__}"
    )
    if args.device.startswith("cuda"):
        machine += f", ours on {torch.cuda.get_device_name(torch.device(args.device))}"
    stamp = stamped("dmli_bench", sys.argv[1:] if argv is None else argv, machine)
    entry = (
        f"{stamp['header']}\nQ={args.queries} x G={args.gallery}.\n\n"
        + "\n\n".join(sections)
        + f"\n\n1-minute load average: {', '.join(loads)}.\n"
    )
    print(entry)
    if args.record:
        before = RESULTS.read_text() if RESULTS.is_file() else ""
        write_atomic(RESULTS, before + "\n" + entry)
        print(f"appended to {RESULTS}")
    if not agree:
        print(
            f"the evaluation's CMC/mAP differ from the reference's by more than {args.tol:g}",
            file=sys.stderr,
        )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
