"""Gallery search at scale: exact and IVF-PQ FAISS search latency per query and index memory.

The gallery is ``--rows`` x ``--dim`` float32 rows made block by block as they are indexed (never
held whole outside the index; :func:`hpc_reid.deploy.index.build_index`, the code ``hpc-reid
index`` runs): identities as clusters (a low-rank identity signal and isotropic noise, 10 images
an identity on average), ``--features gaussian`` for plain Gaussians. Cosine metric (rows
L2-normalised, inner product), the ReID default.

Cases, one process:
- exact (``IndexFlatIP``) at ``--exact-rows``, the baseline;
- IVF-PQ at ``--exact-rows``, the ratio against exact measured in the same run;
- IVF-PQ at ``--rows``, with its recall@1/10/100 against exact search (``--recall-queries``
  gallery rows as queries, measured by the build);
- exact at ``--rows`` extrapolated when ``--exact-rows`` is smaller: memory exactly (N x D x 4
  bytes), latency scaled by rows (brute force reads every row).

Latency: ``--queries`` queries (new rows from the same generator) searched one call each (online
serving; the median) and in one batched call (per query). Memory: the index's serialized size
(what it holds) and the growth of the process's peak RSS while building. Top ``--top`` each.

    python bench/search_speed.py                                  # 100,000 x 2048
    python bench/search_speed.py --rows 1000000 --exact-rows 250000 --nlist 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from hpc_reid.bench.machine import cpu_model
from hpc_reid.deploy.index import IndexSettings, build_index, prepared, to_distance

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BLOCK = 4096  # rows made from one seed: any range reads the same rows whatever the chunking


class SyntheticRows:
    """``num_rows`` x ``dim`` float32 rows, made on demand block by block (a row source for
    :func:`~hpc_reid.deploy.index.build_index`): row i belongs to identity ``i mod ids``."""

    def __init__(
        self, num_rows: int, dim: int, seed: int = 0, features: str = "clustered", rank: int = 64
    ):
        self.num_rows, self.dim, self.seed, self.features = num_rows, dim, seed, features
        rng = np.random.default_rng([seed, 1 << 40])
        self.ids = max(1, num_rows // 10)
        self.rank = min(rank, dim)
        self.centres = rng.standard_normal((self.ids, self.rank)).astype(np.float32)
        basis = rng.standard_normal((self.rank, dim)) / np.sqrt(self.rank)
        self.basis = basis.astype(np.float32)

    def _block(self, b: int, rows: int | None = None, stream: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, b])
        start = b * BLOCK
        n = rows if rows is not None else min(BLOCK, self.num_rows - start)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32)
        if self.features == "gaussian":
            return noise
        pids = (start + np.arange(n)) % self.ids
        latent = self.centres[pids] + 0.3 * rng.standard_normal((n, self.rank), dtype=np.float32)
        return latent @ self.basis + 0.5 * noise

    def read(self, start: int, stop: int) -> np.ndarray:
        first, last = start // BLOCK, (stop - 1) // BLOCK
        rows = np.concatenate([self._block(b) for b in range(first, last + 1)])
        return rows[start - first * BLOCK : stop - first * BLOCK]

    def queries(self, n: int) -> np.ndarray:
        """``n`` new rows of the same identities (another random stream)."""
        return self._block(0, rows=n, stream=1)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1]) * 1024


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS (Linux >= 4.0)
    return _rss("VmRSS")


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def measure(source: SyntheticRows, settings: IndexSettings, queries: np.ndarray, top: int) -> dict:
    """Build the index of ``source`` and time its search: one case's row."""
    base = _reset_peak()
    t0 = time.perf_counter()
    index, info = build_index(source, "cosine", settings, log=_progress)
    build_s = time.perf_counter() - t0
    _progress(f"{settings.kind} of {source.num_rows} rows built in {build_s:.1f} s: {info}")
    peak = _rss("VmHWM") - base
    q = prepared(queries, "cosine")
    k = min(top, source.num_rows)
    index.search(q[:1], k)  # warm-up: page in, thread pool up
    single = []
    for row in q:
        t = time.perf_counter()
        index.search(row[None], k)
        single.append(time.perf_counter() - t)
    t = time.perf_counter()
    scores, _ = index.search(q, k)
    batched = (time.perf_counter() - t) / len(q)
    return {
        "kind": settings.kind,
        "rows": source.num_rows,
        "dim": source.dim,
        "ms_per_query_single": 1e3 * float(np.median(single)),
        "ms_per_query_batched": 1e3 * batched,
        "index_bytes": info["index_bytes"],
        "build_peak_rss_bytes": peak,
        "build_s": build_s,
        "recall": info.get("recall"),
        "nearest_distance_mean": float(to_distance(scores[:, 0], "cosine").mean()),
        "settings": {k: v for k, v in info.items() if k not in ("recall", "seconds")},
        "extrapolated": False,
    }


