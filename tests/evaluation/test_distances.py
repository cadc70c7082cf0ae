import numpy as np
import pytest
import torch

from hpc_reid.evaluation import evaluate_features, pairwise_distance, rank_metrics
from tests.evaluation.reference import make_case, reference_metrics


def features(seed, n, dim=16):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, dim)))


@pytest.mark.parametrize(("tile", "chunk"), [(1, 16384), (7, 5), (4096, 1), (4096, 16384)])
def test_cosine_distance_is_one_minus_cosine_similarity(tile, chunk):
    qf, gf = features(0, 13), features(1, 29)
    expected = np.array(
        [
            [1 - q @ g / np.linalg.norm(q) / np.linalg.norm(g) for g in gf.numpy()]
            for q in qf.numpy()
        ]
    )
    dist = pairwise_distance(qf, gf, metric="cosine", tile=tile, gallery_chunk=chunk)
    assert dist.dtype == torch.float32 and dist.shape == (13, 29)
    np.testing.assert_allclose(dist.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(("tile", "chunk"), [(1, 16384), (7, 5), (4096, 1), (4096, 16384)])
def test_euclidean_distance_is_the_norm_of_the_difference(tile, chunk):
    qf, gf = features(2, 13), features(3, 29)
    expected = np.array([[np.linalg.norm(q - g) for g in gf.numpy()] for q in qf.numpy()])
    dist = pairwise_distance(qf, gf, metric="euclidean", tile=tile, gallery_chunk=chunk)
    assert dist.dtype == torch.float32
    np.testing.assert_allclose(dist.numpy(), expected, atol=1e-5)
    # Identical rows: the clamp keeps rounding from producing sqrt of a negative (NaN).
    assert not torch.isnan(pairwise_distance(qf, qf, metric="euclidean")).any()


def test_gallery_chunks_cover_every_row_once_and_none_is_thin():
    from hpc_reid.evaluation.distances import _column_chunks

    for n, chunk in [(0, 8), (5, 8), (100, 8), (16384 * 5 + 10, 16384), (16384 * 2 + 64, 16384)]:
        ranges = _column_chunks(n, chunk)
        assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
        assert all(b - a >= min(64, n, chunk) for a, b in ranges)


def test_pairwise_distance_writes_into_out_and_checks_it():
    qf, gf = features(4, 5), features(5, 9)
    out = torch.full((5, 9), -1.0)
    assert pairwise_distance(qf, gf, out=out) is out
    assert torch.equal(out, pairwise_distance(qf, gf))
    with pytest.raises(ValueError, match=r"out must be a \(5, 9\) float32 tensor"):
        pairwise_distance(qf, gf, out=torch.empty(5, 8))


def test_pairwise_distance_rejects_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(features(0, 2), features(1, 2), metric="manhattan")
    with pytest.raises(ValueError, match="features"):
        pairwise_distance(features(0, 2), features(1, 2, dim=3))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_tiled_evaluate_features_equals_rank_metrics_on_the_full_matrix(seed, metric):
    _, q_pids, g_pids, q_cams, g_cams = make_case(seed, num_q=23, num_g=90)
    qf, gf = features(seed, 23, dim=8), features(seed + 100, 90, dim=8)
    # Coarse features (a few values per dimension) make many exactly tied distances.
    if seed == 2:
        qf, gf = qf.round(), gf.round()
    ids = (q_pids, g_pids, q_cams, g_cams)
    full = pairwise_distance(qf, gf, metric=metric).numpy()
    tiled = evaluate_features(qf, gf, *ids, metric=metric, max_rank=30, query_tile=5)
    whole = rank_metrics(full, *ids, max_rank=30)
    for field in ("cmc", "ap", "inp", "valid"):
        np.testing.assert_array_equal(getattr(tiled, field), getattr(whole, field))
    cmc, mAP, mINP, *_ = reference_metrics(full, *ids, 30)
    np.testing.assert_allclose(tiled.cmc, cmc, rtol=0, atol=1e-9)
    assert tiled.mAP == pytest.approx(mAP, abs=1e-9) and tiled.mINP == pytest.approx(mINP, abs=1e-9)


def test_tiled_evaluate_features_draws_the_same_cuhk03_galleries():
    _, q_pids, g_pids, q_cams, g_cams = make_case(4, num_q=23, num_g=90)
    qf, gf = features(4, 23), features(5, 90)
    ids = (q_pids, g_pids, q_cams, g_cams)
    kw = dict(cuhk03_old_protocol=True, repeats=4, seed=3, max_rank=20)
    tiled = evaluate_features(qf, gf, *ids, query_tile=4, **kw)
    whole = rank_metrics(pairwise_distance(qf, gf).numpy(), *ids, **kw)
    np.testing.assert_array_equal(tiled.cmc, whole.cmc)
