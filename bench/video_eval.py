"""What evaluating a video set costs (issue 20): ranking MARS-size tracklet features, and extracting
tracklet features from dense clips.

Sections (both by default):

- ``ranking``: MARS-size random tracklet features, 1,980 query x 9,330 gallery x 2,048-d float32
  (``--scale`` shrinks Q and G, ``--dim`` the width), with MARS's layout: 625 test identities,
  each seen by 2-6 of 6 cameras, one query per (identity, camera) and at least one gallery
  tracklet in each of its cameras (so every query has a cross-camera positive), the rest of the
  gallery spread at random over them, ``--distractors`` pid-0 tracklets among them (default 0:
  our notes do not give MARS's count). A feature is its identity's centre plus noise 4x its scale,
  so the ranking is far from trivial. Timed: ``evaluate_features`` (the evaluation's own tiled
  ranking, cross-camera: same pid and camera left out; ``--backend``) against the references' way
  in the same run: the whole Q x G distance matrix, then torchreid's full-argsort evaluation
  (``eval_bench.argsort_eval``); both from features to CMC, mAP, mINP, which must agree (but
  for the order of tied float32 distances, which argsort leaves arbitrary).
- ``extraction``: the dense-clip extraction of a video config's test tracklets
  (``shard_features``: decode, model on each clip of T frames, flip as configured, the mean per
  tracklet) in clips/s and frames/s, against the same frames read and run as images through the
  image evaluation (the same backbone with the ``bnneck`` head), in the same process: the cost of
  the clip path beyond the frames it holds. Weights are the initial ones: timing only.

    python bench/video_eval.py                                   # both, MARS size, all cores
    python bench/video_eval.py --section ranking --threads 2
    python bench/video_eval.py --section extraction --config configs/synthetic/video.yaml \\
        --tracklets 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from eval_bench import argsort_eval  # bench/eval_bench.py: torchreid's full-argsort evaluation

from hpc_reid.cli import add_overrides
from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_on_ranks
from hpc_reid.data.loaders import resolve_backend
from hpc_reid.data.loaders.tracklets import clip_frames
from hpc_reid.engine.evaluate import shard_features
from hpc_reid.evaluation.distances import evaluate_features, pairwise_distance
from hpc_reid.models import build_model

REPO = Path(__file__).resolve().parents[1]
MARS = {"queries": 1980, "gallery": 9330, "ids": 625, "cams": 6}
MAX_RANK = 50
QUERY_TILE = 1024  # evaluate_features' default
TIES = 1e-4  # how far tie order may move mAP and mINP (a tie of a positive with a negative)


def mars_layout(
    rng: np.random.Generator,
    num_q: int,
    num_g: int,
    num_ids: int,
    num_cams: int,
    distractors: int = 0,
):
    """(q_pids, g_pids, q_cams, g_cams) with MARS's structure (module docstring): ids 1..num_ids,
    each in 2..num_cams cameras, one query per (id, camera), num_q of them in all."""
    if not 2 * num_ids <= num_q <= num_cams * num_ids or num_g < num_q + distractors:
        raise ValueError(
            f"{num_q} queries cannot be one per (identity, camera) of {num_ids} identities in 2-"
            f"{num_cams} cameras, or {num_g} gallery tracklets cannot hold one per query's pair "
            f"plus {distractors} distractors"
        )
    per_id = np.full(num_ids, 2)
    while per_id.sum() < num_q:  # one more camera for random identities until num_q pairs
        free = np.flatnonzero(per_id < num_cams)
        per_id[rng.choice(free, min(len(free), num_q - per_id.sum()), replace=False)] += 1
    pairs = np.array(
        [(pid, cam) for pid, n in enumerate(per_id, 1) for cam in rng.permutation(num_cams)[:n]]
    )
    rest = pairs[rng.integers(0, len(pairs), num_g - len(pairs) - distractors)]
    noise = np.stack([np.zeros(distractors, np.int64), rng.integers(0, num_cams, distractors)], 1)
    gallery = rng.permutation(np.concatenate([pairs, rest, noise]))
    return pairs[:, 0], gallery[:, 0], pairs[:, 1], gallery[:, 1]


def tracklet_features(
    rng: np.random.Generator, pids: np.ndarray, dim: int, centres
) -> torch.Tensor:
    """Each row its identity's centre plus N(0, 4^2) noise (pid 0, the distractors: around centre
    0, one cluster of their own)."""
    rows = centres[pids] + 4 * rng.standard_normal((len(pids), dim), dtype=np.float32)
    return torch.from_numpy(rows)


def best_of(repeats: int, fn, *args, **kwargs):
    """(fn's result, its best wall seconds over ``repeats`` calls)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - tic)
    return out, best


def argsort_evaluation(qf, gf, q_pids, g_pids, q_cams, g_cams):
    """The references' evaluation: the whole Q x G distance matrix, then every row argsorted."""
    # the same tiles as evaluate_features: the same float32 distances, bit for bit
    distmat = pairwise_distance(qf, gf, "cosine", tile=QUERY_TILE).numpy()
    return argsort_eval(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK)


def ranking(scale: float, dim: int, distractors: int, backend: str, seed: int, repeats: int):
    rng = np.random.default_rng(seed)
    num_q, num_g = round(MARS["queries"] * scale), round(MARS["gallery"] * scale)
    num_ids = max(2, round(MARS["ids"] * scale))
    ids = mars_layout(rng, num_q, num_g, num_ids, MARS["cams"], distractors)
    centres = rng.standard_normal((num_ids + 1, dim), dtype=np.float32)
    qf = tracklet_features(rng, ids[0], dim, centres)
    gf = tracklet_features(rng, ids[1], dim, centres)
    _, distances_s = best_of(repeats, pairwise_distance, qf, gf, "cosine", tile=QUERY_TILE)
    ours, ours_s = best_of(
        repeats,
        evaluate_features,
        qf,
        gf,
        *ids,
        metric="cosine",
        max_rank=MAX_RANK,
        query_tile=QUERY_TILE,
        backend=backend,
    )
    (cmc, mAP, mINP, _), base_s = best_of(repeats, argsort_evaluation, qf, gf, *ids)
    # equal but for the order of tied distances: float32 cosine distances of 9,330 tracklets tie
    # in every row (near 1, 1.2e-7 apart); argsort's quicksort orders ties arbitrarily, the
    # evaluation by gallery index. A tie of a positive and a negative moves a query's AP a little
    # and its CMC by one step: allow a few queries' worth.
    agree = abs(ours.mAP - mAP) < TIES and abs(ours.mINP - mINP) < TIES
    if not (agree and np.allclose(ours.cmc, cmc, rtol=0, atol=3 / num_q + 1e-12)):
        raise RuntimeError(
            f"the evaluation and the argsort reference disagree: mAP {ours.mAP} vs {mAP}, mINP "
            f"{ours.mINP} vs {mINP}, rank-1 {ours.cmc[0]} vs {cmc[0]}"
        )
    return {
        "queries": num_q,
        "gallery": num_g,
        "dim": dim,
        "ids": num_ids,
        "cameras": MARS["cams"],
        "distractors": distractors,
        "backend": backend,
        "distances_s": round(distances_s, 6),  # to the microsecond: a tiny run's ratios check
        "evaluate_s": round(ours_s, 6),
        "argsort_s": round(base_s, 6),
        "speedup": round(base_s / ours_s, 3),
        "mAP": round(ours.mAP, 4),
        "rank-1": round(float(ours.cmc[0]), 4),
        "mINP": round(ours.mINP, 4),
    }


def extraction(config, tracklets: int | None, repeats: int) -> dict:
    device = torch.device("cpu")
    dataset = dataset_on_ranks(config.data, True)
    if not dataset.is_video:
        raise SystemExit(
            f"{config.name}: data set {config.data.dataset!r} holds images, not tracklets"
        )
    records = dataset.gallery[:tracklets] if tracklets else dataset.gallery
    frames, owners = clip_frames(records, config.data.video)
    torch.manual_seed(config.engine.seed)
    clip_model = build_model(config.model, dataset.num_train_pids).eval()
    image_cfg = config.model_copy(
        update={"model": config.model.model_copy(update={"head": "bnneck"})}
    )
    torch.manual_seed(config.engine.seed)
    image_model = build_model(image_cfg.model, dataset.num_train_pids).eval()
    runs = {"clips": (clip_model, records), "images": (image_model, frames)}
    best = {}
    for model, recs in runs.values():
        shard_features(model, recs[: max(1, len(recs) // 20)], config, device)  # warm up
    for _ in range(repeats):  # alternate, so that load on the machine hits both alike
        for name, (model, recs) in runs.items():
            tic = time.perf_counter()
            rows = shard_features(model, recs, config, device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - tic)
            if len(rows) != len(recs):
                raise RuntimeError(f"{name}: {len(rows)} rows for {len(recs)} records")
    num_frames = len(frames)
    return {
        "config": config.name,
        "backbone": config.model.backbone,
        "head": config.model.head,
        "input": f"{config.data.height}x{config.data.width}",
        "seq_len": config.data.video.seq_len,
        "max_clips": config.data.video.max_clips,
        "flip_average": config.evaluation.flip_average,
        "loader": resolve_backend(config.loader.backend),
        "tracklets": len(records),
        "clips": len(owners),
        "frames": num_frames,
        "clips_s": round(best["clips"], 6),
        "images_s": round(best["images"], 6),
        "clips_per_s": round(len(owners) / best["clips"], 1),
        "frames_per_s": round(num_frames / best["clips"], 1),
        "image_frames_per_s": round(num_frames / best["images"], 1),
        "vs_images": round(best["images"] / best["clips"], 3),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--section", choices=["ranking", "extraction", "all"], default="all")
    p.add_argument("--scale", type=float, default=1.0, help="ranking: fraction of MARS's Q and G")
    p.add_argument("--dim", type=int, default=2048, help="ranking: feature width")
    p.add_argument("--distractors", type=int, default=0, help="ranking: pid-0 gallery tracklets")
    p.add_argument("--backend", default="auto", help="ranking: evaluation.backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, default=REPO / "configs/synthetic/video.yaml")
    add_overrides(p, "extraction: config override")
    p.add_argument("--tracklets", type=int, help="extraction: the first N gallery tracklets")
    p.add_argument("--repeats", type=int, default=2, help="best of N timings")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if args.section in ("ranking", "all"):
        r = out["ranking"] = ranking(
            args.scale, args.dim, args.distractors, args.backend, args.seed, args.repeats
        )
        print(
            f"ranking: {r['queries']} query x {r['gallery']} gallery x {r['dim']}-d tracklet "
            f"features, {r['ids']} ids, {r['cameras']} cameras, cross-camera, cosine, "
            f"{out['threads']} threads (mAP {r['mAP']}, rank-1 {r['rank-1']})"
        )
        print(f"{'distances s':>12} {'evaluate_features s':>20} {'argsort s':>10} {'speed-up':>9}")
        print(
            f"{r['distances_s']:>12.3f} {r['evaluate_s']:>20.3f} {r['argsort_s']:>10.3f} "
            f"{r['speedup']:>8}x"
        )
    if args.section in ("extraction", "all"):
        config = load_config(args.config, args.overrides)
        e = out["extraction"] = extraction(config, args.tracklets, args.repeats)
        print(
            f"extraction: {e['config']} ({e['backbone']} {e['head']} {e['input']}, "
            f"T {e['seq_len']}, max_clips {e['max_clips']}, flip {e['flip_average']}, "
            f"loader {e['loader']}, {out['threads']} threads): {e['tracklets']} tracklets, "
            f"{e['clips']} clips, {e['frames']} frames"
        )
        print(f"{'clips/s':>8} {'frames/s':>9} {'as images frames/s':>19} {'clips vs images':>16}")
        print(
            f"{e['clips_per_s']:>8} {e['frames_per_s']:>9} {e['image_frames_per_s']:>19} "
            f"{e['vs_images']:>15}x"
        )
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
