"""Query-gallery distances, and evaluation of features tile by tile (Q x G never held at once).

:func:`pairwise_distance` is ``evaluation.metric`` (cosine or euclidean) on feature rows;
:class:`RowDistance` is the test-time distance of retrieval rows
(:mod:`~hpc_reid.evaluation.parts`): ``evaluation.distance``, the weighted sum of the distances of
the parts it names. Every evaluation (tiled, sharded, streamed from HDF5, re-ranked) takes either:
a metric name is the distance of rows that are one feature.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from hpc_reid.evaluation.parts import (
    METRIC,
    PartDistance,
    PartLayout,
    RowLayout,
    check_distance,
    part_distance,
)
from hpc_reid.evaluation.ranking import QueryRanks, RankResult, combine, query_ranks

if TYPE_CHECKING:
    from hpc_reid.config import EvaluationConfig

Metric = Literal["cosine", "euclidean"]


def _check_metric(metric: str) -> None:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}; expected 'cosine' or 'euclidean'")


def _check_features(qf: torch.Tensor, gf: torch.Tensor) -> None:
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"expected query (Q, D) and gallery (G, D) features, got {tuple(qf.shape)} and "
            f"{tuple(gf.shape)}"
        )


def _column_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) gallery ranges of about ``chunk`` rows; a short last range joins the one
    before it, so no matrix product is thin (BLAS may round thin products differently)."""
    bounds = [*range(0, n, chunk), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 64:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


def pairwise_distance(
    qf: torch.Tensor,
    gf: torch.Tensor,
    metric: Metric = "cosine",
    tile: int = 4096,
    gallery_chunk: int = 16384,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Q, G) float32 distances on the features' device, computed ``tile`` query rows and
    ``gallery_chunk`` gallery rows at a time.

    cosine: 1 - cos(q, g) of L2-normalised features, in [0, 2]. euclidean: ||q - g||, from the
    expansion ||q||^2 + ||g||^2 - 2 q.g clamped at 0 against rounding (one matrix product per
    block instead of a (tile, G, D) difference tensor). Computed in float32 whatever the input.
    The gallery is normalised chunk by chunk, so beside the output only one chunk's copy is held
    (no normalised copy of the whole gallery). ``out``: a (Q, G) float32 tensor to write into.
    """
    _check_features(qf, gf)
    _check_metric(metric)
    if tile < 1 or gallery_chunk < 1:
        raise ValueError(f"tile and gallery_chunk must be >= 1, got {tile} and {gallery_chunk}")
    shape = (qf.shape[0], gf.shape[0])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=qf.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32:
        raise ValueError(
            f"out must be a {shape} float32 tensor, got {tuple(out.shape)} {out.dtype}"
        )
    qf = qf.float()
    qf = F.normalize(qf, dim=1) if metric == "cosine" else qf
    q_sq = qf.pow(2).sum(dim=1, keepdim=True) if metric == "euclidean" else None
    for g0, g1 in _column_chunks(gf.shape[0], gallery_chunk):
        g = gf[g0:g1].float()
        if metric == "cosine":
            g = F.normalize(g, dim=1)
        else:
            g_sq = g.pow(2).sum(dim=1)
        for start in range(0, qf.shape[0], tile):
            q, block = qf[start : start + tile], out[start : start + tile, g0:g1]
            if metric == "cosine":
                block.copy_(torch.mm(q, g.t()).neg_().add_(1.0))
            else:
                sq = q_sq[start : start + tile] + g_sq - 2.0 * (q @ g.t())
                block.copy_(sq.clamp_(min=0).sqrt_())
    return out


class RowDistance:
    """``evaluation.distance`` on retrieval rows laid out by ``layout``: the weighted sum of the
    named parts' distances, ``sum_p weight_p * d_p(q_p, g_p)``, a (tq, tg) float32 block.

    A "metric" part's ``d_p`` is :func:`pairwise_distance` with ``metric`` on its flattened columns
    (a cosine part is normalised on its own); any other part's is the part distance its layout names
    (:func:`~hpc_reid.evaluation.parts.register_part_distance`), given the part's (t, *shape)
    rows. ``layout=None`` means rows that are one "metric" feature of any width (a metric name
    given where a distance is expected: :func:`as_row_distance`).

    Asking for a part the layout lacks, or one whose part distance is not registered, is a
    ConfigError naming ``evaluation.distance``, the part and what ``source`` declares.
    """

    def __init__(
        self,
        layout: RowLayout | None,
        distance: str = "global",
        weights: Mapping[str, float] | None = None,
        metric: Metric = "cosine",
        source: str = "this model",
    ):
        _check_metric(metric)
        self.layout = layout
        self.metric: Metric = metric
        if layout is None:
            layout_parts: tuple[PartLayout | None, ...] = (None,)
            declared = {"global": METRIC}
        else:
            layout_parts = layout.parts
            declared = {p.name: p.distance for p in layout.parts}
        terms = check_distance(distance, weights, declared, source)
        by_name = dict(zip(declared, layout_parts, strict=True))
        #: (part, weight, part distance or None for "metric"), in the order of ``distance``
        self.terms: tuple[tuple[PartLayout | None, float, PartDistance | None], ...] = tuple(
            (by_name[n], w, None if declared[n] == METRIC else part_distance(declared[n]))
            for n, w in terms
        )
        self.spec = "+".join(f"{n}*{w:g}" for n, w in terms)

    @classmethod
    def of_metric(cls, metric: Metric) -> RowDistance:
        """``metric`` on whole rows: :func:`pairwise_distance` itself."""
        return cls(None, "global", None, metric)

    @classmethod
    def from_config(
        cls, layout: RowLayout | None, evaluation: EvaluationConfig, source: str = "this model"
    ) -> RowDistance:
        """``evaluation.distance``, ``evaluation.distance_weights`` and ``evaluation.metric``."""
        return cls(
            layout, evaluation.distance, evaluation.distance_weights, evaluation.metric, source
        )

    def __repr__(self) -> str:
        layout = "whole rows" if self.layout is None else self.layout.to_json()
        return f"RowDistance({self.spec}, metric={self.metric}, layout={layout})"

    def signature(self) -> int:
        """A checksum of the distance and layout: ranks that must agree compare it."""
        return zlib.crc32(repr(self).encode())

    @property
    def whole_row_metric(self) -> Metric | None:
        """The metric when this distance is :func:`pairwise_distance` of whole rows (one "metric"
        part of weight 1 filling the row; the fused CUDA kernel ranks with it), else None."""
        if len(self.terms) != 1:
            return None
        part, weight, fn = self.terms[0]
        if fn is not None or weight != 1.0:
            return None
        if part is None or (part.start == 0 and part.stop == self.layout.width):
            return self.metric
        return None

    def restrict(
        self, qf: torch.Tensor, gf: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, RowDistance]:
        """``(qf, gf, self)``, except for one "metric" part of weight 1 not filling the row: that
        part's columns (contiguous copies; an empty (0, 0) shard stays empty) and the whole-row
        distance, so that a global-only distance of a many-part row ranks exactly as the global
        features alone would (the fused kernel included)."""
        if len(self.terms) != 1 or self.whole_row_metric is not None:
            return qf, gf, self
        part, weight, fn = self.terms[0]
        if fn is not None or weight != 1.0:
            return qf, gf, self
        cut = slice(part.start, part.stop)
        return qf[:, cut].contiguous(), gf[:, cut].contiguous(), RowDistance.of_metric(self.metric)

    def __call__(
        self,
        q: torch.Tensor,
        g: torch.Tensor,
        *,
        tile: int = 4096,
        gallery_chunk: int = 16384,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(tq, tg) float32 distances of query rows ``q`` (tq, W) to gallery rows ``g`` (tg, W), on
        their device, ``gallery_chunk`` gallery rows at a time (each part distance sees one chunk;
        "metric" parts are computed ``tile`` query rows at a time, as :func:`pairwise_distance`).
        ``out``: a (tq, tg) float32 tensor to write into."""
        metric = self.whole_row_metric
        if metric is not None:
            return pairwise_distance(q, g, metric, tile, gallery_chunk, out)
        _check_features(q, g)
        q, g, restricted = self.restrict(q, g)
        if restricted is not self:
            return restricted(q, g, tile=tile, gallery_chunk=gallery_chunk, out=out)
        if self.layout is not None and q.shape[1] != self.layout.width:
            raise ValueError(
                f"rows of width {q.shape[1]}, the layout's are {self.layout.width} "
                f"({', '.join(self.layout.names)})"
            )
        shape = (q.shape[0], g.shape[0])
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=q.device)
        elif tuple(out.shape) != shape or out.dtype != torch.float32:
            raise ValueError(
                f"out must be a {shape} float32 tensor, got {tuple(out.shape)} {out.dtype}"
            )
        if gallery_chunk < 1:
            raise ValueError(f"gallery_chunk must be >= 1, got {gallery_chunk}")
        if not shape[0] or not shape[1]:
            return out
        query_parts = [_part_of(part, q) for part, _, _ in self.terms]
        for g0, g1 in _column_chunks(shape[1], gallery_chunk):
            block = out[:, g0:g1]
            for i, ((part, weight, fn), qp) in enumerate(zip(self.terms, query_parts, strict=True)):
                gp = _part_of(part, g[g0:g1])
                if fn is None:
                    d = pairwise_distance(qp.flatten(1), gp.flatten(1), self.metric, tile, g1 - g0)
                else:
                    d = fn(qp, gp)
                    if tuple(d.shape) != (shape[0], g1 - g0) or d.dtype != torch.float32:
                        raise ValueError(
                            f"part distance {part.distance!r} of part {part.name!r} returned "
                            f"{tuple(d.shape)} {d.dtype}; expected ({shape[0]}, {g1 - g0}) "
                            "float32"
                        )
                if i == 0:
                    block.copy_(d).mul_(weight)
                else:
                    block.add_(d, alpha=weight)
        return out


