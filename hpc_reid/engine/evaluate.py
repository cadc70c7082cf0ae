"""Evaluation of a model during and after training: features, exact metrics, results and plots.

Each rank extracts features for its contiguous shard of the query and gallery images and keeps
them on the device that computed them (float32; on a GPU run, the GPU): on several ranks the
metrics come from :func:`~hpc_reid.evaluation.sharded.evaluate_sharded` (no rank ever holds Q x G
nor the whole gallery; exact, as on one process; on CUDA the fused kernel's two passes, NCCL moving
the small per-tile tensors), and the ranked-list plot from the few gallery columns
:func:`~hpc_reid.evaluation.sharded.ranked_candidates` finds (copied to the host). One process
ranks with ``evaluate_features`` and its configured backend: on CUDA features with "auto" or
"cuda", the fused kernel (kernels/rank_fused.cu).

With ``evaluation.rerank.enabled`` the metrics are those of k-reciprocal re-ranking
(:func:`~hpc_reid.evaluation.rerank.rerank_blocks`: sparse, O(N k) memory, ranked block by block so
Q x G is never held). Re-ranking needs every query's and gallery item's neighbours, so there each
rank gathers all features (N x D, not N x N; on the device) and computes the same result, its
blocks ranked where they are (the torch ranker on a GPU); the metrics without re-ranking are
reported beside it as ``without_rerank/mAP`` etc.

With ``evaluation.st.enabled`` the metrics are those of spatial-temporal scoring
(:mod:`~hpc_reid.evaluation.st`: the cosine similarity joined with the probability of the camera
pair's frame difference under the training set's histogram, element-wise on every distance tile),
in every path above (re-ranking starts from its scores); the appearance-only metrics are reported
beside it as ``without_st/mAP`` etc. Each row then carries its camera and frame in three trailing
columns.

With ``evaluation.rescore_k`` > 0 the metrics are those of the head's own re-ordering of each
query's top-K (``head.rescore_ranking``: CACE-Net's conditional re-scoring,
:mod:`hpc_reid.methods.cace.rescore`; sharded by query, each rank holding all gallery rows, N x
D); the single-image ones are reported beside it as ``without_rescore/mAP`` etc.

The distance is ``evaluation.distance`` over the retrieval parts the model declares (the
:class:`~hpc_reid.evaluation.distances.RowDistance` of :func:`evaluation_distance`: "global";
AlignedReID's "local" and "global+local"), in every path above; a part the model does not declare
is a ConfigError before any image is read.

Video sets (MARS, iLIDS-VID, PRID 2011, the synthetic tracklets) go through the same paths with a
tracklet in place of an image: each rank takes its contiguous shard of the query and gallery
tracklets, its test loader yields their dense clips (``data.video``: T frames a clip, at most
``max_clips`` a tracklet), and a tracklet's row is the mean of its clips' rows (flip-averaged per
clip; :mod:`~hpc_reid.evaluation.features`). Since a shard holds whole tracklets, no clip batch
straddles two ranks and each row is that of one process. Ranking is then the image protocol: the
MARS protocol is cross-camera (gallery tracklets of the query's pid and camera are left out), as
here for every set. The ranked-list plot shows each tracklet's first frame.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpc_reid.atomic import write_atomic
from hpc_reid.config import Config, ConfigError
from hpc_reid.data.datasets import ReidDataset
from hpc_reid.data.datasets.base import Record, TrackletRecord
from hpc_reid.data.loaders import build_backend_test_loader
from hpc_reid.evaluation import RowDistance, evaluate_features, extract_features
from hpc_reid.evaluation.features import extract_flip_and_plain
from hpc_reid.evaluation.parts import METRIC, check_distance, declared_parts, probe_layout
from hpc_reid.evaluation.plots import plot_cmc, plot_ranked_lists
from hpc_reid.evaluation.ranking import RankResult, combine, query_ranks
from hpc_reid.evaluation.rerank import rerank_blocks
from hpc_reid.evaluation.sharded import (
    all_gather_rows,
    evaluate_sharded,
    ranked_candidates,
    shard_range,
)
from hpc_reid.evaluation.st import (
    ST_HISTOGRAM,
    SpatialTemporalDistance,
    load_histogram,
    record_frames,
)


def metrics_line(summary: dict[str, Any]) -> str:
    """``rank-1 55.30%, rank-5 ..., mAP ...``: a summary's metrics for a log line."""
    keys = [k for k in ("rank-1", "rank-5", "rank-10", "mAP", "mINP") if k in summary]
    return ", ".join(f"{k} {100 * summary[k]:.2f}%" for k in keys)


