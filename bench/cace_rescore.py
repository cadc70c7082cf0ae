"""What CACE-Net's conditional re-scoring costs (issue 19, ``evaluation.rescore_k``): seconds per
query of re-scoring each query's top-K with the pair module, against the single-image evaluation
of the same model in the same process.

The baseline is ``evaluate_model`` with ``rescore_k`` 0 (extraction of query and gallery, flip as
configured, ranking): the released inference. Each K is then the trainer's own re-scorer
(``model.head.rescore_ranking``) on those features, timed alone: reading the query's and the
candidates' images, their backbone maps (``evaluation.rescore_batch`` at a time), the pair graph
and head on every (query, candidate) pair, and the exact metrics of the re-scored list. One
process. Weights are the model's initial ones (random without model.pretrained): timing only.
``--queries`` re-scores the first N queries only (the per-query cost does not depend on N, bar
candidates shared within a block of queries).

    python bench/cace_rescore.py --config configs/synthetic/cace.yaml
    python bench/cace_rescore.py --config configs/synthetic/cace.yaml --k 10 50 --queries 100
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from hpc_reid.bench.machine import cpu_model
from hpc_reid.cli import add_overrides
from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_on_ranks
from hpc_reid.engine.evaluate import evaluate_model, evaluation_distance, shard_features
from hpc_reid.models import build_model


def with_k(config, k: int):
    """``config`` with ``evaluation.rescore_k`` = ``k``."""
    return config.model_copy(
        update={"evaluation": config.evaluation.model_copy(update={"rescore_k": k})}
    )


def measure(config, ks: list[int], queries: int | None) -> dict:
    device = torch.device("cpu")
    dataset = dataset_on_ranks(config.data, True)
    if queries is not None:
        dataset = copy.copy(dataset)
        dataset.query = dataset.query[:queries]
    torch.manual_seed(config.engine.seed)
    model = build_model(config.model, dataset.num_train_pids).eval()
    if not callable(getattr(model.head, "rescore_ranking", None)):
        raise SystemExit(f"{config.name}: model.head {config.model.head!r} does not re-score")
    plain_cfg = with_k(config, 0)
    tic = time.perf_counter()
    plain = evaluate_model(model, dataset, plain_cfg, device)
    single_s = time.perf_counter() - tic
    qf = shard_features(model, dataset.query, config, device)
    gf = shard_features(model, dataset.gallery, config, device)
    distance = evaluation_distance(model, config, device)
    rows = []
    for k in ks:
        cfg = with_k(config, k)
        tic = time.perf_counter()
        result = model.head.rescore_ranking(model, dataset, cfg, qf, gf, distance, device)
        rescore_s = time.perf_counter() - tic
        rows.append(
            {
                "k": k,
                "rescore_s": round(rescore_s, 2),
                "s_per_query": round(rescore_s / len(dataset.query), 4),
                "ms_per_pair": round(1000 * rescore_s / (len(dataset.query) * k), 3),
                "evaluation_s": round(single_s + rescore_s, 2),
                "vs_single": round((single_s + rescore_s) / single_s, 2),
                "rank-1": round(result.summary()["rank-1"], 4),
            }
        )
    return {
        "config": config.name,
        "backbone": config.model.backbone,
        "input": f"{config.data.height}x{config.data.width}",
        "queries": len(dataset.query),
        "gallery": len(dataset.gallery),
        "flip_average": config.evaluation.flip_average,
        "rescore_batch": config.evaluation.rescore_batch,
        "single_image_s": round(single_s, 2),
        "single_image_rank-1": round(plain["rank-1"], 4),
        "rows": rows,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    add_overrides(p, "config override")
    p.add_argument("--k", type=int, nargs="+", default=[10, 50], help="top-K values to time")
    p.add_argument("--queries", type=int, help="re-score the first N queries (default: all)")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    config = load_config(args.config, args.overrides)
    out = measure(config, args.k, args.queries)
    print(
        f"{out['config']} ({out['backbone']} {out['input']}, {out['threads']} threads, "
        f"{out['queries']} queries x {out['gallery']} gallery, flip {out['flip_average']}, "
        f"batch {out['rescore_batch']}): single-image evaluation {out['single_image_s']} s"
    )
    print(f"{'K':>4} {'rescore s':>10} {'s/query':>8} {'ms/pair':>8} {'eval s':>8} {'x single':>9}")
    for r in out["rows"]:
        print(
            f"{r['k']:>4} {r['rescore_s']:>10} {r['s_per_query']:>8} {r['ms_per_pair']:>8} "
            f"{r['evaluation_s']:>8} {r['vs_single']:>9}"
        )
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
