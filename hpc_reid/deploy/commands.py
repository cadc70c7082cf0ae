"""``hpc-reid index`` and ``hpc-reid search``: their arguments and what each runs."""

from __future__ import annotations

import argparse
import json
import sys

from hpc_reid.cli.common import add_overrides


def cmd_index(args: argparse.Namespace) -> int:
    from hpc_reid.deploy.index import GalleryIndexError, IndexSettings, write_gallery_index

    settings = IndexSettings(
        kind=args.kind,
        nlist=args.nlist,
        m=args.m,
        nbits=args.nbits,
        nprobe=args.nprobe,
        shards=args.shards,
        train_rows=args.train_rows,
        recall_queries=args.recall_queries,
        chunk_rows=args.chunk_rows,
        seed=args.seed,
    )
    try:
        record = write_gallery_index(
            args.features, args.out, settings, args.metric, args.part, log=print
        )
    except GalleryIndexError as exc:
        print(f"hpc-reid: error: {exc}", file=sys.stderr)
        return 2
    size = f"{record['index_bytes'] / 2**20:.1f} MiB"
    print(
        f"wrote {args.out} ({record['kind']}, {record['metric']}, {record['rows']} rows of "
        f"{record['dim']}-d part {record['part']['name']!r}, {size}) with {args.out}.ids.h5 and "
        f"{args.out}.json"
    )
    if "recall" in record:
        shown = ", ".join(f"recall@{k} {v:.4f}" for k, v in record["recall"].items())
        print(f"{shown} against exact search ({record['recall_queries']} gallery rows as queries)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from hpc_reid.deploy.index import GalleryIndexError
    from hpc_reid.deploy.search import SearchError, query_paths, run_search

    config = None
    try:
        if args.config or args.overrides:  # a checkpoint's config, as eval and extract take it
            if args.model.lower().endswith(".onnx"):
                raise SearchError("--config and --set apply to a checkpoint, not an ONNX model")
            from hpc_reid.cli.common import checkpoint_config

            config = checkpoint_config(argparse.Namespace(**vars(args), checkpoint=args.model))
        queries = query_paths(args.image or (), args.query_dir)
        written = run_search(
            args.model,
            args.index,
            queries,
            args.top,
            args.out,
            config,
            nprobe=args.nprobe,
            picture=not args.no_picture,
        )
    except (SearchError, GalleryIndexError) as exc:
        print(f"hpc-reid: error: {exc}", file=sys.stderr)
        return 2
    print(f"searched {len(written)} queries: ranked lists in {args.out}")
    for path in written[:5]:
        top = json.loads(path.read_text())["results"][:1]
        print(f"  {path.name}: " + (f"{top[0]['path']} at {top[0]['distance']:.4f}" if top else ""))
    return 0


def add_index_and_search(commands) -> None:
    """The two commands' parsers, under ``hpc-reid``'s sub-commands."""
    index = commands.add_parser(
        "index",
        help="build a FAISS index of a gallery feature file (from extract)",
        description="Indexes one retrieval part (--part, 'global') of gallery.h5 with its metric: "
        "exact (IndexFlatIP on L2-normalised rows for cosine, IndexFlatL2 for euclidean) or "
        "ivf-pq (IndexIVFPQ trained on a sample, its recall@1/10/100 against exact search "
        "measured on gallery rows as queries and printed). Rows are streamed --chunk-rows at a "
        "time; --shards K adds K contiguous row ranges to K sub-indexes merged into one. Writes "
        "OUT, OUT.ids.h5 (path, pid, camid per row) and OUT.json (settings, recall).",
    )
    index.add_argument("--features", required=True, help="gallery.h5 written by extract")
    index.add_argument("--out", required=True, help="the index file, e.g. gallery.index")
    index.add_argument("--kind", choices=["exact", "ivf-pq"], default="exact")
    index.add_argument(
        "--metric", choices=["cosine", "euclidean"], help="default: the file's metric attribute"
    )
    index.add_argument("--part", default="global", help="retrieval part indexed (global)")
    index.add_argument("--nlist", type=int, help="ivf-pq cells (about 4 sqrt(N), <= N/39)")
    index.add_argument("--m", type=int, help="ivf-pq codes per row (divides D; <= min(64, D/4))")
    index.add_argument("--nbits", type=int, default=8, help="ivf-pq bits per code (8)")
    index.add_argument("--nprobe", type=int, help="ivf-pq cells searched (min(nlist, 32))")
    index.add_argument("--shards", type=int, default=1, help="sub-indexes merged (1)")
    index.add_argument("--train-rows", type=int, help="ivf-pq training sample (50 per cluster)")
    index.add_argument(
        "--recall-queries", type=int, default=1000, help="ivf-pq recall queries (1000)"
    )
    index.add_argument("--chunk-rows", type=int, default=16384, help="rows read at a time")
    index.add_argument("--seed", type=int, default=0, help="training and recall samples")
    index.set_defaults(func=cmd_index)

    search = commands.add_parser(
        "search",
        help="search a gallery index with query images; ranked lists as JSON and PNG",
        description="Embeds each query with --model (an ONNX file from export, or a checkpoint "
        "with the config it stores, or --config; --set overrides either), searches --index and "
        "writes OUT/<query stem>.json (rank, gallery path, pid, camera, distance in the "
        "evaluation's convention) and OUT/<query stem>.png (the query and its top images).",
    )
    search.add_argument("--model", required=True, help="model.onnx, or a checkpoint or run")
    search.add_argument("--index", required=True, help="an index written by hpc-reid index")
    search.add_argument("--image", nargs="+", help="query image files")
    search.add_argument("--query-dir", help="a folder of query images (instead of --image)")
    search.add_argument("--top", type=int, default=20, help="ranked gallery items per query")
    search.add_argument("--out", required=True, help="folder for the JSON and PNG files")
    search.add_argument("--nprobe", type=int, help="ivf-pq: cells searched (default: the build's)")
    search.add_argument("--no-picture", action="store_true", help="the JSON only")
    search.add_argument("--config", help="a checkpoint's config (default: the one it stores)")
    add_overrides(search)
    search.set_defaults(func=cmd_search)