def check_evaluation_distance(model, config: Config) -> None:
    """A ConfigError naming ``evaluation.distance``, the part and the parts ``model`` declares
    when the distance names a part the model lacks (``local`` of a model without local features)
    or one whose part distance is not registered; and one naming ``evaluation.rescore_k`` when it
    is on for a head without a test-time re-scorer or together with re-ranking. Reads no image: the
    trainer calls it when it builds the model, evaluation before extraction."""
    ev = config.evaluation
    declared = {n: p.distance for n, p in declared_parts(model).items()}
    check_distance(ev.distance, ev.distance_weights, declared)
    # evaluation.rescore_k: a head's own re-ordering of each query's top-K (CACE-Net's pairs)
    rescorer = getattr(getattr(model, "head", None), "rescore_ranking", None)
    if ev.rescore_k and not callable(rescorer):
        raise ConfigError(
            f"evaluation.rescore_k={ev.rescore_k}: the {config.model.head!r} head has no test-time "
            "re-scorer (rescore_ranking); expected model.head: cace, or evaluation.rescore_k: 0"
        )
    if ev.rescore_k and ev.rerank.enabled:
        raise ConfigError(
            f"evaluation.rescore_k={ev.rescore_k} with evaluation.rerank.enabled: both re-order "
            "the ranked list; drop one (evaluation.rescore_k: 0 or evaluation.rerank.enabled: "
            "false)"
        )


def evaluation_distance(model, config: Config, device) -> RowDistance:
    """``evaluation.distance`` (with its weights and ``evaluation.metric``) over ``model``'s rows.

    Checked first (:func:`check_evaluation_distance`), before any extraction. Rows of one "metric"
    part named "global" (the baseline) need no layout; otherwise the layout comes from the model's
    outputs on one blank image, the same on every rank."""
    check_evaluation_distance(model, config)
    declared = declared_parts(model)
    if [(n, p.distance) for n, p in declared.items()] == [("global", METRIC)]:
        layout = None
    else:
        layout = probe_layout(model, config.data.height, config.data.width, device)
    return RowDistance.from_config(layout, config.evaluation)


def spatial_temporal_distance(
    distance: RowDistance, dataset: ReidDataset, config: Config
) -> SpatialTemporalDistance | None:
    """``evaluation.st``'s distance over ``distance``'s feature, or None when off. Every refusal
    comes before any image is read: a set without frame numbers (naming it), a distance that is
    not one cosine feature, CACE-Net's re-scoring, a missing or mismatched histogram. The histogram
    is ``evaluation.st.histogram``, by default the run folder's (``logging.output_dir``/run name)
    :data:`~hpc_reid.evaluation.st.ST_HISTOGRAM`, written there by the trainer."""
    ev = config.evaluation
    if not ev.st.enabled:
        return None
    if ev.rescore_k:
        raise ConfigError(
            f"evaluation.st.enabled with evaluation.rescore_k={ev.rescore_k}: CACE-Net's "
            "re-scoring reorders distances st-ReID has replaced; drop one"
        )
    terms = distance.terms  # (part, weight, part distance): one cosine "metric" part of weight 1
    if distance.metric != "cosine" or len(terms) != 1 or terms[0][1:] != (1.0, None):
        raise ConfigError(
            f"evaluation.st.enabled needs the cosine similarity of one feature (st-ReID's "
            f"appearance score), got evaluation.metric={ev.metric!r}, evaluation.distance="
            f"{distance.spec!r}; expected evaluation.metric: cosine and one metric part"
        )
    note = getattr(dataset, "frames_note", None)
    for records in (dataset.query, dataset.gallery):
        record_frames(records, dataset.name, note)
    from hpc_reid.engine.trainer import run_dir_of  # the trainer imports this module

    path = ev.st.histogram or run_dir_of(config) / ST_HISTOGRAM
    return SpatialTemporalDistance(load_histogram(path, dataset, ev.st), ev.st)


