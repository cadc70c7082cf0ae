"""Spatial-temporal scoring (st-ReID, hpc_reid.evaluation.st) against the released code's rules
written out as loops here: the training histogram, the Parzen window, the lookup and joint score;
Market-1501's camera clocks from hand-made names; st inside the tiled, sharded and re-ranked
evaluation equal to the full matrix; the refusals; and st-ReID lifting rank-1 on the transit
synthetic set."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from hpc_reid.cli import main as cli_main
from hpc_reid.config import ConfigError, SpatialTemporalConfig, load_config
from hpc_reid.data.datasets import build_dataset
from hpc_reid.data.datasets.base import ImageRecord, TrackletRecord
from hpc_reid.data.pack import pack_dataset
from hpc_reid.data.packed import PackedDataset
from hpc_reid.data.synthetic import SynthSpec, plan
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.evaluate import spatial_temporal_distance
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import train
from hpc_reid.evaluation import RowDistance, evaluate_features, rerank
from hpc_reid.evaluation.ranking import rank_metrics
from hpc_reid.evaluation.rerank import rerank_dense
from hpc_reid.evaluation.sharded import evaluate_sharded
from hpc_reid.evaluation.st import (
    ST_HISTOGRAM,
    CameraHistogram,
    SpatialTemporalDistance,
    SpatialTemporalError,
    camera_histogram,
    parzen_smooth,
    record_frames,
    run_histogram,
)
from tests.evaluation.reference import reference_metrics
from tests.tiny import REPO, tiny_config

ST = SpatialTemporalConfig(
    bin_frames=100, bins=40, smooth_sigma=3.0, lambda0=1.5, gamma0=4.0, lambda1=2.5, gamma1=6.0
)

# ------------------------------------------------------------------ the released code as loops


def reference_histogram(records, num_cams: int, bin_frames: int, bins: int) -> np.ndarray:
    """gen_st_model_market.py's counting: per identity and camera pair j < k seen both, the mean
    frames' difference binned into H[later camera][earlier camera] (a tie into H[k][j])."""
    frames = defaultdict(list)
    for r in records:
        frames[r.pid, r.camid].append(r.frame)
    hist = np.zeros((num_cams, num_cams, bins))
    for pid in sorted({r.pid for r in records}):
        for j in range(num_cams - 1):
            for k in range(j + 1, num_cams):
                if not frames[pid, j] or not frames[pid, k]:
                    continue
                mean_j = sum(frames[pid, j]) / len(frames[pid, j])
                mean_k = sum(frames[pid, k]) / len(frames[pid, k])
                if mean_j > mean_k:
                    later, earlier, diff = j, k, mean_j - mean_k
                else:
                    later, earlier, diff = k, j, mean_k - mean_j
                if int(diff / bin_frames) < bins:
                    hist[later][earlier][int(diff / bin_frames)] += 1
    return hist


def reference_normalise(hist: np.ndarray) -> np.ndarray:
    out = np.zeros_like(hist)
    for a in range(hist.shape[0]):
        for b in range(hist.shape[1]):
            out[a][b] = hist[a][b] / (hist[a][b].sum() + 0.0000001)
    return out


def reference_smooth(hist: np.ndarray, sigma: float) -> np.ndarray:
    """The banded kernel matrix K[i][j] = N(|i - j|; 0, sigma) for |i - j| <= 3 sigma, K h for
    each camera pair, normalised again."""
    n = hist.shape[-1]
    kernel = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if abs(i - j) <= 3 * sigma:
                kernel[i][j] = math.exp(-((i - j) ** 2) / (2 * sigma**2)) / (
                    sigma * math.sqrt(2 * math.pi)
                )
    out = np.zeros_like(hist)
    for a in range(hist.shape[0]):
        for b in range(hist.shape[1]):
            out[a][b] = kernel @ hist[a][b]
    return reference_normalise(out)


