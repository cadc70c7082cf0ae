"""Features in HDF5 files, and their exact evaluation streamed with bounded memory.

A feature file (``hpc-reid extract`` writes ``query.h5`` and ``gallery.h5``) holds the datasets
``features`` (N, W) float32, ``pids`` (N,) int64, ``camids`` (N,) int64 and ``paths`` (N,) UTF-8,
and the attributes ``format_version`` (:data:`FORMAT_VERSION`), ``layout`` (the
:class:`~hpc_reid.evaluation.parts.RowLayout` of the rows as JSON: every retrieval part the model
declares), ``metric``, ``distance`` and ``distance_weights`` (JSON) (the test-time distance of the
config that extracted them; hints for ``hpc-reid eval``), ``model``, ``split`` and ``records``
("images", or "tracklets" for a video set: a row per tracklet, its path the tracklet's first
frame; absent from files written before video sets). A file without ``layout`` (written before
layouts existed) holds one "global" part of the metric.

:func:`evaluate_feature_files` never loads the gallery features whole: per tile of queries it reads
the gallery in chunks twice, first to find each query's positives (pass 1), then to count the
negatives before each of them (pass 2), with the steps of :mod:`hpc_reid.evaluation.sharded`.
Memory is O(query_tile x gallery_chunk + positives + G labels), and the result is that of
``evaluate_features`` on the same features and distance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from hpc_reid.atomic import temporary_sibling
from hpc_reid.evaluation.distances import Metric, RowDistance
from hpc_reid.evaluation.parts import RowLayout
from hpc_reid.evaluation.ranking import QueryRanks, RankResult, combine
from hpc_reid.evaluation.sharded import (
    TilePositives,
    count_negatives_before,
    find_positives,
    tile_query_ranks,
)

__all__ = [
    "FORMAT_VERSION",
    "FeatureFileError",
    "concatenate_feature_files",
    "evaluate_feature_files",
    "file_layout",
    "write_feature_file",
]

FORMAT_VERSION = 1
_COLUMNS = ("features", "pids", "camids", "paths")


class FeatureFileError(ValueError):
    """A feature file that is missing, not HDF5, or not in this format."""


def _create(f: h5py.File, num: int, dim: int, attrs: dict[str, Any]) -> None:
    chunk = (max(1, min(num, 4096)), max(dim, 1)) if num else None
    f.create_dataset("features", shape=(num, dim), dtype=np.float32, chunks=chunk)
    f.create_dataset("pids", shape=(num,), dtype=np.int64)
    f.create_dataset("camids", shape=(num,), dtype=np.int64)
    f.create_dataset("paths", shape=(num,), dtype=h5py.string_dtype("utf-8"))
    f.attrs.update({**attrs, "format_version": FORMAT_VERSION})


def write_feature_file(
    path: str | Path,
    features: np.ndarray | torch.Tensor,
    pids: Sequence[int] | np.ndarray,
    camids: Sequence[int] | np.ndarray,
    paths: Sequence[str],
    layout: RowLayout | None = None,
    **attrs: Any,
) -> Path:
    """Write one feature file, atomically (temporary name, then rename); ``layout`` (of the rows
    ``features``) and ``attrs`` become HDF5 attributes (``metric``, ``model``, ``split``, ...)."""
    path = Path(path)
    if isinstance(features, torch.Tensor):
        features = features.cpu().numpy()
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or not (len(features) == len(pids) == len(camids) == len(paths)):
        raise ValueError(
            f"{path}: features of shape {features.shape}, {len(pids)} pids, {len(camids)} "
            f"camids and {len(paths)} paths; expected (N, D) features and one of each per image"
        )
    if layout is not None:
        if len(features) and features.shape[1] != layout.width:
            raise ValueError(
                f"{path}: rows of width {features.shape[1]}, the layout's are {layout.width}"
            )
        attrs = {**attrs, "layout": layout.to_json()}
    tmp = temporary_sibling(path)
    try:
        with h5py.File(tmp, "w") as f:
            _create(f, len(features), features.shape[1], attrs)
            if len(features):
                f["features"][:] = features
                f["pids"][:] = np.asarray(pids, dtype=np.int64)
                f["camids"][:] = np.asarray(camids, dtype=np.int64)
                f["paths"][:] = [str(p) for p in paths]
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _open(path: str | Path) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"cannot open feature file {path}: {exc}") from None
    missing = [k for k in _COLUMNS if k not in f]
    version = f.attrs.get("format_version")
    if missing or version != FORMAT_VERSION:
        f.close()
        raise FeatureFileError(
            f"{path} is not a feature file of format {FORMAT_VERSION} (format_version {version}, "
            f"missing datasets {missing}); write it with `hpc-reid extract`"
        )
    return f


def file_layout(f: h5py.File, path: str | Path) -> RowLayout | None:
    """The file's row layout: its ``layout`` attribute; one "global" part filling the row for a
    file written before layouts existed; None for such a file without rows."""
    text = f.attrs.get("layout")
    if text is not None:
        try:
            return RowLayout.from_json(str(text), f"{path}: attribute 'layout'")
        except ValueError as exc:
            raise FeatureFileError(str(exc)) from None
    width = f["features"].shape[1]
    return RowLayout.single(width) if width else None


def concatenate_feature_files(
    parts: Sequence[str | Path], path: str | Path, chunk_rows: int = 65536
) -> Path:
    """Join feature files in order into ``path``, ``chunk_rows`` rows at a time, atomically.
    The attributes are the first part's; empty parts (of any feature width) are allowed."""
    path = Path(path)
    files = [_open(p) for p in parts]
    try:
        sizes = [len(f["pids"]) for f in files]
        dims = {f["features"].shape[1] for f, n in zip(files, sizes, strict=True) if n}
        if len(dims) > 1:
            raise FeatureFileError(f"parts {list(parts)} have different feature widths {dims}")
        layouts = {f.attrs.get("layout") for f in files}
        if len(layouts) > 1:
            raise FeatureFileError(f"parts {list(parts)} have different row layouts {layouts}")
        tmp = temporary_sibling(path)
        try:
            with h5py.File(tmp, "w") as out:
                attrs = {k: v for k, v in files[0].attrs.items() if k != "format_version"}
                _create(out, sum(sizes), dims.pop() if dims else 0, attrs)
                row = 0
                for f, n in zip(files, sizes, strict=True):
                    for start in range(0, n, chunk_rows):
                        stop = min(start + chunk_rows, n)
                        for key in _COLUMNS:
                            out[key][row + start : row + stop] = f[key][start:stop]
                    row += n
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        for f in files:
            f.close()
    return path


