"""CPU stand-ins for the fused CUDA kernel (kernels/rank_fused.cu) and for CUDA tensors, so that
the host-side logic around the kernel (single process and sharded) and the dispatch to it run in
CI without a GPU."""

from __future__ import annotations

import torch


class DenseKernel:
    """The extension's two functions on the CPU: the same distance for a pair in both (float64
    dot products rounded to float32); a histogram of the kept negatives over the number of sorted
    positives before them, negatives after every positive not counted. ``pos_g`` are compared with
    the gallery's own indices, as the kernel does (negative or past the end for positives held
    elsewhere)."""

    @staticmethod
    def _distances(qx, gx, q_sq, g_sq, euclidean):
        dot = qx.double() @ gx.double().T
        if euclidean:
            return (q_sq.double()[:, None] + g_sq.double()[None, :] - 2 * dot).clamp(min=0).sqrt()
        return 1 - dot

    @classmethod
    def pair_distances(cls, qx, gx, q_sq, g_sq, qi, gi, euclidean):
        return cls._distances(qx, gx, q_sq, g_sq, euclidean)[qi, gi].float()

    @classmethod
    def count_negatives(cls, qx, gx, q_sq, g_sq, q_pids, g_pids, pos_off, pos_d, pos_g, euclidean):
        assert pos_g.dtype == torch.int32 and pos_off.numel() == qx.shape[0] + 1
        assert int(pos_off[-1]) == pos_d.numel()
        dist = cls._distances(qx, gx, q_sq, g_sq, euclidean).float()
        hist = torch.zeros(pos_d.numel(), dtype=torch.int32)
        for q in range(qx.shape[0]):
            lo, hi = int(pos_off[q]), int(pos_off[q + 1])
            pd, pg = pos_d[lo:hi], pos_g[lo:hi].long()
            neg = torch.nonzero(g_pids != q_pids[q]).flatten()
            d = dist[q, neg][:, None]
            before = (pd < d) | ((pd == d) & (pg < neg[:, None]))  # (negatives, positives)
            counts = before.sum(dim=1)
            for c in counts[counts < hi - lo].tolist():
                hist[lo + c] += 1
        return hist

    @classmethod
    def distmat(cls, qx, gx, q_sq, g_sq, euclidean):
        return cls._distances(qx, gx, q_sq, g_sq, euclidean).float().numpy()


class ClaimsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so that the CUDA dispatch runs without a GPU (the
    operations it reaches after the dispatch run on the CPU)."""

    @property
    def is_cuda(self):
        return True