def _st_rows(distance: RowDistance, rows: torch.Tensor, records: Sequence[Record], part: range):
    """This shard's rows for st-ReID: ``distance``'s feature columns, then each record's camera
    and frame (:meth:`~hpc_reid.evaluation.st.SpatialTemporalDistance.rows`)."""
    rows, _, _ = distance.restrict(rows, rows[:0])
    shard = records[part.start : part.stop]
    cams, frames = np.array([r.camid for r in shard]), np.array([r.frame for r in shard])
    return SpatialTemporalDistance.rows(rows, cams, frames)


def _beside(summary: dict[str, float], previous: dict[str, float], prefix: str) -> dict:
    """``summary``, with ``previous``'s plain metrics as ``prefix/...`` and its keys that name
    another protocol already (``without_st/...``) as they are."""
    plain = {f"{prefix}/{k}": v for k, v in previous.items() if "/" not in k}
    return {**summary, **plain, **{k: v for k, v in previous.items() if "/" in k}}


def shown_image(record: Record) -> str:
    """The image that stands for ``record`` in the ranked-list plot and a feature file's
    ``paths``: an image's path; a tracklet's first frame (whose name, in MARS and the synthetic
    set, holds the tracklet's pid, camera and number)."""
    return record.frames[0] if isinstance(record, TrackletRecord) else record.path


