"""The fused CUDA ranker: distance tiles and ranking counts in one kernel (kernels/rank_fused.cu).

:func:`evaluate_features_cuda` ranks CUDA features without ever holding a (tile, G) distance
matrix ("Exact ranking metrics without sorting" in ARCHITECTURE.md). Per tile of queries:

1. the kept positives of every query (same pid, other camera) are found from the gallery grouped
   by pid; their distances come from the kernel's pair routine and are sorted per query by
   (distance, gallery index);
2. the fused kernel computes the tile's distances block by block in registers (a tiled GEMM) and,
   in its epilogue, adds every kept negative to a per-query histogram bin: how many positives
   precede it. Negatives past the last positive are not counted; they rank no positive;
3. rank of positive k (0-based, in order) = k + 1 + negatives in bins 0..k; first rank, AP and INP
   follow on the CPU with the numpy backend's arithmetic, so the results equal the numpy and
   Cython backends' bit for bit on the same distances.

The pair routine and the GEMM accumulate each dot product in the same order with the same
rounding, so a positive's distance is the same float in both passes and ties are exact. The
distances are the kernel's own: they may differ from ``torch.mm``'s (cuBLAS sums in another order)
in the last bit, so on continuous features two items a few ulps apart may swap places compared to
:func:`~hpc_reid.evaluation.distances.pairwise_distance`. :func:`pair_distances` gives the kernel's
distances for any pairs, e.g. to rank them with another backend.

The same three steps run over a gallery sharded across ranks in
:mod:`~hpc_reid.evaluation.sharded_fused` (positives all-gathered between the passes, histograms
all-reduced after the second), from the building blocks here: :func:`kernel_features`,
:func:`kept_positives`, :func:`sort_positives`, :func:`ranks_from_histogram`. Both take the kernel
as an argument, so a CPU stand-in with its two functions runs the host-side logic in tests.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (nvcc and ninja
needed) and cached under ``$HPC_REID_CACHE/torch_extensions`` or
``~/.cache/hpc_reid/torch_extensions``. :func:`kernel_for` says what an evaluation backend gets:
"cuda" the kernel or a RuntimeError with the build error (never a silent fallback), "auto" the
kernel or None after one warning (the caller ranks distance tiles with the torch ranker), any other
backend None. Nothing here compiles or imports CUDA code until a function is called.
"""

from __future__ import annotations

import os
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from hpc_reid.evaluation.ranking import QueryRanks, RankResult, combine

__all__ = [
    "evaluate_features_cuda",
    "fused_kernel",
    "kernel_for",
    "pair_distances",
    "query_ranks_cuda",
    "require_kernel",
]

SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "rank_fused.cu"
BLOCK_K = 8  # BK in rank_fused.cu: features are zero-padded to a multiple of it
MAX_QUERY_TILE = 65535 * 128  # grid.y limit x BM

_kernel: ModuleType | None = None
_load_error: str | None = None  # why the build failed, once it has
_load_exception: BaseException | None = None
_warned = False  # fused_kernel's one warning about the fallback


def extension_dir() -> Path:
    """Where the compiled extension is cached, one folder per torch and CUDA version."""
    base = Path(os.environ.get("HPC_REID_CACHE") or Path.home() / ".cache" / "hpc_reid")
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return base / "torch_extensions" / f"rank_fused-{tag}"


def load_kernel() -> ModuleType:
    """Compile (or take from the cache) and import kernels/rank_fused.cu; raises on failure."""
    from torch.utils.cpp_extension import load  # imported here: it probes for CUDA on import

    if not SOURCE.is_file():
        raise FileNotFoundError(
            f"{SOURCE} not found; the fused CUDA ranker needs the source tree (pip install -e .)"
        )
    build_dir = extension_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch runs `ninja` from PATH; pip installs it into this interpreter's scripts folder, which
    # is not on PATH when the venv is used without being activated (.venv/bin/hpc-reid ...).
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    return load(
        name="hpc_reid_rank_fused",
        sources=[str(SOURCE)],
        build_directory=str(build_dir),
        extra_cuda_cflags=["-O3"],
        verbose=False,
    )