def reference_distances(qf, q_cams, q_frames, gf, g_cams, g_frames, table, st) -> np.ndarray:
    """evaluate_st.py's lookup and score, pair by pair, as the distance sqrt(2 - 2 score)."""
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    out = np.zeros((len(qf), len(gf)))
    for k in range(len(qf)):
        for i in range(len(gf)):
            if q_frames[k] > g_frames[i]:
                hist_ = int((q_frames[k] - g_frames[i]) / st.bin_frames)
                pair = table[q_cams[k]][g_cams[i]]
            else:
                hist_ = int((g_frames[i] - q_frames[k]) / st.bin_frames)
                pair = table[g_cams[i]][q_cams[k]]
            p = pair[hist_] if hist_ < len(pair) else 0.0
            s = float(qn[k] @ gn[i])
            score = 1 / (1 + st.lambda0 * math.exp(-st.gamma0 * s))
            score *= 1 / (1 + st.lambda1 * math.exp(-st.gamma1 * p))
            out[k][i] = math.sqrt(2 - 2 * score)
    return out


# ------------------------------------------------------------------------------ test cases


def walking_records(seed: int, ids: int, cams: int, pid0: int = 0) -> list[ImageRecord]:
    """Identities seen by 1..cams cameras, a few images each, frames over 4,000: many pairs in
    populated 100-frame bins, a few beyond 40 bins."""
    rng = np.random.default_rng(seed)
    records = []
    for pid in range(pid0, pid0 + ids):
        start = int(rng.integers(0, 2000))
        for cam in rng.choice(cams, int(rng.integers(1, cams + 1)), replace=False):
            at = start + int(rng.integers(0, 2500))
            for f in at + np.sort(rng.choice(60, int(rng.integers(1, 4)), replace=False)):
                records.append(ImageRecord(f"{pid}_{cam}_{f}.jpg", pid, int(cam), int(f)))
    return records


def split_features(seed: int, records: list[ImageRecord], dim: int = 8):
    """Features near a per-identity centre; cameras and frames as arrays."""
    rng = np.random.default_rng(seed)
    pids = np.array([r.pid for r in records])
    centres = rng.normal(size=(pids.max() + 1, dim))
    feats = centres[pids] + 0.8 * rng.normal(size=(len(records), dim))
    cams = np.array([r.camid for r in records])
    frames = np.array([r.frame for r in records])
    return feats, pids, cams, frames


def st_case(seed: int = 0, num_cams: int = 4):
    """A histogram from training records and st rows of test records (distinct frames)."""
    train = walking_records(seed, 40, num_cams)
    histogram = camera_histogram(train, num_cams, ST.bin_frames, ST.bins, "toy")
    test = walking_records(seed + 1, 30, num_cams, pid0=100)
    test = list({r.frame: r for r in test}.values())  # distinct frames: no equal-frame pairs
    rng = np.random.default_rng(seed + 2)
    in_query = rng.random(len(test)) < 0.3
    st = SpatialTemporalDistance(histogram, ST)
    sides = []
    for side in (in_query, ~in_query):
        feats, pids, cams, frames = split_features(
            seed + 3, [r for r, s in zip(test, side, strict=True) if s]
        )
        rows = st.rows(torch.from_numpy(feats).float(), cams, frames)
        sides.append((rows, feats, pids, cams, frames))
    return histogram, st, sides[0], sides[1]


# ------------------------------------------------------------------------------ histogram


@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_counts_each_identitys_mean_frame_gaps_as_the_released_loops(seed):
    records = walking_records(seed, 60, 5)
    records.append(ImageRecord("far_a.jpg", 999, 0, 0))  # 100 bins apart: beyond 40 bins
    records.append(ImageRecord("far_b.jpg", 999, 3, 10_000))
    records.append(ImageRecord("tie_a.jpg", 998, 1, 500))  # equal means: counted in H[3][1]
    records.append(ImageRecord("tie_b.jpg", 998, 3, 490))
    records.append(ImageRecord("tie_c.jpg", 998, 3, 510))
    histogram = camera_histogram(records, 5, 100, 40, "toy")
    expected = reference_histogram(records, 5, 100, 40)
    assert histogram.counts.dtype == np.int64
    np.testing.assert_array_equal(histogram.counts, expected)
    assert histogram.counts.sum() > 50 and histogram.beyond >= 1
    np.testing.assert_allclose(histogram.normalised(), reference_normalise(expected), rtol=1e-13)


