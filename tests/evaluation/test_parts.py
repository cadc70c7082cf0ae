"""Retrieval rows of several parts: their layout, the weighted-sum RowDistance against a float64
reference, and every evaluation path (tiled, re-ranked, streamed from HDF5, extraction) on them."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from hpc_reid.cli import main
from hpc_reid.config import ConfigError
from hpc_reid.evaluation import (
    RowDistance,
    RowLayout,
    evaluate_features,
    evaluate_sharded,
    extract_features,
    pairwise_distance,
    probe_layout,
    ranking_cuda,
    rerank,
    retrieval_layout,
    sharded_fused,
)
from hpc_reid.evaluation.feature_files import evaluate_feature_files, write_feature_file
from hpc_reid.evaluation.parts import METRIC
from hpc_reid.evaluation.rerank import rerank_dense
from hpc_reid.models.heads import RetrievalPart
from tests.evaluation import stripes
from tests.evaluation.dense_kernel import ClaimsCuda, DenseKernel
from tests.evaluation.reference import reference_metrics
from tests.evaluation.stripes import GLOBAL_DIM, combined_float64, tied_case

METRICS = ["cosine", "euclidean"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def continuous_case(seed: int, num_q: int = 30, num_g: int = 90):
    """Random float32 rows of :func:`stripes.layout` and labels (no ties in practice)."""
    rng = np.random.default_rng(seed)
    width = stripes.layout().width
    q = torch.from_numpy(rng.standard_normal((num_q, width)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((num_g, width)).astype(np.float32))
    ids = (
        rng.integers(0, 12, num_q),
        rng.integers(0, 12, num_g),
        rng.integers(0, 3, num_q),
        rng.integers(0, 3, num_g),
    )
    return q, g, ids


# --- the layout -----------------------------------------------------------------------------------


def test_row_layout_places_parts_in_order_and_round_trips_through_json():
    layout = stripes.layout()
    assert layout.names == ("global", "local") and layout.width == GLOBAL_DIM + 6
    local = layout.part("local")
    assert (local.start, local.stop, local.shape, local.distance) == (4, 10, (3, 2), stripes.NAME)
    assert RowLayout.from_json(layout.to_json()) == layout
    rows = torch.arange(20.0).view(2, 10)
    assert torch.equal(local.of(rows), rows[:, 4:].view(2, 3, 2))
    text = json.loads(layout.to_json())
    text["parts"][1]["columns"] = [5, 11]
    with pytest.raises(ValueError, match="columns"):
        RowLayout.from_json(json.dumps(text), "q.h5")
    with pytest.raises(ValueError, match=r"q\.h5: not a row layout"):
        RowLayout.from_json("{}", "q.h5")


# --- RowDistance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("weights", [None, {"global": 2.0, "local": 0.25}], ids=["w1", "w"])
def test_two_part_distance_equals_the_float64_weighted_sum(metric, weights):
    q, g, _ = continuous_case(0)
    distance = RowDistance(stripes.layout(), "global+local", weights, metric)
    w = weights or {"global": 1.0, "local": 1.0}
    expected = combined_float64(q.numpy(), g.numpy(), metric, w["global"], w["local"])
    for chunk in (16384, 20):  # the whole gallery at once, and gallery chunks (a short last one)
        got = distance(q, g, tile=7, gallery_chunk=chunk)
        assert got.dtype == torch.float32 and got.shape == (30, 90)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    local = RowDistance(stripes.layout(), "local", None, metric)(q, g)
    reference = combined_float64(q.numpy(), g.numpy(), metric, 0.0, 1.0)
    np.testing.assert_allclose(local.numpy(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_the_global_part_alone_is_bit_identical_to_pairwise_distance(metric):
    q, g, ids = continuous_case(1)
    qg, gg = q[:, :GLOBAL_DIM].contiguous(), g[:, :GLOBAL_DIM].contiguous()
    want = pairwise_distance(qg, gg, metric)
    assert torch.equal(RowDistance(stripes.layout(), "global", None, metric)(q, g), want)
    assert torch.equal(RowDistance.of_metric(metric)(qg, gg), want)
    assert torch.equal(
        RowDistance(RowLayout.single(GLOBAL_DIM), "global", None, metric)(qg, gg), want
    )
    # ... and ranks exactly as the global features alone
    got = evaluate_features(
        q, g, *ids, metric=RowDistance(stripes.layout(), "global", None, metric)
    )
    plain = evaluate_features(qg, gg, *ids, metric=metric)
    for field in ("cmc", "ap", "inp", "valid"):
        np.testing.assert_array_equal(getattr(got, field), getattr(plain, field))


def test_a_part_the_rows_lack_is_a_config_error_naming_the_key_and_the_declared_parts():
    message = (
        r"evaluation\.distance: 'local' is not a retrieval part of this model \(it declares: "
        r"global\)"
    )
    with pytest.raises(ConfigError, match=message):
        RowDistance(RowLayout.single(8), "global+local")
    with pytest.raises(ConfigError, match=r"evaluation\.distance_weights\.local"):
        RowDistance(stripes.layout(), "global", {"local": 1.0})
    unknown = RowLayout.build({"global": ("bn", METRIC, (4,)), "local": ("local", "nope", (2, 2))})
    with pytest.raises(ConfigError, match=r"part 'local' .*'nope' is not registered"):
        RowDistance(unknown, "local")
    RowDistance(unknown, "global")  # the parts not asked for need no distance


@pytest.mark.parametrize("metric", METRICS)
def test_tiled_evaluation_of_the_weighted_sum_equals_the_full_sort_reference(metric):
    q, g, ids = continuous_case(2, num_q=40, num_g=150)
    distance = RowDistance(stripes.layout(), "global+local", {"local": 0.5}, metric)
    got = evaluate_features(q, g, *ids, metric=distance, max_rank=20, query_tile=9)
    d64 = combined_float64(q.numpy(), g.numpy(), metric, 1.0, 0.5)
    cmc, mAP, mINP, ap, inp, valid = reference_metrics(d64, *ids, 20)
    np.testing.assert_array_equal(got.valid, valid)
    np.testing.assert_allclose(got.cmc, cmc, atol=1e-12)
    np.testing.assert_allclose(got.ap, ap, atol=1e-12)
    np.testing.assert_allclose(got.inp, inp, atol=1e-12)
    assert got.mAP == pytest.approx(mAP, abs=1e-12) and got.mINP == pytest.approx(mINP, abs=1e-12)


def test_only_a_distance_of_one_metric_part_reaches_the_fused_kernel(monkeypatch):
    # The CUDA dispatch with the CPU stand-in kernel and tensors that claim CUDA: "global" of
    # two-part rows is the global columns ranked by the kernel (as the global features alone
    # would be); "global+local" ranks distance tiles, as the CPU does.
    monkeypatch.setattr(ranking_cuda, "kernel_for", lambda backend: DenseKernel)
    monkeypatch.setattr(ranking_cuda, "require_kernel", lambda: DenseKernel)
    widths = []
    for module, name in (
        (ranking_cuda, "evaluate_features_cuda"),
        (sharded_fused, "fused_tile_ranks"),
    ):
        real = getattr(module, name)

        def spy(*args, real=real, name=name):
            features = args[0] if name == "evaluate_features_cuda" else args[2]
            widths.append(features.shape[1])
            return real(*args)

        monkeypatch.setattr(module, name, spy)
    q, g, ids = continuous_case(9)
    cq, cg = q.as_subclass(ClaimsCuda), g.as_subclass(ClaimsCuda)
    qg, gg = (f[:, :GLOBAL_DIM].contiguous().as_subclass(ClaimsCuda) for f in (q, g))
    for fn in (evaluate_features, evaluate_sharded):
        got = fn(cq, cg, *ids, metric=RowDistance(stripes.layout(), "global"), backend="auto")
        want = fn(qg, gg, *ids, metric="cosine", backend="auto")
        np.testing.assert_array_equal(got.ap, want.ap)
        composite = RowDistance(stripes.layout(), "global+local", {"local": 0.5})
        got = fn(cq, cg, *ids, metric=composite, backend="auto")
        want = evaluate_features(q, g, *ids, metric=composite, backend="numpy")
        np.testing.assert_array_equal(got.ap, want.ap)
    assert widths == [GLOBAL_DIM] * 4  # twice per function: the global part and the features


# --- re-ranking -------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("params", [dict(k1=8, k2=3, lambda_value=0.3), dict(k1=5, k2=1)])
def test_rerank_of_the_combined_distance_equals_dense_rerank_of_the_dense_matrix(metric, params):
    q, g, _ = continuous_case(3, num_q=25, num_g=80)
    distance = RowDistance(stripes.layout(), "global+local", {"local": 0.5}, metric)
    got = rerank(q, g, metric=distance, tile=11, **params)
    x = torch.cat([q, g]).numpy()
    d = combined_float64(x, x, metric, 1.0, 0.5).astype(np.float32)  # the combined distance
    n = len(q)
    expected = rerank_dense(d[:n, n:], d[:n, :n], d[n:, n:], **params)
    assert got.dtype == torch.float32 and got.shape == (25, 80)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-6)


def test_rerank_of_the_global_part_alone_is_that_of_the_global_features():
    q, g, _ = continuous_case(4, num_q=20, num_g=60)
    distance = RowDistance(stripes.layout(), "global", None, "euclidean")
    qg, gg = q[:, :GLOBAL_DIM].contiguous(), g[:, :GLOBAL_DIM].contiguous()
    assert torch.equal(rerank(q, g, k1=6, k2=2, metric=distance), rerank(qg, gg, k1=6, k2=2))


# --- HDF5 feature files ---------------------------------------------------------------------------


def write_pair(tmp_path, q, g, ids, layout=None, **attrs):
    q_pids, g_pids, q_cams, g_cams = ids
    common = dict(layout=layout, model="test", **attrs)
    qp = write_feature_file(
        tmp_path / "query.h5", q, q_pids, q_cams, [f"q{i}" for i in range(len(q))], **common
    )
    gp = write_feature_file(
        tmp_path / "gallery.h5", g, g_pids, g_cams, [f"g{i}" for i in range(len(g))], **common
    )
    return qp, gp


@pytest.mark.parametrize("metric", METRICS)
def test_streamed_two_part_files_rank_as_in_memory_rows(tmp_path, metric):
    q, g, ids = tied_case(5, metric)
    attrs = dict(metric=metric, distance="global+local", distance_weights='{"local": 0.5}')
    qp, gp = write_pair(tmp_path, q, g, ids, stripes.layout(), **attrs)
    with h5py.File(qp) as f:
        assert RowLayout.from_json(f.attrs["layout"]) == stripes.layout()
    for distance, weights in (("global+local", {"local": 0.5}), ("local", None), ("global", None)):
        if distance == "global+local":  # the files' own distance and weights
            got = evaluate_feature_files(qp, gp, max_rank=20, query_tile=7, gallery_chunk=13)
        else:
            got = evaluate_feature_files(qp, gp, None, 20, 7, 13, distance, weights)
        row_distance = RowDistance(stripes.layout(), distance, weights, metric)
        want = evaluate_features(q, g, *ids, metric=row_distance, max_rank=20)
        for field in ("cmc", "ap", "inp", "valid"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_a_file_written_without_a_layout_is_one_global_part(tmp_path):
    q, g, ids = continuous_case(6)
    q, g = q[:, :GLOBAL_DIM], g[:, :GLOBAL_DIM]
    qp, gp = write_pair(tmp_path, q, g, ids, metric="euclidean")  # the format before layouts
    with h5py.File(qp) as f:
        assert "layout" not in f.attrs and "distance" not in f.attrs
    got = evaluate_feature_files(qp, gp, gallery_chunk=17)
    want = evaluate_features(q, g, *ids, metric="euclidean")
    np.testing.assert_array_equal(got.ap, want.ap)
    with pytest.raises(ConfigError, match=r"'local' is not a retrieval part of the features in"):
        evaluate_feature_files(qp, gp, distance="global+local")


def test_cli_eval_of_two_part_files_takes_the_distance_and_its_weights(tmp_path, capsys):
    q, g, ids = continuous_case(7)
    qp, gp = write_pair(tmp_path, q, g, ids, stripes.layout(), metric="cosine")
    argv = ["eval", "--query-features", str(qp), "--gallery-features", str(gp), "--out"]
    args = ["--distance", "global+local", "--distance-weight", "local=0.5"]
    assert main([*argv, str(tmp_path / "r"), *args]) == 0
    saved = json.loads((tmp_path / "r/results.json").read_text())
    distance = RowDistance(stripes.layout(), "global+local", {"local": 0.5}, "cosine")
    want = evaluate_features(q, g, *ids, metric=distance)
    assert saved["mAP"] == pytest.approx(want.mAP, abs=1e-12)
    assert main([*argv, str(tmp_path / "x"), "--distance-weight", "local"]) == 2
    assert main([*argv, str(tmp_path / "x"), "--distance", "stripes"]) == 2
    assert "'stripes' is not a retrieval part" in capsys.readouterr().err


# --- extraction -----------------------------------------------------------------------------------


class TwoPartModel(nn.Module):
    """A global feature ("bn", 4-d) and STRIPES stripe features of CHANNELS ("local"), from the
    image's mean colour and its rows' mean colours; declares both as retrieval parts."""

    def __init__(self):
        super().__init__()
        self.retrieval_parts = {
            "global": RetrievalPart("bn"),
            "local": RetrievalPart("local", stripes.NAME),
        }
        torch.manual_seed(0)
        self.embed = nn.Linear(3, GLOBAL_DIM)
        self.stripe = nn.Linear(3, stripes.CHANNELS)

    def forward(self, images):
        pooled = images.mean(dim=(2, 3))
        rows = nn.functional.adaptive_avg_pool2d(images, (stripes.STRIPES, 1)).flatten(2)
        return {"bn": self.embed(pooled), "local": self.stripe(rows.transpose(1, 2)), "x": pooled}


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_extracted_rows_hold_every_declared_part_each_flip_averaged(flip):
    model = TwoPartModel()
    rng = np.random.default_rng(8)
    images = [
        torch.from_numpy(rng.standard_normal((n, 3, 6, 4)).astype(np.float32)) for n in (3, 2)
    ]
    loader = [(x, torch.arange(len(x)), torch.zeros(len(x))) for x in images]
    rows, _, _ = extract_features(model, loader, "cpu", flip=flip)
    with torch.no_grad():
        x = torch.cat(images)
        parts = []
        for key in ("bn", "local"):
            f = model(x)[key]
            if flip:
                f = (f + model(x.flip(-1))[key]) / 2
            parts.append(f.flatten(1))
    torch.testing.assert_close(rows, torch.cat(parts, dim=1))
    layout = probe_layout(model, 6, 4, "cpu")
    assert layout == stripes.layout() == retrieval_layout(model, model(x))
