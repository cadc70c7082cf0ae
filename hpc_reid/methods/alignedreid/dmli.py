"""AlignedReID's local distance: DMLI, the shortest path through the stripe-to-stripe distances.

Zhang et al., "AlignedReID: Surpassing Human-Level Performance in Person Re-Identification",
arXiv 1711.08184, Sec. 3 (dynamically matching local information). For the S stripe features
f_1..f_S of one image and g_1..g_S of another (each C-d):

    e_ij = ||f_i - g_j||_2,    d_ij = (exp(e_ij) - 1) / (exp(e_ij) + 1) = tanh(e_ij / 2)
    S_11 = d_11,  S_1j = S_1,j-1 + d_1j,  S_i1 = S_i-1,1 + d_i1,
    S_ij = min(S_i-1,j, S_i,j-1) + d_ij,      distance = S_SS

the cost of the cheapest right/down path from (1, 1) to (S, S): the sum of its 2S - 1 cells, not
normalised, as both public codes compute it (huanghoujing's ``shortest_dist``, Luo's
``local_dist``). The exp ratio of the paper is evaluated as tanh (or 2 sigmoid(e) - 1), which never
overflows; the papers' form is inf / inf = NaN past e = 88 in float32.

The distance is symmetric, d(x, y) = d(y, x): swapping the images transposes (d_ij), and the
transpose of a right/down path is a down/right path with the same cells.

Two implementations of one definition:
- training (:func:`dmli_matrix`, :func:`dmli_paired`): differentiable, the DP over whole (N, M) or
  (N,) tensors with ``torch.minimum``, computed in float32 at least (a bf16/fp16 autocast input is
  upcast) so that the sums of 2S - 1 terms keep their precision;
- evaluation (:func:`dmli_distance`): no autograd, tile by tile of queries x gallery, the stripe
  distances of a tile by one GEMM and the DP in place, vectorised along the anti-diagonals.
"""

from __future__ import annotations

import torch

# A squared distance is clamped here before the sqrt (as BoT's euclidean distance is): coinciding
# stripes then give e = 1e-6 and a zero gradient, instead of the NaN of d sqrt(s) / ds at s = 0.
SQUARED_EPS = 1e-12

# Default evaluation tile, queries x gallery, chosen on 2 cores (AMD EPYC, 1 MiB L2 per core,
# 32 MiB L3; Market-1501 size, bench/dmli_bench.py). A tile's buffer is S^2 * tq * tg float32:
# 8 MiB at S = 8 for 32 x 1024, so it stays in L3 from the GEMM through the element-wise passes
# and the DP. With one thread, tiles from 16 x 512 to 128 x 1024 ran within 10% of each other
# (4.2-4.7 ns a stripe pair, the GEMM alone 2.4); with two OpenMP threads every element-wise call
# of a tile (~4S of them) ends in a barrier, and on a shared, loaded machine small tiles lost
# 3-10x to those barriers: 32 x 1024 keeps every call at >= 32k elements (ATen's grain size) with
# the fewest calls that still fit L3. On CUDA a call is a kernel launch, so a tile wants far more
# work: 256 x 4096 (256 MiB at S = 8; untested on a GPU so far).
CPU_TILE = (32, 1024)
CUDA_TILE = (256, 4096)


