"""A FAISS index of a gallery feature file (``hpc-reid index``), and opening it to search.

``hpc-reid extract`` writes ``gallery.h5`` (:mod:`hpc_reid.evaluation.feature_files`). This module
indexes one retrieval part of its rows ("global" unless told; the part must rank with the vector
metric, not a part distance such as AlignedReID's DMLI ``local``) under the file's
``evaluation.metric``:

- ``exact`` (the default): ``IndexFlatIP`` on L2-normalised rows for cosine, ``IndexFlatL2`` for
  euclidean. Brute force, so it ranks the gallery as ``evaluate_features`` does from the same rows:
  evaluation's cosine distance is 1 - the inner product of normalised rows, its euclidean distance
  the square root of FAISS's squared L2, both monotone.
- ``ivf-pq``: ``IndexIVFPQ`` (Jegou et al., "Product Quantization for Nearest Neighbor Search",
  TPAMI 2011): ``nlist`` coarse cells, each row stored as ``m`` codes of ``nbits`` bits (its
  residual to its cell's centroid), ``nprobe`` cells visited per query; trained on a random
  sample of the rows. Its recall@k against exact search (k = 1, 10, 100; :func:`recall_at_k`) is
  measured at build time with a random sample of gallery rows as queries, and stored.

Rows are read ``chunk_rows`` at a time, never the whole matrix (the exact index itself holds
N x D x 4 bytes; IVF-PQ holds N x (m x nbits / 8 + 8) bytes). ``shards = K``: the rows in K
contiguous ranges, each added to its own copy of the (trained) empty index and merged in row
order into one (FAISS ``merge_from``; ids stay the row numbers), so the index equals the one-shard
build. In one process that bounds the rows of each add, not the build time (FAISS adds with all
OpenMP threads either way); a shard is the unit a multi-process build would hand out.

Files: ``OUT`` (``faiss.write_index``), ``OUT.ids.h5`` (per row: the gallery image ``paths``,
``pids``, ``camids``) and ``OUT.json`` (the settings, the features file and its attributes, the
recall), each written under a temporary name then renamed, sharing a ``build_id`` that
:func:`open_index` checks with the row counts, so files of two builds are never mixed.

Where FAISS sees GPUs (faiss-gpu, ``faiss.get_num_gpus() > 0``) :func:`open_index` copies the
index to them for search; building stays on the CPU. That path is untested here (faiss-cpu only).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import faiss
import h5py
import numpy as np

from hpc_reid.atomic import temporary_sibling, write_atomic
from hpc_reid.evaluation.feature_files import FORMAT_VERSION as FEATURES_FORMAT
from hpc_reid.evaluation.feature_files import file_layout
from hpc_reid.evaluation.parts import METRIC, PartLayout

__all__ = [
    "INDEX_FORMAT",
    "KINDS",
    "RECALL_KS",
    "FeatureFileRows",
    "GalleryIndex",
    "GalleryIndexError",
    "IndexSettings",
    "build_index",
    "index_files",
    "open_index",
    "recall_at_k",
    "write_gallery_index",
]

INDEX_FORMAT = 1
KINDS = ("exact", "ivf-pq")
METRICS = ("cosine", "euclidean")
RECALL_KS = (1, 10, 100)


class GalleryIndexError(ValueError):
    """Inputs an index cannot be built from, or files that are not one complete gallery index."""


def index_files(path: str | Path) -> tuple[Path, Path, Path]:
    """The index, its id map and its settings: ``OUT``, ``OUT.ids.h5``, ``OUT.json``."""
    path = Path(path)
    return path, path.with_name(path.name + ".ids.h5"), path.with_name(path.name + ".json")


@dataclass(frozen=True)
class IndexSettings:
    """``hpc-reid index``'s options. None: chosen from the gallery's size by :meth:`resolved`
    (nlist about 4 sqrt(N), at most N / 39 so that each cell gets FAISS's minimum of 39 training
    rows; m the largest divisor of D up to min(64, D / 4), so that sub-vectors have 4 columns or
    more; nprobe min(nlist, 32); 50 training rows per cluster of the larger k-means, nlist or
    2^nbits clusters)."""

    kind: str = "exact"
    nlist: int | None = None
    m: int | None = None
    nbits: int = 8
    nprobe: int | None = None
    shards: int = 1
    train_rows: int | None = None
    recall_queries: int = 1000
    chunk_rows: int = 16384
    seed: int = 0

    def resolved(self, rows: int, dim: int) -> IndexSettings:
        """These settings with every default filled in for ``rows`` rows of ``dim`` columns, and
        checked (errors name the option and what it must be)."""
        if self.kind not in KINDS:
            raise GalleryIndexError(f"--kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        for name in ("shards", "chunk_rows"):
            if getattr(self, name) < 1:
                raise GalleryIndexError(f"--{name.replace('_', '-')} {getattr(self, name)}: >= 1")
        if self.shards > rows:
            raise GalleryIndexError(f"--shards {self.shards} for a gallery of {rows} rows")
        if self.kind == "exact":
            unused = dict(nlist=None, m=None, nbits=None, nprobe=None, train_rows=None)
            return replace(self, **unused, recall_queries=None, seed=None)
        nlist = self.nlist or max(1, min(round(4 * math.sqrt(rows)), rows // 39))
        m = self.m or max(k for k in range(1, min(64, max(1, dim // 4)) + 1) if dim % k == 0)
        if dim % m:
            raise GalleryIndexError(f"--m {m} must divide the feature dimension {dim}")
        if not 1 <= self.nbits <= 16:
            raise GalleryIndexError(f"--nbits {self.nbits}: expected 1..16")
        nprobe = self.nprobe or min(nlist, 32)
        if not 1 <= nprobe <= nlist:
            raise GalleryIndexError(f"--nprobe {nprobe}: expected 1..nlist ({nlist})")
        need = max(nlist, 2**self.nbits)
        train_rows = self.train_rows or min(rows, 50 * need)
        if not need <= train_rows <= rows:
            raise GalleryIndexError(
                f"ivf-pq on {rows} rows with --nlist {nlist} and --nbits {self.nbits}: training "
                f"needs {need}..{rows} rows (k-means of max(nlist, 2^nbits) clusters), got "
                f"{train_rows}; lower --nlist or --nbits, or use --kind exact"
            )
        if self.recall_queries < 0:
            raise GalleryIndexError(f"--recall-queries {self.recall_queries}: expected >= 0")
        return replace(self, nlist=nlist, m=m, nprobe=nprobe, train_rows=train_rows)


class RowSource(Protocol):
    """Rows to index, read by range: a feature file's part (:class:`FeatureFileRows`) or the
    speed benchmark's random rows."""

    num_rows: int
    dim: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as (stop - start, dim) float32."""
        ...


class FeatureFileRows:
    """One retrieval part of a feature file's rows, read by range; use as a context manager.

    The part must rank with the vector metric (distance "metric"); a part ranked by a part
    distance (AlignedReID's "dmli") is refused, naming it."""

    def __init__(self, path: str | Path, part: str = "global") -> None:
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise GalleryIndexError(f"cannot open feature file {self.path}: {exc}") from None
        try:
            missing = [k for k in ("features", "pids", "camids", "paths") if k not in self.file]
            version = self.file.attrs.get("format_version")
            if missing or version != FEATURES_FORMAT:
                raise GalleryIndexError(
                    f"{self.path} is not a feature file of format {FEATURES_FORMAT} "
                    f"(format_version {version}, missing datasets {missing}); write it with "
                    "`hpc-reid extract`"
                )
            self.num_rows = len(self.file["pids"])
            if self.num_rows == 0:
                raise GalleryIndexError(f"feature file {self.path} holds no rows: nothing to index")
            self.part = _vector_part(file_layout(self.file, self.path), part, self.path)
            self.dim = self.part.width
            self.metric = str(self.file.attrs.get("metric", "cosine"))
        except BaseException:
            self.file.close()
            raise

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.file["features"][start:stop, self.part.start : self.part.stop])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> FeatureFileRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _vector_part(layout, name: str, path: Path) -> PartLayout:
    listing = "; ".join(f"{p.name} (distance {p.distance})" for p in layout.parts)
    vector = [p.name for p in layout.parts if p.distance == METRIC]
    hint = (
        f"index one of {vector} with --part"
        if vector
        else "none of its parts ranks with a vector metric a FAISS index computes"
    )
    if name not in layout.names:
        raise GalleryIndexError(
            f"{path}: no retrieval part {name!r}; its rows hold {listing}: {hint}"
        )
    part = layout.part(name)
    if part.distance != METRIC:
        raise GalleryIndexError(
            f"{path}: retrieval part {name!r} ranks with the part distance {part.distance!r}, "
            f"not a vector metric a FAISS index computes ({listing}): {hint}"
        )
    return part


