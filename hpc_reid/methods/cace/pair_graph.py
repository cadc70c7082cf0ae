"""CACE-Net's pair graph: correspondence attention and the discrepancy graph convolution between the
cells of two images' feature maps side by side (Jiang et al., "Devil's in the Details: Aligning
Visual Clues for Conditional Embedding in Person Re-Identification", arXiv 2009.05250; the released
code's ``PairGraph``, /work/shared/methods/cace-net.md, "Architecture").

Every cell of the two maps is a node (N = 2HW). With y the L2-normalised 1x1 projection theta of a
node's feature (C -> c, c = C/16 by default):

    A = ReLU(y y^T), diagonal zeroed      the correspondence attention: no pose estimator, the
                                          affinity of cells within and across the two images
    D = diag(row sums of A)
    L = D^-1/2 (D - A) D^-1/2             normalised Laplacian; a degree <= 1e-3 counts as 1, and
                                          D^-1/2 is a constant for the gradient (detached), as
                                          in both releases
    out = P + W_o(g(P) L)                 g: C -> c, W_o: c -> C, both 1x1 without bias, W_o
                                          zero-initialised: the module starts as the identity

Per node, g(P) L is g_n - sum_m A_nm g_m / sqrt(d_n d_m): the discrepancy between a cell and the
cells it is attended to, which conditions each image's map on the other's. The two halves of
``out`` are the conditioned maps.

Pairs: for a batch of B maps X, ordered pair k = i * B + j puts X[j] on the left and X[i] on the
right (the released ``get_pair_feature``: ``x.repeat`` on the left, ``x.repeat_interleave`` on the
right), so the left half P0 is image j conditioned on image i and the right half P1 image i
conditioned on image j; :func:`pair_index` gives (i, j) of every k.

Cost: theta, g and the normalisation act on each cell alone, so they run once per image, not per
pair (B instead of B^2 maps through two C x c convolutions); the per-pair work is the two N x N
products, W_o and the pooling the caller passes. Pair (j, i) is pair (i, j) mirrored
(:func:`mirrored_pairs`): the head computes the B(B + 1)/2 pairs i <= j (136 of 256 at B = 16) and
reads the others' halves from them. ``chunk`` pairs go through at a time, so the
N x N matrices exist for one chunk; when gradients are on and there is more than one chunk, each
chunk is also checkpointed (recomputed in the backward pass), so what training keeps per pair is
the pooled halves rather than every intermediate map: memory grows with the chunk, at the price
of one more forward of the graph. One chunk of all the pairs keeps everything and recomputes
nothing. Either way the result is the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: A degree at or below this counts as 1 in D^-1/2 (both releases): a cell attended by no other
#: (all its cosines <= 0, or a zero feature) keeps its own feature instead of dividing by ~0.
MIN_DEGREE = 1e-3


def pair_index(batch: int, device: torch.device | str | None = None):
    """(i, j) of the B^2 ordered pairs k = i * B + j of a batch of ``batch``: pair k holds image j
    on the left and image i on the right (the released ``get_pair_feature``)."""
    k = torch.arange(batch * batch, device=device)
    return torch.div(k, batch, rounding_mode="floor"), k % batch


def mirrored_pairs(batch: int, device: torch.device | str | None = None):
    """The B(B + 1)/2 pairs to compute for all B^2 ordered ones, and where each ordered pair's
    halves are among them: (left, right, take0, take1).

    Swapping a pair's two maps permutes its nodes, and every step of the graph is equivariant to
    a permutation of the nodes (theta, g and W_o act per node; A, D and L permute with them), so
    the pair (j, i) is the pair (i, j) mirrored: its left half is (i, j)'s right half and the
    other way round. The pairs i <= j are computed (``left`` = j, ``right`` = i: pair k = i * B +
    j of :func:`pair_index`) and, with h0, h1 their (U, ...) halves, ordered pair k's halves are
    ``cat([h0, h1])[take0[k]]`` and ``[take1[k]]``: the same values and gradients as computing all
    B^2 pairs, for 1/2 + 1/(2B) of the work."""
    rows, cols = torch.triu_indices(batch, batch, device=device)  # i <= j
    table = torch.zeros(batch, batch, dtype=torch.long, device=device)
    table[rows, cols] = torch.arange(rows.shape[0], device=device)
    i, j = pair_index(batch, device)
    u = table[torch.minimum(i, j), torch.maximum(i, j)]
    mirrored = (i > j).long() * rows.shape[0]
    return cols, rows, u + mirrored, u + rows.shape[0] - mirrored


def correspondence_attention(y: torch.Tensor) -> torch.Tensor:
    """A = ReLU(y^T y) with a zero diagonal, (M, N, N), for ``y`` (M, c, N) of unit-norm node
    projections: the cosine affinity of every two cells, negative ones cut, no self-edges."""
    a = torch.relu(torch.bmm(y.transpose(1, 2), y))
    eye = torch.eye(a.shape[-1], dtype=torch.bool, device=a.device)
    return a.masked_fill(eye, 0.0)


def laplacian_message(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """g L, (M, c, N), for node features ``g`` (M, c, N) and the attention ``a`` (M, N, N), with
    L = D^-1/2 (D - A) D^-1/2 (degrees <= :data:`MIN_DEGREE` taken as 1, D^-1/2 detached).

    L is never formed: (g L)_n = s_n (d_n s_n g_n - sum_m s_m g_m A_mn), s = D^-1/2, one N x N
    matrix (A) per pair instead of three, and one batched product."""
    degree = a.sum(dim=2)  # (M, N); A is symmetric, rows and columns alike
    scale = torch.where(degree > MIN_DEGREE, degree, torch.ones_like(degree)).rsqrt().detach()
    scaled = g * scale.unsqueeze(1)
    return (scaled * degree.unsqueeze(1) - torch.bmm(scaled, a)) * scale.unsqueeze(1)


class PairGraph(nn.Module):
    """The correspondence attention and discrepancy GCN over pairs of maps (module docstring).

    ``channels`` C of the maps, ``attention_dim`` c (None: C / 16, at least 1; 128 on a
    ResNet-50), ``chunk`` pairs at a time (``model.cace.pair_chunk``).
    """

    def __init__(self, channels: int, attention_dim: int | None = None, chunk: int = 64):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"model.cace.pair_chunk: {chunk}; expected a positive pair count")
        self.attention_dim = attention_dim or max(channels // 16, 1)
        self.chunk = chunk
        c = self.attention_dim
        self.theta = nn.Conv2d(channels, c, kernel_size=1, bias=False)
        self.g = nn.Conv2d(channels, c, kernel_size=1, bias=False)
        self.out = nn.Conv2d(c, channels, kernel_size=1, bias=False)
        nn.init.zeros_(self.out.weight)  # the identity at start: conditioning is learned

    def forward(
        self,
        maps: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioned halves of the pairs (``maps[left[m]]`` | ``maps[right[m]]``), m < M.

        ``maps`` (B, C, H, W); ``left``, ``right`` (M,) indices into it (:func:`pair_index` for
        the B^2 training pairs). Returns (left conditioned on right, right conditioned on left),
        each (M, C, H, W), or ``reduce`` of each (the head's pooling: then only the pooled halves
        outlive a chunk)."""
        if maps.dim() != 4 or left.shape != right.shape or left.dim() != 1:
            raise ValueError(
                f"PairGraph: expected maps (B, C, H, W) and left/right indices (M,), got "
                f"{tuple(maps.shape)}, {tuple(left.shape)} and {tuple(right.shape)}"
            )
        reduce = reduce if reduce is not None else _identity
        # per cell, so per image: B maps through theta and g, not B^2
        y = F.normalize(self.theta(maps), dim=1)
        g = self.g(maps)
        starts = range(0, left.shape[0], self.chunk)
        recompute = torch.is_grad_enabled() and len(starts) > 1
        halves0, halves1 = [], []
        for s in starts:
            args = (maps, y, g, left[s : s + self.chunk], right[s : s + self.chunk], reduce)
            if recompute:
                h0, h1 = checkpoint(self._pairs, *args, use_reentrant=False)
            else:
                h0, h1 = self._pairs(*args)
            halves0.append(h0)
            halves1.append(h1)
        return torch.cat(halves0), torch.cat(halves1)

    def _pairs(self, maps, y, g, left, right, reduce):
        """One chunk: the two maps side by side along the width (node n = row * 2W + column, the
        released layout), attention, message, and the residual split back into the halves."""
        k, w = left.shape[0], maps.shape[3]
        y_pair = torch.cat([y[left], y[right]], dim=3).flatten(2)  # (k, c, N)
        g_pair = torch.cat([g[left], g[right]], dim=3)
        c, h = g_pair.shape[1], g_pair.shape[2]
        attention = correspondence_attention(y_pair)
        message = laplacian_message(g_pair.flatten(2), attention).reshape(k, c, h, 2 * w)
        update = self.out(message)
        # P + W_o(.) half by half: the concatenated P itself is never materialised
        return reduce(maps[left] + update[..., :w]), reduce(maps[right] + update[..., w:])

    def extra_repr(self) -> str:
        return f"attention_dim={self.attention_dim}, chunk={self.chunk}"


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