def _part_of(part: PartLayout | None, rows: torch.Tensor) -> torch.Tensor:
    """A part's (t, *shape) float32 features from rows; ``None``: the whole rows."""
    return (rows if part is None else part.of(rows)).float()


def as_row_distance(distance: Metric | RowDistance) -> RowDistance:
    """``distance`` itself, or a metric name as the distance of whole rows."""
    if isinstance(distance, RowDistance):
        return distance
    return RowDistance.of_metric(distance)


def evaluate_features(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    metric: Metric | RowDistance = "cosine",
    max_rank: int = 50,
    query_tile: int = 1024,
    backend: str = "auto",
    cuhk03_old_protocol: bool = False,
    repeats: int = 10,
    seed: int = 0,
) -> RankResult:
    """Rank features directly: distances of ``query_tile`` queries at a time, ranked per tile.

    ``metric``: a metric name (the rows are one feature) or a :class:`RowDistance` (rows of
    retrieval parts, ``evaluation.distance``). Peak memory beside the features is one
    (query_tile, G) tile, reused, and one gallery chunk (:func:`pairwise_distance`); the result is
    identical to ``rank_metrics(metric(qf, gf).numpy(), ...)`` on the full matrix.

    CUDA features with backend "auto" or "cuda" (not the CUHK03 old protocol) and a distance that
    is one "metric" part go to the fused kernel of :mod:`~hpc_reid.evaluation.ranking_cuda`, which
    stores no distance tile; its distances may differ from ``torch.mm``'s in the last bit. Where it
    cannot be compiled, "cuda" raises with the build error, and "auto" warns once and ranks this
    function's distance tiles on the GPU with the torch ranker, as it ranks those of a distance of
    several parts. Other backends rank the tiles on the CPU.
    """
    _check_features(qf, gf)
    qf, gf, distance = as_row_distance(metric).restrict(qf, gf)
    whole_row = distance.whole_row_metric
    if query_tile < 1:
        raise ValueError(f"query_tile must be >= 1, got {query_tile}")
    q_pids, q_camids = np.asarray(q_pids), np.asarray(q_camids)
    if q_pids.shape != (qf.shape[0],) or q_camids.shape != (qf.shape[0],):
        raise ValueError(
            f"q_pids {q_pids.shape} and q_camids {q_camids.shape} must be ({qf.shape[0]},), one "
            "per query feature"
        )
    kernel_wanted = backend in ("auto", "cuda") and not cuhk03_old_protocol
    if qf.is_cuda and gf.is_cuda and kernel_wanted and whole_row is not None:
        from hpc_reid.evaluation import ranking_cuda  # compiles its kernel on first use only

        if ranking_cuda.kernel_for(backend) is not None:  # "cuda" raises if it cannot be built
            return ranking_cuda.evaluate_features_cuda(
                qf, gf, q_pids, g_pids, q_camids, g_camids, whole_row, max_rank, query_tile
            )
    # A tile on the GPU is ranked there by the torch ranker (query_ranks), not copied to the host.
    parts: list[QueryRanks] = []
    buffer = torch.empty(min(query_tile, qf.shape[0]), gf.shape[0], device=qf.device)
    for start in range(0, qf.shape[0], query_tile):
        stop = start + query_tile
        q = qf[start:stop]
        dist = distance(q, gf, tile=query_tile, out=buffer[: len(q)])
        parts.append(
            query_ranks(
                dist,
                q_pids[start:stop],
                g_pids,
                q_camids[start:stop],
                g_camids,
                backend=backend,
                cuhk03_old_protocol=cuhk03_old_protocol,
                repeats=repeats,
                seed=seed,
                query_start=start,
            )
        )
    return combine(parts, max_rank)