def shard_loader(records: Sequence[Record], config: Config, device):
    """The test loader of this rank's contiguous shard of ``records``
    (:func:`~hpc_reid.evaluation.sharded.shard_range`); None for an empty shard. Tracklets give
    batches of their dense clips (``data.video``), each clip's tracklet index in the shard."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    part = shard_range(len(records), rank, world)
    if not part:
        return None
    return build_backend_test_loader(
        records[part.start : part.stop],
        config.loader,
        config.data.height,
        config.data.width,
        device,
        config.data.video,  # read for tracklets only: T and max_clips of the dense clips
    )


def shard_features(model, records: Sequence[Record], config: Config, device) -> torch.Tensor:
    """Rows (n, W) float32 of this rank's contiguous shard of ``records``
    (:func:`~hpc_reid.evaluation.sharded.shard_range`; every retrieval part the model declares,
    :func:`~hpc_reid.evaluation.extract_features`; one row per tracklet for tracklets, the mean
    of its dense clips'), on the device the model computed them on (``device``); (0, 0) there for
    an empty shard."""
    loader = shard_loader(records, config, device)
    if loader is None:
        return torch.empty(0, 0, device=device)
    feats, _, _ = extract_features(model, loader, device, flip=config.evaluation.flip_average)
    return feats.float()  # a no-op: extract_features gives float32 on the model's device


def shard_features_and_plain(
    model, records: Sequence[Record], config: Config, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shard_features` flip-averaged, and the same shard's image-only rows, from one pass
    (:func:`~hpc_reid.evaluation.features.extract_flip_and_plain`)."""
    loader = shard_loader(records, config, device)
    if loader is None:
        empty = torch.empty(0, 0, device=device)
        return empty, empty
    feats, plain, _, _ = extract_flip_and_plain(model, loader, device)
    return feats.float(), plain.float()


def record_key(record: Record) -> str | tuple[str, ...]:
    """What a record's features depend on: its image (a tracklet: its frames), not its labels."""
    return tuple(record.frames) if isinstance(record, TrackletRecord) else record.path


class FeatureCache:
    """One model's test rows kept across evaluations that rank the same images split otherwise
    into query and gallery (``eval --draws``: VehicleID redraws only its gallery), so each image
    is extracted once. An evaluation extracts the records not seen yet (sharded over the ranks as
    usual), gathers their rows to every rank (N x D, on the model's device, as re-ranking does)
    and takes its own shard's rows from here. Rows do not depend on the batch an image was
    extracted in (eval mode), up to float reordering."""

    def __init__(self) -> None:
        self._rows: dict[Any, torch.Tensor] = {}
        self._plain: dict[Any, torch.Tensor] = {}

    def shard_rows(
        self, model, records: Sequence[Record], config: Config, device, plain: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's contiguous shard of ``records``: its rows (as :func:`shard_features`) and,
        with ``plain``, its image-only rows (as :func:`shard_features_and_plain`)."""
        keys = [record_key(r) for r in records]
        missing: dict = {}  # key -> record, the same on every rank: records and the cache are
        for key, record in zip(keys, records, strict=True):
            if key not in self._rows or (plain and key not in self._plain):
                missing.setdefault(key, record)
        if missing:
            todo = list(missing.values())
            if plain:
                rows, image_only = shard_features_and_plain(model, todo, config, device)
                image_only = _all_rows(image_only)
            else:
                rows, image_only = shard_features(model, todo, config, device), None
            rows = _all_rows(rows)
            for i, key in enumerate(missing):
                self._rows[key] = rows[i]
                if image_only is not None:
                    self._plain[key] = image_only[i]
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        part = shard_range(len(keys), rank, world)
        mine = keys[part.start : part.stop]
        if not mine:
            empty = torch.empty(0, 0, device=device)
            return empty, (empty if plain else None)
        stacked = torch.stack([self._rows[k] for k in mine])
        return stacked, (torch.stack([self._plain[k] for k in mine]) if plain else None)


def _all_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's contiguous shard concatenated in rank order (N, D), on every rank, on the
    device of ``local`` (an NCCL gather of CUDA features stays on the GPU)."""
    dims = torch.cat(all_gather_rows(torch.tensor([local.shape[1]])))
    local = local.reshape(len(local), int(dims.max()))  # an empty shard comes as (0, 0)
    return torch.cat(all_gather_rows(local, device=local.device))


def _reranked(
    qf, gf, q_pids, g_pids, q_cams, g_cams, config: Config, distance: RowDistance, device
) -> RankResult:
    ev = config.evaluation
    parts = []
    blocks = rerank_blocks(
        qf.to(device),  # no-op: the features are on the model's device already
        gf.to(device),
        ev.rerank.k1,
        ev.rerank.k2,
        ev.rerank.lambda_value,
        metric=distance,
    )
    for start, block in blocks:
        stop = start + len(block)
        ids = (q_pids[start:stop], g_pids, q_cams[start:stop], g_cams)
        parts.append(query_ranks(block, *ids, backend=ev.backend, query_start=start))
    return combine(parts, ev.max_rank)


def evaluate_model(
    model: torch.nn.Module,
    dataset: ReidDataset,
    config: Config,
    device: torch.device,
    out_dir: Path | None = None,
    cache: FeatureCache | None = None,
) -> dict[str, Any]:
    """Rank the query against the gallery; every rank returns the same summary.

    With ``out_dir`` the main process writes ``results.json``, ``cmc.png`` and ``ranked.png``.
    With ``cache`` the rows of images it holds are not extracted again (:class:`FeatureCache`).
    """
    distance = evaluation_distance(model, config, device)  # a ConfigError before extraction
    st = spatial_temporal_distance(distance, dataset, config)  # evaluation.st: ditto
    ev = config.evaluation
    both = ev.flip_average and ev.report_without_flip  # papers report both protocols
    if cache is not None:  # rows extracted by an earlier evaluation of the same model reused
        qf, q_plain = cache.shard_rows(model, dataset.query, config, device, both)
        gf, g_plain = cache.shard_rows(model, dataset.gallery, config, device, both)
    elif both:
        qf, q_plain = shard_features_and_plain(model, dataset.query, config, device)
        gf, g_plain = shard_features_and_plain(model, dataset.gallery, config, device)
    else:
        qf = shard_features(model, dataset.query, config, device)
        gf = shard_features(model, dataset.gallery, config, device)
    q_pids = np.array([r.pid for r in dataset.query])
    g_pids = np.array([r.pid for r in dataset.gallery])
    q_cams = np.array([r.camid for r in dataset.query])
    g_cams = np.array([r.camid for r in dataset.gallery])
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    qs = shard_range(len(q_pids), rank, world)
    gs = shard_range(len(g_pids), rank, world)
    local = (qf, gf, q_pids[qs.start : qs.stop], g_pids[gs.start : gs.stop])
    local += (q_cams[qs.start : qs.stop], g_cams[gs.start : gs.stop])
    rank_all = evaluate_features if world == 1 else evaluate_sharded
    result = rank_all(*local, metric=distance, max_rank=ev.max_rank, backend=ev.backend)
    summary = result.summary()
    if st is not None:  # st-ReID: the rows gain cameras and frames, ranked by the joint score
        qf, gf = (
            _st_rows(distance, qf, dataset.query, qs),
            _st_rows(distance, gf, dataset.gallery, gs),
        )
        if both:
            q_plain = _st_rows(distance, q_plain, dataset.query, qs)
            g_plain = _st_rows(distance, g_plain, dataset.gallery, gs)
        distance, local = st, (qf, gf, *local[2:])
        result = rank_all(*local, metric=distance, max_rank=ev.max_rank, backend=ev.backend)
        summary = _beside(result.summary(), summary, "without_st")
    if ev.rerank.enabled:
        plain = summary
        result = _reranked(
            _all_rows(qf),
            _all_rows(gf),
            q_pids,
            g_pids,
            q_cams,
            g_cams,
            config,
            distance,
            device,
        )
        summary = _beside(result.summary(), plain, "without_rerank")
    if ev.rescore_k:  # the head's re-scorer (checked above); the single-image metrics beside it
        plain = summary
        result = model.head.rescore_ranking(
            model, dataset, config, qf, _all_rows(gf), distance, device
        )
        summary = {**result.summary(), **{f"without_rescore/{k}": v for k, v in plain.items()}}
    if both:  # the image-only features, plainly ranked, beside the flip-averaged result
        plain = rank_all(
            q_plain, g_plain, *local[2:], metric=distance, max_rank=ev.max_rank, backend=ev.backend
        )
        summary.update({f"without_flip/{k}": v for k, v in plain.summary().items()})
    main = rank == 0
    plot_ranked = out_dir is not None and ev.plots
    if plot_ranked:  # collective: every rank takes part before the main process plots
        n = min(8, len(dataset.query))
        columns, distmat = ranked_candidates(*local, num_queries=n, topk=10, metric=distance)
    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(
            out_dir / "results.json",
            json.dumps({**summary, "cmc": [float(c) for c in result.cmc]}, indent=2) + "\n",
        )
        if plot_ranked:
            plot_cmc(result.cmc, out_dir / "cmc.png", label=config.name)
            plot_ranked_lists(
                distmat,
                [shown_image(r) for r in dataset.query[:n]],
                [shown_image(dataset.gallery[c]) for c in columns],
                q_pids[:n],
                g_pids[columns],
                q_cams[:n],
                g_cams[columns],
                out_dir / "ranked.png",
                num_queries=n,
                topk=10,
            )
    return summary