@pytest.mark.parametrize(("bins", "sigma"), [(60, 7.5), (400, 50.0)])
def test_parzen_window_is_the_banded_gaussian_matrix_then_renormalised(bins, sigma):
    rng = np.random.default_rng(bins)
    counts = rng.integers(0, 3, size=(3, 3, bins)) * (rng.random((3, 3, bins)) < 0.1)
    counts[1, 1] = 0  # an empty pair stays zero
    hist = reference_normalise(counts.astype(np.float64))
    smoothed = parzen_smooth(hist, sigma)
    np.testing.assert_allclose(smoothed, reference_smooth(hist, sigma), rtol=1e-10, atol=1e-15)
    assert not smoothed[1, 1].any()


def test_joint_score_of_every_pair_is_the_published_formula():
    histogram, st, (q_rows, qf, _, qc, qfr), (g_rows, gf, _, gc, gfr) = st_case(0)
    table = reference_smooth(reference_normalise(histogram.counts.astype(np.float64)), 3.0)
    expected = reference_distances(qf, qc, qfr, gf, gc, gfr, table, ST)
    got = st(q_rows, g_rows).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    # the lookup matters: the same features without time would rank otherwise
    plain = RowDistance.of_metric("cosine")(q_rows[:, :-3], g_rows[:, :-3]).numpy()
    assert (np.argsort(got, axis=1) != np.argsort(plain, axis=1)).any()


# ------------------------------------------------------------------------- camera clocks


def write_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (120, 80, 40)).save(path, "JPEG")


MARKET = {  # name -> frame on its camera's clock: c1s1 ends at 900, c1s2 at 300, c2s1 at 700
    "bounding_box_train/0001_c1s1_000100_00.jpg": 100,
    "bounding_box_train/0001_c1s2_000050_00.jpg": 900 + 50,
    "bounding_box_train/0002_c1s3_000010_00.jpg": 900 + 300 + 10,
    "bounding_box_train/0002_c1s5_000007_00.jpg": 900 + 300 + 10 + 7,  # no c1s4 file: 0
    "bounding_box_train/0002_c2s1_000700_00.jpg": 700,
    "query/0003_c1s1_000900_00.jpg": 900,
    "query/0003_c2s2_000005_00.jpg": 700 + 5,
    "bounding_box_test/0003_c2s1_000020_00.jpg": 20,
    "bounding_box_test/0000_c2s3_000001_00.jpg": 700 + 5 + 1,  # c2s2's only file: frame 5
    "bounding_box_test/-1_c1s2_000300_00.jpg": None,  # junk: dropped, but c1s2 runs to 300
}


def test_market_frames_count_on_the_camera_clock_of_laid_end_to_end_sequences(tmp_path):
    for name in MARKET:
        write_jpeg(tmp_path / name)
    dataset = build_dataset("market1501", tmp_path)
    got = {
        str(Path(r.path).relative_to(tmp_path)): r.frame
        for r in dataset.train + dataset.query + dataset.gallery
    }
    assert got == {name: frame for name, frame in MARKET.items() if frame is not None}


