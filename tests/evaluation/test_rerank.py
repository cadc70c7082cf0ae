import numpy as np
import pytest
import torch

from hpc_reid.config import RerankConfig
from hpc_reid.evaluation import pairwise_distance, rank_metrics
from hpc_reid.evaluation.rerank import (
    _distances,
    _prepare,
    _stable_smallest,
    rerank,
    rerank_blocks,
    rerank_dense,
    rerank_from_config,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tensors here are tiny: a second intra-op thread only adds waits, which take most of the time
    # on a machine busy with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_features(seed, n, dim=8):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, dim)))


def tied_features(seed, n, metric, dim=6):
    """Features whose distances are computed exactly, so that many are exactly equal: small
    integers (euclidean), or four entries of +-2^e (cosine: normalised entries are exact +-1/2)."""
    rng = np.random.default_rng(seed)
    if metric == "euclidean":
        return torch.from_numpy(rng.integers(-1, 2, size=(n, dim)).astype(np.float64))
    f = np.zeros((n, dim))
    for row in f:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4) * 2.0 ** rng.integers(3)
    return torch.from_numpy(f)


def dense_reference(qf, gf, metric, **params):
    """rerank_dense on the distances rerank computes internally (same formulas and dtype)."""
    x, x_sq = _prepare(torch.cat([qf, gf]), metric)
    d = _distances(x, x_sq, x, x_sq, metric)
    q = qf.shape[0]
    return rerank_dense(d[:q, q:], d[:q, :q], d[q:, q:], **params)


PARAMS = [
    dict(k1=20, k2=6, lambda_value=0.3),
    dict(k1=7, k2=3, lambda_value=0.5),
    dict(k1=5, k2=1, lambda_value=0.0),
    dict(k1=1, k2=1, lambda_value=1.0),
]


@pytest.mark.parametrize(
    "params", PARAMS, ids=lambda p: "k1={k1},k2={k2},l={lambda_value}".format(**p)
)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", range(3))
def test_sparse_rerank_equals_dense_reference(seed, metric, params):
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(10, 30)), int(rng.integers(50, 130))
    qf, gf = random_features(seed, num_q), random_features(seed + 100, num_g)
    expected = dense_reference(qf, gf, metric, **params)
    got = rerank(qf, gf, metric=metric, tile=13, **params)
    assert got.dtype == torch.float64 and got.shape == (num_q, num_g)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", range(3))
def test_sparse_rerank_equals_dense_reference_with_tied_distances(seed, metric):
    qf, gf = tied_features(seed, 25, metric), tied_features(seed + 100, 150, metric)
    d = pairwise_distance(qf, gf, metric=metric).numpy()
    assert np.unique(d).size < 30  # most distances are tied: ordering is decided by index
    for params in PARAMS[:2]:
        expected = dense_reference(qf, gf, metric, **params)
        got = rerank(qf, gf, metric=metric, tile=11, **params)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_float32_features_give_float32_close_to_the_float64_result():
    qf, gf = random_features(3, 30).float(), random_features(4, 120).float()
    got = rerank(qf, gf, metric="cosine")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(
        got.numpy(), rerank(qf.double(), gf.double(), metric="cosine").numpy(), atol=1e-5
    )


def test_lambda_one_is_the_row_normalised_squared_distance():
    # Independent of the re-ranking machinery: D[q, g] = d(q, g)^2 / max over all N of d(q, .)^2.
    qf, gf = random_features(5, 10), random_features(6, 40)
    x = torch.cat([qf, gf]).numpy()
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = d2[:10, 10:] / d2[:10].max(axis=1, keepdims=True)
    got = rerank(qf, gf, k1=4, k2=2, lambda_value=1.0, metric="euclidean")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    q = qf.shape[0]
    d = np.sqrt(d2)
    dense = rerank_dense(d[:q, q:], d[:q, :q], d[q:, q:], k1=4, k2=2, lambda_value=1.0)
    np.testing.assert_allclose(dense, expected, rtol=1e-12)