def _check_stripes(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected stripe features (N, S, C), got shape {tuple(x.shape)}")


def _check_pair(x: torch.Tensor, y: torch.Tensor, xname: str, yname: str) -> None:
    _check_stripes(xname, x)
    _check_stripes(yname, y)
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{xname} {tuple(x.shape)} and {yname} {tuple(y.shape)}: expected the same number of "
            "stripes S and channels C"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half inputs, float64 kept (gradcheck), so the DP never sums in bf16."""
    return torch.promote_types(x.dtype, torch.float32)


def _shortest_path(cell, stripes: int) -> torch.Tensor:
    """S_SS of the DMLI recursion, ``cell(i, j)`` giving the batch of d_ij (any shape).

    Out-of-place and row by row, so autograd records every step: d S_SS / d d_ij is 1 on the
    chosen path and 0 elsewhere (at an exact tie ``torch.minimum`` splits the gradient in two).
    """
    above: list[torch.Tensor] = []
    for i in range(stripes):
        row: list[torch.Tensor] = []
        for j in range(stripes):
            d = cell(i, j)
            if i == 0 and j == 0:
                row.append(d)
            elif i == 0:
                row.append(row[j - 1] + d)
            elif j == 0:
                row.append(above[0] + d)
            else:
                row.append(torch.minimum(above[j], row[j - 1]) + d)
        above = row
    return above[-1]


def _squashed(squared: torch.Tensor) -> torch.Tensor:
    """d = tanh(e / 2) of e = sqrt(max(squared, eps))."""
    return torch.tanh(0.5 * squared.clamp(min=SQUARED_EPS).sqrt())


def dmli_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, M) DMLI distances between every row of ``x`` (N, S, C) and of ``y`` (M, S, C).

    Differentiable; for a training batch (the local triplet loss mined with the local distance,
    mutual learning's local distance matrices). Memory: N * M * S^2 for the stripe distances and
    about as much for the DP's intermediate tensors kept for the backward pass.
    """
    _check_pair(x, y, "x", "y")
    dtype = _compute_dtype(x)
    (n, s, c), m = x.shape, y.shape[0]
    xf = x.to(dtype).reshape(n * s, c)
    yf = y.to(dtype).reshape(m * s, c)
    squared = xf.pow(2).sum(1, keepdim=True) + yf.pow(2).sum(1) - 2.0 * (xf @ yf.t())
    d = _squashed(squared).view(n, s, m, s)
    return _shortest_path(lambda i, j: d[:, i, :, j], s)


def dmli_paired(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) DMLI distances of row i of ``x`` (N, S, C) to row i of ``y`` (N, S, C): an anchor and
    its mined positive or negative. Differentiable."""
    _check_pair(x, y, "x", "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x {tuple(x.shape)} and y {tuple(y.shape)}: paired distances need as many rows in both"
        )
    dtype = _compute_dtype(x)
    xf, yf = x.to(dtype), y.to(dtype)
    squared = (
        xf.pow(2).sum(2).unsqueeze(2)
        + yf.pow(2).sum(2).unsqueeze(1)
        - 2.0 * (xf @ yf.transpose(1, 2))
    )
    d = _squashed(squared)
    return _shortest_path(lambda i, j: d[:, i, j], x.shape[1])


# ----------------------------------------------------------------------------- evaluation


def _stripe_major(x: torch.Tensor) -> torch.Tensor:
    """(n, S, C) -> (S * n, C) float32 with row i * n + a = stripe i of sample a: the GEMM of two
    such matrices is laid out [i, a, j, b], so each DP cell (i, j) is an (n_q, n_g) block whose
    rows are contiguous."""
    n, s, c = x.shape
    return x.to(torch.float32).transpose(0, 1).reshape(s * n, c)


def _tile_distance(
    q_rows: torch.Tensor, q_sq: torch.Tensor, g_rows: torch.Tensor, g_sq: torch.Tensor, s: int
) -> torch.Tensor:
    """(tq, tg) DMLI distances of one tile, from stripe-major features and their squared norms.

    One buffer of S^2 * tq * tg floats, overwritten in place: squared distances by one GEMM, then
    d = tanh(e / 2) = 2 sigmoid(e) - 1 (torch's CPU sigmoid is vectorised, about 6x faster than its
    tanh, and as exact: 2e-7 absolute), then S_ij in place of d_ij.
    """
    tq, tg = q_rows.shape[0] // s, g_rows.shape[0] // s
    buf = torch.addmm(g_sq.unsqueeze(0), q_rows, g_rows.t(), alpha=-2.0)
    # clamp at 0, not eps: no gradient here, and e = 0 is then exact for identical stripes.
    buf.add_(q_sq.unsqueeze(1)).clamp_(min=0.0).sqrt_().sigmoid_().mul_(2.0).sub_(1.0)
    d = buf.view(s, tq, s, tg)
    if s > 1:
        d[0].cumsum_(dim=1)  # first row: S_1j = S_1,j-1 + d_1j
        d[:, :, 0].cumsum_(dim=0)  # first column: S_i1 = S_i-1,1 + d_i1
    # The interior by anti-diagonals k = i + j: cells of one anti-diagonal depend only on the
    # previous one, so each is a single strided (n, tq, tg) view, 2S - 3 steps of two calls instead
    # of (S-1)^2. Cell (i, k - i) starts at i * st0 + (k - i) * st2 = k * st2 + i * (st0 - st2).
    st0, st1, st2, st3 = d.stride()
    base = d.storage_offset()
    step = st0 - st2
    scratch = torch.empty((max(s - 1, 0), tq, tg), dtype=buf.dtype, device=buf.device)

    def diagonal(k: int, i0: int, n: int) -> torch.Tensor:
        return d.as_strided((n, tq, tg), (step, st1, st3), base + k * st2 + i0 * step)

    for k in range(2, 2 * s - 1):
        i0, i1 = max(1, k - s + 1), min(s - 1, k - 1)
        n = i1 - i0 + 1
        best = scratch[:n]
        # cells (i, k - i) for i0 <= i <= i1; above: (i - 1, k - i), on diagonal k - 1 from i0 - 1;
        # left: (i, k - i - 1), on diagonal k - 1 from i0.
        torch.minimum(diagonal(k - 1, i0 - 1, n), diagonal(k - 1, i0, n), out=best)
        diagonal(k, i0, n).add_(best)
    return d[s - 1, :, s - 1, :]


@torch.no_grad()
def dmli_distance(
    q: torch.Tensor,
    g: torch.Tensor,
    tile: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Q, G) float32 DMLI distances of queries ``q`` (Q, S, C) to gallery ``g`` (G, S, C).

    Exact (the same recursion as :func:`dmli_matrix`, in float32) and memory-bounded: computed
    tile by tile, ``tile = (tq, tg)`` queries x gallery (default :data:`CPU_TILE` or
    :data:`CUDA_TILE` by device), each tile needing S^2 * tq * tg floats; nothing of size
    Q x G x S^2 is ever held. ``out``, if given, is a (Q, G) float32 tensor on ``q``'s device that
    receives the result (a row block of a larger matrix, say). Works on CPU and CUDA tensors alike.
    This is the "local" part distance of evaluation: ``fn(q_block, g_block) -> (tq, tg)``.
    """
    _check_pair(q, g, "query", "gallery")
    if q.device != g.device:
        raise ValueError(f"query on {q.device} and gallery on {g.device}: expected one device")
    (nq, s, _), ng = q.shape, g.shape[0]
    if tile is None:
        tile = CUDA_TILE if q.device.type == "cuda" else CPU_TILE
    tq, tg = tile
    if tq < 1 or tg < 1:
        raise ValueError(f"tile {tile}: expected (queries, gallery) >= (1, 1)")
    if out is None:
        out = torch.empty((nq, ng), dtype=torch.float32, device=q.device)
    elif out.shape != (nq, ng) or out.dtype != torch.float32 or out.device != q.device:
        raise ValueError(
            f"out: expected a ({nq}, {ng}) float32 tensor on {q.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    # Gallery tiles outside: each is rearranged once and reused by every query tile; a query tile
    # (S * tq * C floats) is rearranged again per gallery tile, at a small fraction of the GEMM.
    for g0 in range(0, ng, tg):
        g_rows = _stripe_major(g[g0 : g0 + tg])
        g_sq = g_rows.pow(2).sum(1)
        for q0 in range(0, nq, tq):
            q_rows = _stripe_major(q[q0 : q0 + tq])
            q_sq = q_rows.pow(2).sum(1)
            out[q0 : q0 + tq, g0 : g0 + tg] = _tile_distance(q_rows, q_sq, g_rows, g_sq, s)
    return out