def _labels(f: h5py.File) -> tuple[np.ndarray, np.ndarray]:
    return f["pids"][:].astype(np.int64), f["camids"][:].astype(np.int64)


def evaluate_feature_files(
    query_path: str | Path,
    gallery_path: str | Path,
    metric: Metric | None = None,
    max_rank: int = 50,
    query_tile: int = 1024,
    gallery_chunk: int = 65536,
    distance: str | None = None,
    distance_weights: Mapping[str, float] | None = None,
) -> RankResult:
    """CMC, mAP and mINP of the query file against the gallery file, streamed (see the module
    docstring), with the :class:`~hpc_reid.evaluation.distances.RowDistance` of the files' row
    layout named by ``distance`` (``evaluation.distance``: "global", "local", "global+local"),
    ``distance_weights`` and ``metric``. Each defaults to the query file's attribute (the weights
    only with the file's distance), else cosine and "global"."""
    if query_tile < 1 or gallery_chunk < 1:
        raise ValueError(f"query_tile {query_tile} and gallery_chunk {gallery_chunk} must be >= 1")
    with _open(query_path) as fq, _open(gallery_path) as fg:
        metric = metric or str(fq.attrs.get("metric", "cosine"))
        if metric not in ("cosine", "euclidean"):
            raise FeatureFileError(f"{query_path}: unknown metric {metric!r}")
        if distance is None:
            distance = str(fq.attrs.get("distance", "global"))
            if distance_weights is None:
                distance_weights = json.loads(str(fq.attrs.get("distance_weights", "{}")))
        qfeat, gfeat = fq["features"], fg["features"]
        q_pids, q_cams = _labels(fq)
        g_pids, g_cams = _labels(fg)
        num_q, num_g = len(q_pids), len(g_pids)
        if num_q == 0 or num_g == 0:
            raise FeatureFileError(f"{num_q} query and {num_g} gallery features: nothing to rank")
        layout, g_layout = file_layout(fq, query_path), file_layout(fg, gallery_path)
        if layout != g_layout:
            raise FeatureFileError(
                f"query features {query_path} have rows of {layout.to_json()}, gallery features "
                f"{gallery_path} rows of {g_layout.to_json()}"
            )
        if qfeat.shape[1] != layout.width or gfeat.shape[1] != layout.width:
            raise FeatureFileError(
                f"query features {query_path} are {qfeat.shape[1]}-d, gallery features "
                f"{gallery_path} {gfeat.shape[1]}-d; their layout says {layout.width}"
            )
        row_distance = RowDistance(
            layout, distance, distance_weights, metric, source=f"the features in {query_path}"
        )
        chunks = [(a, min(a + gallery_chunk, num_g)) for a in range(0, num_g, gallery_chunk)]

        def distances(q: torch.Tensor, a: int, b: int) -> np.ndarray:
            g = torch.from_numpy(gfeat[a:b])
            d = row_distance(q, g, tile=query_tile).numpy()
            if np.isnan(d).any():
                raise ValueError(f"NaN distances to gallery rows {a}..{b - 1} of {gallery_path}")
            return d

        parts: list[QueryRanks] = []
        for start in range(0, num_q, query_tile):
            stop = min(start + query_tile, num_q)
            q = torch.from_numpy(qfeat[start:stop])
            qp, qc = q_pids[start:stop], q_cams[start:stop]
            found = []
            single = None  # one chunk: keep its distances for pass 2 instead of recomputing
            for a, b in chunks:
                d = distances(q, a, b)
                single = d if len(chunks) == 1 else None
                found.append(find_positives(d, qp, qc, g_pids[a:b], g_cams[a:b], a))
            rows, index, dist = (np.concatenate(c) for c in zip(*found, strict=True))
            positives = TilePositives.from_unsorted(rows, index, dist, stop - start)
            before = np.zeros(index.size, dtype=np.int64)
            for a, b in chunks:
                d = single if single is not None else distances(q, a, b)
                before += count_negatives_before(d, qp, g_pids[a:b], a, positives, num_g)
            parts.append(tile_query_ranks(positives, before))
    return combine(parts, max_rank)