def _try_load() -> None:
    """Build or import the extension once; a failure is remembered (``_load_error``), not raised."""
    global _kernel, _load_error, _load_exception
    if _kernel is None and _load_error is None:
        try:
            _kernel = load_kernel()
        except (OSError, RuntimeError, ImportError) as exc:  # what cpp_extension.load raises
            _load_error = f"{type(exc).__name__}: {exc}"
            _load_exception = exc


def fused_kernel() -> ModuleType | None:
    """The compiled extension, built on the first call; None, with one warning, when it cannot be
    built (no nvcc or ninja, a compiler error), so that callers fall back to the torch ranker."""
    global _warned
    _try_load()
    if _kernel is None and not _warned:
        _warned = True
        warnings.warn(
            f"the fused CUDA ranking kernel ({SOURCE.name}) could not be built, so evaluation "
            f"computes distance tiles and ranks them with the torch ranker instead; "
            f"{_load_error}",
            RuntimeWarning,
            stacklevel=2,
        )
    return _kernel


def require_kernel() -> ModuleType:
    """The compiled extension; raises RuntimeError with the build error when it cannot be built."""
    _try_load()
    if _kernel is None:
        raise RuntimeError(
            f"the fused CUDA ranking kernel ({SOURCE}) could not be built: {_load_error}"
        ) from _load_exception
    return _kernel


def kernel_for(backend: str) -> ModuleType | None:
    """The fused kernel that ranks CUDA features under evaluation backend ``backend``.

    "cuda" asks for it explicitly: a kernel that cannot be built raises (RuntimeError with the
    build error) rather than silently ranking another way. "auto" takes it when it can be built and
    otherwise returns None after one warning (the caller falls back to distance tiles and the torch
    ranker). Any other backend names a CPU ranker: None, nothing is built.
    """
    if backend == "cuda":
        return require_kernel()
    if backend == "auto":
        return fused_kernel()
    return None


def kernel_features(features: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 features as the kernel reads them (L2-normalised for cosine, zero-padded to a
    multiple of BLOCK_K, contiguous, 16-byte aligned) and their squared norms (euclidean; empty for
    cosine), made as :func:`~hpc_reid.evaluation.distances.pairwise_distance` makes them. Not
    checked for NaN or inf (see :func:`all_finite`)."""
    x = features.float()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        sq = x.new_empty(0)
    else:
        sq = x.pow(2).sum(dim=1)
    pad = -x.shape[1] % BLOCK_K
    x = F.pad(x, (0, pad)) if pad else x.contiguous()
    if x.data_ptr() % 16:  # the kernel reads rows as float4
        x = x.clone()
    return x, sq.contiguous()


def all_finite(x: torch.Tensor, sq: torch.Tensor) -> bool:
    """Whether prepared features and squared norms hold no NaN or inf (ranks are undefined)."""
    return bool(torch.isfinite(x).all() and torch.isfinite(sq).all())


def _prepare(features: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kernel_features`, raising ValueError on NaN or inf."""
    x, sq = kernel_features(features, metric)
    if not all_finite(x, sq):
        raise ValueError("features contain NaN or inf (or overflow); ranks are undefined")
    return x, sq


def _check_inputs(qf: torch.Tensor, gf: torch.Tensor, metric: str) -> None:
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"expected query (Q, D) and gallery (G, D) features, got {tuple(qf.shape)} and "
            f"{tuple(gf.shape)}"
        )
    if not qf.is_cuda or qf.device != gf.device:
        raise ValueError(
            f"features must be CUDA tensors on one device, got {qf.device} and {gf.device}"
        )
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}; expected 'cosine' or 'euclidean'")