def test_a_market_pack_keeps_the_clock_and_one_written_before_is_refused(tmp_path):
    for name in MARKET:
        write_jpeg(tmp_path / "set" / name)
    dataset = build_dataset("market1501", tmp_path / "set")
    pack_dataset(dataset, tmp_path / "market.h5")
    packed = PackedDataset(tmp_path / "market.h5")
    assert [r.frame for r in packed.query + packed.gallery] == [
        r.frame for r in dataset.query + dataset.gallery
    ]
    assert packed.frames_note is None
    with h5py.File(tmp_path / "market.h5", "a") as f:  # as packs were written before
        del f.attrs["frame_numbers"]
    old = PackedDataset(tmp_path / "market.h5")
    assert all(r.frame is None for r in old.train + old.query + old.gallery)
    with pytest.raises(SpatialTemporalError, match=r"'market1501' has no frame.*pack the data"):
        record_frames(old.query, old.name, old.frames_note)
    # re-packing the old pack keeps the frames unknown and the reason
    pack_dataset(old, tmp_path / "again.h5")
    assert PackedDataset(tmp_path / "again.h5").frames_note is not None


# ------------------------------------------------------------ inside the tiled evaluation


def test_tiled_st_ranking_equals_the_full_matrix_ranked_at_once():
    _, st, (q_rows, qf, qp, qc, qfr), (g_rows, gf, gp, gc, gfr) = st_case(1)
    tiled = evaluate_features(q_rows, g_rows, qp, gp, qc, gc, metric=st, query_tile=7, max_rank=10)
    full = st(q_rows, g_rows, tile=len(q_rows), gallery_chunk=len(g_rows)).numpy()
    brute = rank_metrics(full, qp, gp, qc, gc, max_rank=10, backend="numpy")
    np.testing.assert_array_equal(tiled.cmc, brute.cmc)
    np.testing.assert_array_equal(tiled.ap, brute.ap)
    # and the plain full-sort reference on the released code's score, pair by pair
    table = reference_smooth(reference_normalise(st.histogram.counts.astype(float)), 3.0)
    reference = reference_distances(qf, qc, qfr, gf, gc, gfr, table, ST)
    cmc, m_ap, _, _, _, _ = reference_metrics(reference, qp, gp, qc, gc, 10)
    np.testing.assert_allclose(tiled.cmc, cmc, atol=1e-12)
    assert tiled.mAP == pytest.approx(m_ap, abs=1e-12)


def test_rerank_of_st_starts_from_2_minus_2_score_over_its_column_maximum():
    """rerank_dense squares d and divides by the column maximum: (2 - 2 score) / max, the
    released re-ranking's input; the sparse re-ranking of st rows equals it."""
    _, st, (q_rows, *_), (g_rows, *_) = st_case(2)
    both = torch.cat([q_rows, g_rows])
    d = st(both, both).double().numpy()
    q = len(q_rows)
    dense = rerank_dense(d[:q, q:], d[:q, :q], d[q:, q:], k1=6, k2=3, lambda_value=0.3)
    sparse = rerank(q_rows, g_rows, k1=6, k2=3, lambda_value=0.3, metric=st).numpy()
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)