def _faiss_metric(metric: str) -> int:
    if metric not in METRICS:
        raise GalleryIndexError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def prepared(rows: np.ndarray, metric: str) -> np.ndarray:
    """Rows as FAISS takes them: a C-contiguous float32 copy, L2-normalised for cosine (as
    :func:`~hpc_reid.evaluation.distances.pairwise_distance` normalises; a zero row stays
    zero)."""
    x = np.array(rows, dtype=np.float32, order="C", copy=True)
    if metric == "cosine":
        faiss.normalize_L2(x)
    return x


def to_distance(scores: np.ndarray, metric: str) -> np.ndarray:
    """FAISS scores in the evaluation's convention: 1 - cos for cosine (inner products of
    normalised rows), ||q - g|| for euclidean (FAISS gives its square)."""
    if metric == "cosine":
        return (1.0 - scores).astype(np.float32)
    return np.sqrt(np.maximum(scores, 0.0)).astype(np.float32)


def _empty_index(s: IndexSettings, dim: int, metric: str) -> faiss.Index:
    fm = _faiss_metric(metric)
    if s.kind == "exact":
        return (
            faiss.IndexFlatIP(dim) if fm == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(dim)
        )
    quantizer = faiss.IndexFlat(dim, fm)
    index = faiss.IndexIVFPQ(quantizer, dim, s.nlist, s.m, s.nbits, fm)  # keeps a reference
    index.nprobe = s.nprobe
    return index