@pytest.mark.parametrize("tile", [1, 6, 1000])
def test_blocks_equal_the_full_matrix(tile):
    qf, gf = random_features(7, 23), random_features(8, 70)
    full = rerank(qf, gf, k1=9, k2=4, metric="euclidean")
    blocks = list(rerank_blocks(qf, gf, k1=9, k2=4, metric="euclidean", tile=tile))
    assert [start for start, _ in blocks] == list(range(0, 23, tile))
    assert all(b.shape[0] <= tile and b.shape[1] == 70 for _, b in blocks)
    # Equal up to the rounding of distance tiles of another shape.
    np.testing.assert_allclose(torch.cat([b for _, b in blocks]).numpy(), full.numpy(), atol=1e-12)


def test_rerank_from_config_uses_the_section_fields():
    qf, gf = random_features(9, 12), random_features(10, 50)
    config = RerankConfig(enabled=True, k1=8, k2=3, lambda_value=0.4)
    expected = rerank(qf, gf, k1=8, k2=3, lambda_value=0.4, metric="cosine")
    assert torch.equal(rerank_from_config(qf, gf, config, metric="cosine"), expected)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(k1=0), "k1=0"),
        (dict(k1=2.5), "k1=2.5"),
        (dict(k1=5, k2=6), "k2=6"),
        (dict(k2=0), "k2=0"),
        (dict(lambda_value=1.5), "lambda_value=1.5"),
        (dict(lambda_value=-0.1), "lambda_value=-0.1"),
        (dict(k1=40), "k1=40"),  # needs k1 + 1 items; there are 5 + 30
    ],
)
def test_invalid_parameters_raise_naming_parameter_and_value(params, message):
    qf, gf = random_features(0, 5), random_features(1, 30)
    with pytest.raises(ValueError, match=message):
        rerank_blocks(qf, gf, **params)  # raised at the call, not at the first block
    d = pairwise_distance(torch.cat([qf, gf]), torch.cat([qf, gf])).double().numpy()
    with pytest.raises(ValueError, match=message):
        rerank_dense(d[:5, 5:], d[:5, :5], d[5:, 5:], **params)


def test_invalid_features_or_metric_raise():
    with pytest.raises(ValueError, match="metric"):
        rerank(random_features(0, 5), random_features(1, 30), metric="manhattan")
    with pytest.raises(ValueError, match="features"):
        rerank(random_features(0, 5), random_features(1, 30, dim=3))
    with pytest.raises(ValueError, match="tile"):
        rerank(random_features(0, 5), random_features(1, 30), tile=0)


def clustered_case(seed, num_ids=60, dim=32):
    """Identities as clusters, each photographed by 4 cameras (a camera shifts its features), and
    paired into look-alikes (hard negatives) whose centres are close; one query per identity."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    centres[1::2] = centres[::2] + 0.6 * rng.normal(size=(num_ids // 2, dim))
    cameras = 0.5 * rng.normal(size=(4, dim))
    q_pids, q_cams = np.arange(num_ids), np.zeros(num_ids, dtype=int)
    g_pids = np.repeat(np.arange(num_ids), 6)
    g_cams = rng.integers(1, 4, size=g_pids.size)

    def images(pids, cams):
        noise = 0.8 * rng.normal(size=(pids.size, dim))
        return torch.from_numpy(centres[pids] + cameras[cams] + noise)

    return images(q_pids, q_cams), images(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", range(2))
def test_rerank_improves_map_on_clustered_features_with_hard_negatives(seed):
    qf, gf, *ids = clustered_case(seed)
    before = rank_metrics(pairwise_distance(qf, gf, metric="euclidean").numpy(), *ids)
    after = rank_metrics(rerank(qf, gf, metric="euclidean").numpy(), *ids)
    assert 0.3 < before.mAP < 0.9  # a problem with room to improve
    assert after.mAP > before.mAP + 0.03


@pytest.mark.parametrize("k", [1, 5, 40])
def test_neighbour_lists_are_a_stable_argsort_prefix(k):
    # Coarse values: most rows have ties inside and at the boundary of their k smallest.
    m = torch.from_numpy(np.random.default_rng(k).integers(0, 6, size=(50, 40)).astype(float))
    m[::7] = torch.rand(8, 40, dtype=torch.float64)  # and some rows without ties
    expected = np.argsort(m.numpy(), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(_stable_smallest(m, k).numpy(), expected)