def _st_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        _, st, (q_rows, _, qp, qc, _), (g_rows, _, gp, gc, _) = st_case(3)
        qs = slice(0, 5) if rank == 0 else slice(5, None)  # uneven shards
        gs = slice(0, len(g_rows) // 3) if rank == 0 else slice(len(g_rows) // 3, None)
        result = evaluate_sharded(
            q_rows[qs], g_rows[gs], qp[qs], gp[gs], qc[qs], gc[gs], metric=st, query_tile=4
        )
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_st_sharded_over_two_gloo_ranks_equals_one_process(tmp_path):
    mp.spawn(_st_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    _, st, (q_rows, _, qp, qc, _), (g_rows, _, gp, gc, _) = st_case(3)
    one = evaluate_features(q_rows, g_rows, qp, gp, qc, gc, metric=st, query_tile=4)
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        np.testing.assert_allclose(two.cmc, one.cmc, atol=1e-12)
        np.testing.assert_allclose(two.ap, one.ap, atol=1e-12)


# ------------------------------------------------------------------------------ refusals


def config_with(*sets: str):
    return load_config(REPO / "configs/synthetic/bot.yaml", list(sets))


def toy_dataset(name: str, frame: int | None = 5, tracklets: bool = False):
    def rec(pid, cam):
        if tracklets:
            return TrackletRecord((f"{pid}_{cam}.jpg",), pid, cam)
        return ImageRecord(f"{pid}_{cam}.jpg", pid, cam, frame)

    splits = {s: [rec(p, c) for p in (1, 2) for c in (0, 1)] for s in ("train", "query", "gallery")}
    return SimpleNamespace(name=name, is_video=tracklets, **splits)


@pytest.mark.parametrize("name", ["cuhk01", "vehicleid"])
def test_st_is_refused_for_a_set_without_frame_numbers_naming_it(name):
    st_on = config_with("evaluation.st.enabled=true")
    with pytest.raises(SpatialTemporalError, match=rf"data set '{name}' has no frame numbers"):
        run_histogram(toy_dataset(name, frame=None), st_on)
    assert run_histogram(toy_dataset(name, frame=None), config_with()) is None  # st off: none
    assert run_histogram(toy_dataset("market1501"), config_with()).counts.shape == (2, 2, 5000)
    with pytest.raises(SpatialTemporalError, match=r"'mars' holds tracklets"):
        run_histogram(toy_dataset("mars", tracklets=True), st_on)
    distance = RowDistance.of_metric("cosine")
    with pytest.raises(SpatialTemporalError, match=rf"'{name}' has no frame numbers"):
        spatial_temporal_distance(distance, toy_dataset(name, frame=None), st_on)


def test_st_refuses_euclidean_rescoring_and_a_missing_or_foreign_histogram(tmp_path):
    dataset = toy_dataset("market1501")
    euclidean = config_with("evaluation.st.enabled=true", "evaluation.metric=euclidean")
    with pytest.raises(ConfigError, match="needs the cosine similarity of one feature"):
        spatial_temporal_distance(RowDistance.of_metric("euclidean"), dataset, euclidean)
    rescore = config_with("evaluation.st.enabled=true", "evaluation.rescore_k=5")
    with pytest.raises(ConfigError, match="rescore_k=5"):
        spatial_temporal_distance(RowDistance.of_metric("cosine"), dataset, rescore)
    missing = tmp_path / "none.npz"
    on = config_with("evaluation.st.enabled=true", f"evaluation.st.histogram={missing}")
    with pytest.raises(SpatialTemporalError, match=rf"no histogram file {missing}"):
        spatial_temporal_distance(RowDistance.of_metric("cosine"), dataset, on)
    path = run_histogram(toy_dataset("dukemtmcreid"), on).save(tmp_path / "duke.npz")
    on = config_with("evaluation.st.enabled=true", f"evaluation.st.histogram={path}")
    with pytest.raises(SpatialTemporalError, match="counts data set 'dukemtmcreid'"):
        spatial_temporal_distance(RowDistance.of_metric("cosine"), dataset, on)
    other_bins = config_with(
        "evaluation.st.enabled=true", f"evaluation.st.histogram={path}", "evaluation.st.bins=10"
    )
    with pytest.raises(SpatialTemporalError, match=r"evaluation\.st\.bins=5000"):
        spatial_temporal_distance(
            RowDistance.of_metric("cosine"), toy_dataset("dukemtmcreid"), other_bins
        )
    loaded = CameraHistogram.load(path)
    assert loaded.dataset == "dukemtmcreid" and loaded.bin_frames == 100
    np.testing.assert_array_equal(loaded.counts, run_histogram(toy_dataset("y"), on).counts)


# --------------------------------------------------------------- the transit synthetic set


def st_and_appearance(root: Path, transit: bool):
    """(appearance-only, st-ReID) results on the synthetic set's names (images not drawn: the
    parser never opens them), features = the one-hot of a look shared by 4 identities (think one
    uniform) + noise, so appearance cannot tell look-alikes apart."""
    spec = SynthSpec(ids=120, cams=6, images_per_id=10, distractors=30, junk=0, seed=1)
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True)
    for job in plan(dataclasses.replace(spec, transit=transit)):
        (root / job.relpath).touch()
    dataset = build_dataset("market1501", root)
    histogram = camera_histogram(dataset.train, 6, 100, 5000, dataset.name)
    st = SpatialTemporalDistance(histogram, SpatialTemporalConfig())  # the published defaults
    rng = np.random.default_rng(0)
    ids = {pid: i for i, pid in enumerate(sorted({r.pid for r in dataset.query + dataset.gallery}))}
    sides = []
    for records in (dataset.query, dataset.gallery):
        look = np.eye(len(ids) // 4 + 1)[[ids[r.pid] // 4 for r in records]]
        feats = torch.from_numpy(look + 0.1 * rng.normal(size=look.shape)).float()
        cams, frames = record_frames(records, dataset.name)
        sides.append(
            (feats, st.rows(feats, cams, frames), np.array([r.pid for r in records]), cams)
        )
    (qf, q_rows, qp, qc), (gf, g_rows, gp, gc) = sides
    appearance = evaluate_features(qf, gf, qp, gp, qc, gc, metric="cosine")
    return appearance, evaluate_features(q_rows, g_rows, qp, gp, qc, gc, metric=st)


def test_st_tells_look_alikes_apart_on_the_transit_synthetic_set_and_not_without_it(tmp_path):
    """The camera-pair delays learnt from the training identities lift rank-1 and mAP far above
    appearance alone on the transit set; on the same set with random frames they barely move."""
    appearance, joint = st_and_appearance(tmp_path / "transit", transit=True)
    assert appearance.cmc[0] < 0.3
    assert joint.cmc[0] > appearance.cmc[0] + 0.4 and joint.mAP > appearance.mAP + 0.3
    appearance, joint = st_and_appearance(tmp_path / "random", transit=False)
    assert abs(joint.cmc[0] - appearance.cmc[0]) < 0.1 and abs(joint.mAP - appearance.mAP) < 0.1


# ------------------------------------------------------- trained, written, evaluated again


@pytest.mark.slow
def test_a_run_writes_its_histogram_and_eval_scores_with_it_wherever_the_run_is(tmp_path):
    config = tiny_config(
        tmp_path,
        "configs/synthetic/bot.yaml",
        "data.synthetic.transit=true",
        "logging.run_name=st",
    )
    train(config, max_steps=1)
    run = tmp_path / "runs/st"
    histogram = CameraHistogram.load(run / ST_HISTOGRAM)
    assert histogram.dataset == "market1501" and histogram.counts.sum() > 0
    checkpoint = CheckpointManager(run).latest()
    on = config.model_copy(deep=True)
    on.evaluation.st.enabled = True
    on.evaluation.rerank.enabled = True
    on.evaluation.rerank.k2, on.evaluation.rerank.k1 = 2, 5
    summary = evaluate_checkpoint(checkpoint, on, out_dir=tmp_path / "eval")
    for key in ("rank-1", "mAP", "without_rerank/rank-1", "without_st/rank-1", "without_st/mAP"):
        assert 0 <= summary[key] <= 1
    # moved elsewhere, hpc-reid eval finds the run's own histogram beside its checkpoints
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    sets = ["st.enabled=true", "rerank.enabled=true", "rerank.k2=2", "rerank.k1=5"]
    out = ["--out", str(tmp_path / "cli")]
    flags = [arg for s in sets for arg in ("--set", f"evaluation.{s}")]
    assert cli_main(["eval", "--checkpoint", str(moved), *out, *flags]) == 0
    again = json.loads((tmp_path / "cli/results.json").read_text())
    assert again["rank-1"] == pytest.approx(summary["rank-1"])
    assert again["without_st/mAP"] == pytest.approx(summary["without_st/mAP"])