def _gather(source: RowSource, wanted: list[np.ndarray], chunk: int) -> list[np.ndarray]:
    """The rows at each sorted index array of ``wanted``, in one pass over the source."""
    out = [np.empty((len(w), source.dim), np.float32) for w in wanted]
    for start in range(0, source.num_rows, chunk):
        stop = min(start + chunk, source.num_rows)
        spans = [(np.searchsorted(w, start), np.searchsorted(w, stop)) for w in wanted]
        if all(a == b for a, b in spans):
            continue
        rows = source.read(start, stop)
        for w, o, (a, b) in zip(wanted, out, spans, strict=True):
            o[a:b] = rows[w[a:b] - start]
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of |approximate top-k  intersect  exact top-k| / k (the intersection
    recall of the ANN benchmarks); a tie at the k-th exact distance (duplicate rows) can count
    against the approximate list."""
    if approx.shape[1] < k or exact.shape[1] < k:
        raise ValueError(f"recall@{k} of lists of {approx.shape[1]} and {exact.shape[1]} items")
    hits = [np.isin(a[:k], e[:k][e[:k] >= 0]).sum() for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k)


def build_index(
    source: RowSource, metric: str, settings: IndexSettings, log=None
) -> tuple[faiss.Index, dict[str, Any]]:
    """The index of every row of ``source`` (module docstring) and what to record of its build:
    the resolved settings, metric, rows, dim, seconds per phase and, for ivf-pq, ``recall``
    {k: recall@k} over ``recall_queries`` random rows as queries. ``log(text)``: progress."""
    n, dim = source.num_rows, source.dim
    s = settings.resolved(n, dim)
    fm = _faiss_metric(metric)
    rng = np.random.default_rng(s.seed)
    template = _empty_index(s, dim, metric)
    seconds: dict[str, float] = {}
    queries = np.empty((0, dim), np.float32)
    if s.kind == "ivf-pq":
        t0 = time.perf_counter()
        train_at = np.sort(rng.choice(n, s.train_rows, replace=False))
        query_at = np.sort(rng.choice(n, min(s.recall_queries, n), replace=False))
        sample, queries = _gather(source, [train_at, query_at], s.chunk_rows)
        template.train(prepared(sample, metric))
        del sample
        queries = prepared(queries, metric)
        seconds["train"] = time.perf_counter() - t0
        if log:
            log(
                f"trained ivf-pq (nlist {s.nlist}, m {s.m}, nbits {s.nbits}) on {s.train_rows} rows"
            )
    depth = min(max(RECALL_KS), n)
    exact = faiss.ResultHeap(len(queries), depth, keep_max=fm == faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index = None
    bounds = np.linspace(0, n, s.shards + 1).round().astype(int)
    for a, b in itertools.pairwise(bounds.tolist()):
        shard = faiss.clone_index(template)
        for start in range(a, b, s.chunk_rows):
            rows = prepared(source.read(start, min(start + s.chunk_rows, b)), metric)
            shard.add(rows)
            if len(queries):  # exact neighbours of the recall queries, merged chunk by chunk
                d, i = faiss.knn(queries, rows, min(depth, len(rows)), metric=fm)
                exact.add_result(d, i + start)
        if index is None:
            index = shard
        else:  # a flat index's ids are its row order; IVF lists store ids, shifted by the start
            index.merge_from(shard, 0 if s.kind == "exact" else int(a))
        if log and s.shards > 1:
            log(f"shard rows {a}..{b - 1} added")
    seconds["add"] = time.perf_counter() - t0
    info: dict[str, Any] = {
        **{k: v for k, v in asdict(s).items() if v is not None},
        "metric": metric,
        "rows": n,
        "dim": dim,
    }
    if len(queries):
        t0 = time.perf_counter()
        exact.finalize()
        _, approx = index.search(queries, depth)
        info["recall"] = {str(k): recall_at_k(approx, exact.I, k) for k in RECALL_KS if k <= n}
        info["recall_queries"] = len(queries)
        seconds["recall"] = time.perf_counter() - t0
    info["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    info["index_bytes"] = stored_bytes(index)
    return index, info


def stored_bytes(index: faiss.Index) -> int:
    """The bytes an index holds: N x D x 4 for exact (counted, not serialised: that would copy
    it); the serialised size of IVF-PQ (codes and ids, coarse centroids, codebooks)."""
    if isinstance(index, faiss.IndexFlat):
        return int(index.ntotal) * int(index.code_size)
    return int(faiss.serialize_index(index).nbytes)


def write_gallery_index(
    features: str | Path,
    out: str | Path,
    settings: IndexSettings | None = None,
    metric: str | None = None,
    part: str = "global",
    log=None,
) -> dict[str, Any]:
    """Build the index of ``features``' ``part`` and write ``out``, its id map and its settings
    (:func:`index_files`); ``metric`` defaults to the file's. Returns the settings written."""
    settings = settings or IndexSettings()
    index_path, ids_path, json_path = index_files(out)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    with FeatureFileRows(features, part) as rows:
        metric = metric or rows.metric
        index, info = build_index(rows, metric, settings, log)
        attrs = {
            k: (v.item() if isinstance(v, np.generic) else v)
            for k, v in rows.file.attrs.items()
            if k in ("model", "checkpoint", "config", "split", "records", "metric", "distance")
        }
        build_id = uuid.uuid4().hex
        temporary = [temporary_sibling(ids_path)]
        try:
            temporary.append(temporary_sibling(index_path))
            tmp_ids, tmp_index = temporary
            _write_ids(rows.file, tmp_ids, build_id, settings.chunk_rows)
            faiss.write_index(index, str(tmp_index))
            os.replace(tmp_ids, ids_path)
            os.replace(tmp_index, index_path)
        except BaseException:
            for tmp in temporary:
                tmp.unlink(missing_ok=True)
            raise
    record = {
        "format_version": INDEX_FORMAT,
        "build_id": build_id,
        **info,
        "part": {
            "name": rows.part.name,
            "key": rows.part.key,
            "columns": [rows.part.start, rows.part.stop],
        },
        "features": str(Path(features).resolve()),
        "features_attrs": attrs,
        "faiss_version": faiss.__version__,
    }
    write_atomic(json_path, json.dumps(record, indent=2) + "\n")
    return record