def run(args: argparse.Namespace) -> list[dict]:
    """The cases of the module docstring, in order."""
    exact_rows = min(args.exact_rows, args.rows)
    ivf = dict(
        nlist=args.nlist,
        m=args.m,
        nbits=args.nbits,
        nprobe=args.nprobe,
        train_rows=args.train_rows,
        recall_queries=args.recall_queries,
        seed=args.seed,
    )
    small = SyntheticRows(exact_rows, args.dim, args.seed, args.features)
    queries = small.queries(args.queries)
    chunk = dict(chunk_rows=args.chunk_rows)
    rows = [measure(small, IndexSettings("exact", **chunk), queries, args.top)]
    rows.append(measure(small, IndexSettings("ivf-pq", **chunk, **ivf), queries, args.top))
    if args.rows > exact_rows:
        large = SyntheticRows(args.rows, args.dim, args.seed, args.features)
        queries = large.queries(args.queries)
        rows.append(measure(large, IndexSettings("ivf-pq", **chunk, **ivf), queries, args.top))
        scale = args.rows / exact_rows
        exact = rows[0]
        rows.append(
            {
                **exact,
                "rows": args.rows,
                "ms_per_query_single": exact["ms_per_query_single"] * scale,
                "ms_per_query_batched": exact["ms_per_query_batched"] * scale,
                "index_bytes": args.rows * args.dim * 4,
                "build_peak_rss_bytes": None,
                "build_s": None,
                "nearest_distance_mean": None,
                "extrapolated": True,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown rows; latency against the exact index of the same size (extrapolated or not)."""
    lines = [
        "| index | rows x dim | ms/query, single | ms/query, batched | vs exact (batched) "
        "| index MiB | build s | recall@1/10/100 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    exact = {r["rows"]: r["ms_per_query_batched"] for r in rows if r["kind"] == "exact"}
    for r in rows:
        name = r["kind"] + (" (extrapolated)" if r["extrapolated"] else "")
        if r["kind"] == "ivf-pq":
            s = r["settings"]
            name += f" nlist {s['nlist']} m {s['m']} nbits {s['nbits']} nprobe {s['nprobe']}"
        ratio = exact.get(r["rows"])
        if r["kind"] == "exact":
            ratio = "baseline"
        else:
            ratio = f"{ratio / r['ms_per_query_batched']:.1f}x faster" if ratio else "-"
        recall = "/".join(f"{v:.3f}" for v in r["recall"].values()) if r["recall"] else "-"
        build = f"{r['build_s']:.1f}" if r["build_s"] is not None else "-"
        lines.append(
            f"| {name} | {r['rows']:,} x {r['dim']} | {r['ms_per_query_single']:.2f} "
            f"| {r['ms_per_query_batched']:.3f} | {ratio} | {r['index_bytes'] / 2**20:,.1f} "
            f"| {build} | {recall} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="gallery rows (100,000)")
    parser.add_argument("--exact-rows", type=int, default=100_000, help="exact index rows")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--features", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--nlist", type=int, help="default: hpc-reid index's (4 sqrt(N))")
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--nbits", type=int, default=8)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--train-rows", type=int, help="default: 50 per cluster")
    parser.add_argument("--recall-queries", type=int, default=100)
    parser.add_argument("--queries", type=int, default=100, help="timed queries")
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    rows = run(args)
    out = table(rows)
    threads = faiss.omp_get_max_threads()
    notes = (
        f"{args.features} features, cosine, top {args.top}, {args.queries} timed queries; "
        f"faiss {faiss.__version__}, {threads} OpenMP threads; 1-min load average at start: "
        f"{load:.2f}; extrapolated exact rows: memory N x D x 4 bytes, latency x rows"
    )
    print(out)
    print(notes)
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.record:
        command = shlex.join(
            ["python", "bench/search_speed.py", *(sys.argv[1:] if argv is None else argv)]
        )
        machine = f"{os.cpu_count()}-core CPU ({cpu_model()})"
        stamp = datetime.date.today().isoformat()
        with open(RESULTS, "a") as f:
            f.write(f"\n## search_speed, {stamp}, {machine}\n\n`{command}`\n\n{out}\n\n{notes}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