def _ids(values, name: str, size: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values)
    if t.shape != (size,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({size},)")
    return t.to(device=device, dtype=torch.int64).contiguous()


def pair_distances(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_index: torch.Tensor,
    g_index: torch.Tensor,
    metric: str = "cosine",
) -> torch.Tensor:
    """float32 distances of the pairs (qf[q_index[t]], gf[g_index[t]]) on the features' device:
    exactly the values the fused kernel ranks, for features as given to
    :func:`evaluate_features_cuda`."""
    _check_inputs(qf, gf, metric)
    qx, q_sq = _prepare(qf, metric)
    gx, g_sq = _prepare(gf, metric)
    qi = torch.as_tensor(q_index).to(device=qf.device, dtype=torch.int64).flatten()
    gi = torch.as_tensor(g_index).to(device=qf.device, dtype=torch.int64).flatten()
    if qi.shape != gi.shape:
        raise ValueError(f"q_index and g_index differ in size: {qi.numel()} and {gi.numel()}")
    for name, idx, n in (("q_index", qi, len(qf)), ("g_index", gi, len(gf))):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(
                f"{name} must lie in [0, {n}), got [{int(idx.min())}, {int(idx.max())}]"
            )
    return require_kernel().pair_distances(
        qx, gx, q_sq, g_sq, qi.contiguous(), gi.contiguous(), metric == "euclidean"
    )


def ranks_from_sorted(ranks: np.ndarray, npos: np.ndarray) -> QueryRanks:
    """QueryRanks from the 1-based ranks of every query's positives, in rank order and query after
    query (``npos[q]`` of them for query q), with the numpy backend's arithmetic: AP is
    ``np.mean(arange(1, p + 1) / ranks)``, the mean taken along rows of queries with the same p
    (NumPy's pairwise summation along a contiguous axis, as for one row)."""
    num_q = npos.size
    first = np.zeros(num_q, dtype=np.int64)
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    starts = np.concatenate(([0], np.cumsum(npos)[:-1])).astype(np.int64)
    for p in np.unique(npos[npos > 0]):
        rows = np.flatnonzero(npos == p)
        r = np.ascontiguousarray(ranks[starts[rows, None] + np.arange(p)])  # (rows, p)
        first[rows] = r[:, 0]
        ap[rows] = np.mean(np.arange(1, p + 1) / r, axis=1)
        inp[rows] = p / r[:, -1]
    return QueryRanks(first_rank=first[:, None], ap=ap, inp=inp, valid=first > 0)


def kept_positives(
    q_pids: torch.Tensor,
    q_cams: torch.Tensor,
    g_cams: torch.Tensor,
    pid_sorted: torch.Tensor,
    by_pid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query row, gallery index) of every kept positive of a tile of queries: the query pid's
    gallery members on another camera, found from the gallery grouped by pid (``pid_sorted``,
    ``by_pid`` = a stable sort of the gallery pids), so the cost is O(B log G + positives).
    Gallery indices ascend within a row."""
    b, device = q_pids.shape[0], q_pids.device
    lo = torch.searchsorted(pid_sorted, q_pids, side="left")
    n_same = torch.searchsorted(pid_sorted, q_pids, side="right") - lo
    row = torch.repeat_interleave(torch.arange(b, device=device), n_same)
    slot = torch.arange(row.numel(), device=device) - (torch.cumsum(n_same, 0) - n_same)[row]
    g = by_pid[lo[row] + slot]
    kept = g_cams[g] != q_cams[row]
    return row[kept], g[kept]


def sort_positives(
    row: torch.Tensor, index: torch.Tensor, dist: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positives in (query row, distance, gallery index) order, whatever their order before, and
    the row offsets (num_rows + 1): row t's positives are ``[pos_off[t], pos_off[t + 1])``."""
    order = torch.sort(index, stable=True).indices
    order = order[torch.sort(dist[order], stable=True).indices]
    order = order[torch.sort(row[order], stable=True).indices]
    row, index, dist = row[order], index[order], dist[order]
    pos_off = torch.searchsorted(row, torch.arange(num_rows + 1, device=row.device))
    return row, index, dist, pos_off


def ranks_from_histogram(
    row: torch.Tensor, pos_off: torch.Tensor, hist: torch.Tensor
) -> QueryRanks:
    """QueryRanks of a tile from its sorted positives' rows and offsets and the histogram of the
    kept negatives over them (bin k of a row: negatives with exactly k positives before them):
    the rank of the positive at place k of its row is k + 1 + the row's bins 0..k."""
    cum = torch.cumsum(hist, 0)  # int64
    start = pos_off[row]
    below = (cum - hist)[start]  # bins of the rows before this one
    ranks = torch.arange(row.numel(), device=row.device) - start + 1 + cum - below
    return ranks_from_sorted(ranks.cpu().numpy(), torch.diff(pos_off).cpu().numpy())


def _rank_tile(
    kernel,
    qx: torch.Tensor,
    q_sq: torch.Tensor,
    q_pids: torch.Tensor,
    q_cams: torch.Tensor,
    gallery: tuple[torch.Tensor, ...],
    euclidean: bool,
) -> QueryRanks:
    gx, g_sq, g_pids, g_cams, pid_sorted, by_pid = gallery
    # 1. Kept positives and their distances from the kernel's pair routine, sorted.
    row, g = kept_positives(q_pids, q_cams, g_cams, pid_sorted, by_pid)
    d = kernel.pair_distances(qx, gx, q_sq, g_sq, row, g, euclidean)
    row, g, d, pos_off = sort_positives(row, g, d, qx.shape[0])
    # 2. Kept negatives before each positive, counted in the GEMM's epilogue.
    hist = kernel.count_negatives(
        qx, gx, q_sq, g_sq, q_pids, g_pids, pos_off, d.contiguous(), g.int(), euclidean
    )
    # 3. Ranks, then first rank, AP and INP.
    return ranks_from_histogram(row, pos_off, hist)


def query_ranks_cuda(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    metric: str = "cosine",
    query_tile: int = 1024,
) -> QueryRanks:
    """Per-query results (as every ranking backend's) of CUDA features, ``query_tile`` queries per
    launch of the fused kernel; the (Q, G) distances are never stored."""
    _check_inputs(qf, gf, metric)
    if not 1 <= query_tile <= MAX_QUERY_TILE:
        raise ValueError(f"query_tile must be in [1, {MAX_QUERY_TILE}], got {query_tile}")
    kernel = require_kernel()
    device, num_q, num_g = qf.device, qf.shape[0], gf.shape[0]
    q_pids_t = _ids(q_pids, "q_pids", num_q, device)
    q_cams_t = _ids(q_camids, "q_camids", num_q, device)
    g_pids_t = _ids(g_pids, "g_pids", num_g, device)
    g_cams_t = _ids(g_camids, "g_camids", num_g, device)
    qx, q_sq = _prepare(qf, metric)
    gx, g_sq = _prepare(gf, metric)
    ids = (q_pids_t, g_pids_t, q_cams_t, g_cams_t)
    return _query_ranks(kernel, qx, q_sq, gx, g_sq, *ids, metric == "euclidean", query_tile)


def _query_ranks(
    kernel,
    qx: torch.Tensor,
    q_sq: torch.Tensor,
    gx: torch.Tensor,
    g_sq: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_cams: torch.Tensor,
    g_cams: torch.Tensor,
    euclidean: bool,
    query_tile: int,
) -> QueryRanks:
    """:func:`query_ranks_cuda` on prepared features and int64 id tensors, with ``kernel`` (the
    extension, or a stand-in with its two functions)."""
    pid_sorted, by_pid = torch.sort(g_pids, stable=True)  # gallery grouped by pid
    gallery = (gx, g_sq, g_pids, g_cams, pid_sorted, by_pid)
    parts = []
    for s in range(0, max(qx.shape[0], 1), query_tile):  # one (empty) tile for no query
        tile = slice(s, s + query_tile)
        parts.append(
            _rank_tile(
                kernel,
                qx[tile],
                q_sq[tile] if euclidean else q_sq,
                q_pids[tile],
                q_cams[tile],
                gallery,
                euclidean,
            )
        )
    return QueryRanks.concatenate(parts)


def evaluate_features_cuda(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    metric: str = "cosine",
    max_rank: int = 50,
    query_tile: int = 1024,
) -> RankResult:
    """CMC, mAP and mINP of CUDA query and gallery features with the fused kernel (Market-1501
    protocol, ties broken by gallery index), as
    :func:`~hpc_reid.evaluation.distances.evaluate_features` computes them on other devices."""
    ranks = query_ranks_cuda(qf, gf, q_pids, g_pids, q_camids, g_camids, metric, query_tile)
    return combine(ranks, max_rank)