def _write_ids(f: h5py.File, path: Path, build_id: str, chunk: int) -> None:
    n = len(f["pids"])
    with h5py.File(path, "w") as out:
        out.create_dataset("pids", shape=(n,), dtype=np.int64)
        out.create_dataset("camids", shape=(n,), dtype=np.int64)
        out.create_dataset("paths", shape=(n,), dtype=h5py.string_dtype("utf-8"))
        out.attrs["build_id"] = build_id
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            for key in ("pids", "camids", "paths"):
                out[key][start:stop] = f[key][start:stop]


@dataclass
class GalleryIndex:
    """An opened index (:func:`open_index`): the FAISS index, its recorded settings and id map."""

    path: Path
    index: faiss.Index
    settings: dict[str, Any]
    ids_path: Path

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def metric(self) -> str:
        return str(self.settings["metric"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest gallery rows of each query row (nq, dim), nearest first: distances in
        the evaluation's convention (:func:`to_distance`) and row numbers, (nq, min(k, rows))."""
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            part = self.settings.get("part", {}).get("name", "global")
            raise GalleryIndexError(
                f"query features of shape {tuple(queries.shape)}; the index {self.path} holds "
                f"{self.dim}-d rows (part {part!r} of {self.settings.get('features')}): the model "
                "must be the one whose gallery features were indexed"
            )
        if k < 1:
            raise GalleryIndexError(f"--top {k}: expected >= 1")
        scores, rows = self.index.search(prepared(queries, self.metric), min(k, self.index.ntotal))
        return to_distance(scores, self.metric), rows

    def labels(self, rows: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Gallery paths, pids and camids of index rows ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        unique, back = np.unique(rows, return_inverse=True)
        if not len(unique):
            return [], np.zeros(0, np.int64), np.zeros(0, np.int64)
        with h5py.File(self.ids_path, "r") as f:
            paths, pids, camids = (f[k][unique] for k in ("paths", "pids", "camids"))
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in paths]
        return [paths[i] for i in back], pids[back], camids[back]


def open_index(path: str | Path, nprobe: int | None = None) -> GalleryIndex:
    """The index at ``path`` with its id map and settings, checked to be one complete, non-empty
    build (errors name the missing or mismatched file); ``nprobe`` overrides the recorded one
    (ivf-pq). On faiss-gpu with GPUs the index is copied to them (untested here)."""
    index_path, ids_path, json_path = index_files(path)
    for p, what in (
        (index_path, "index"),
        (ids_path, "id map"),
        (json_path, "settings"),
    ):
        if not p.is_file():
            raise GalleryIndexError(
                f"missing {what} file {p}: `hpc-reid index --out {index_path}` writes the index "
                f"with its id map {ids_path.name} (gallery path, pid, camid per row) and its "
                f"settings {json_path.name} beside it"
            )
    try:
        settings = json.loads(json_path.read_text())
    except ValueError as exc:
        raise GalleryIndexError(f"{json_path} is not JSON: {exc}") from None
    if settings.get("format_version") != INDEX_FORMAT:
        raise GalleryIndexError(
            f"{json_path}: format_version {settings.get('format_version')}, expected "
            f"{INDEX_FORMAT}; rebuild with `hpc-reid index`"
        )
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise GalleryIndexError(f"{index_path} is not a FAISS index: {exc}") from None
    with h5py.File(ids_path, "r") as f:
        id_rows, build_id = len(f["pids"]), f.attrs.get("build_id")
    if build_id != settings.get("build_id") or not index.ntotal == id_rows == settings["rows"]:
        raise GalleryIndexError(
            f"{index_path} ({index.ntotal} rows), {ids_path} ({id_rows} rows, build {build_id}) "
            f"and {json_path} ({settings['rows']} rows, build {settings.get('build_id')}) are "
            "not one build; rebuild with `hpc-reid index`"
        )
    if index.ntotal == 0:
        raise GalleryIndexError(f"the index {index_path} is empty: no gallery row to search")
    if nprobe is not None:
        if not hasattr(index, "nprobe"):
            raise GalleryIndexError(f"--nprobe {nprobe}: {index_path} is an exact index")
        index.nprobe = nprobe
    elif "nprobe" in settings:
        index.nprobe = settings["nprobe"]
    if faiss.get_num_gpus() > 0:  # faiss-gpu: search on every GPU (untested here)
        index = faiss.index_cpu_to_all_gpus(index)
    return GalleryIndex(index_path, index, settings, ids_path)
