"""HDF5 feature files: writing, joining parts, and the streamed evaluation (gallery chunks smaller
than the gallery) equal to evaluate_features and to the full-sort reference."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from hpc_reid.cli import main
from hpc_reid.evaluation import evaluate_features
from hpc_reid.evaluation.feature_files import (
    FORMAT_VERSION,
    FeatureFileError,
    concatenate_feature_files,
    evaluate_feature_files,
    write_feature_file,
)
from tests.evaluation.reference import reference_metrics
from tests.evaluation.test_sharded import (
    assert_same_result,
    make_case,
    reference_distances,
)


def write_case(tmp_path, qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine"):
    q = write_feature_file(
        tmp_path / "query.h5",
        qf,
        q_pids,
        q_cams,
        [f"q{i}.jpg" for i in range(len(qf))],
        metric=metric,
        model="test",
        split="query",
    )
    g = write_feature_file(
        tmp_path / "gallery.h5",
        gf,
        g_pids,
        g_cams,
        [f"g{i}.jpg" for i in range(len(gf))],
        metric=metric,
        model="test",
        split="gallery",
    )
    return q, g


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk,tile", [(13, 7), (1, 1024), (1000, 5)])
def test_streamed_evaluation_equals_reference_with_ties(tmp_path, metric, chunk, tile):
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(3, metric)
    q, g = write_case(tmp_path, qf, gf, q_pids, g_pids, q_cams, g_cams, metric)
    r = evaluate_feature_files(q, g, max_rank=20, query_tile=tile, gallery_chunk=chunk)
    d = reference_distances(qf, gf, metric)
    assert_same_result(r, *reference_metrics(d, q_pids, g_pids, q_cams, g_cams, 20))


def test_streamed_evaluation_equals_evaluate_features_on_continuous_features(tmp_path):
    rng = np.random.default_rng(1)
    qf, gf = rng.standard_normal((60, 16)), rng.standard_normal((500, 16))
    q_pids, g_pids = rng.integers(0, 30, 60), rng.integers(0, 30, 500)
    q_cams, g_cams = rng.integers(0, 3, 60), rng.integers(0, 3, 500)
    q, g = write_case(tmp_path, qf, gf, q_pids, g_pids, q_cams, g_cams, "euclidean")
    r = evaluate_feature_files(q, g, gallery_chunk=64, query_tile=16)  # metric from the file
    single = evaluate_features(
        torch.from_numpy(qf).float(),
        torch.from_numpy(gf).float(),
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        metric="euclidean",
    )
    np.testing.assert_allclose(r.cmc, single.cmc, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.ap, single.ap, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.inp, single.inp, rtol=0, atol=1e-6)


def test_parts_join_in_order_with_empty_parts_and_attributes(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((10, 3)).astype(np.float32)
    pids, cams = np.arange(10) * 3, np.arange(10) % 2
    paths = [f"img{i}.jpg" for i in range(10)]
    cuts = [0, 0, 4, 4, 10]  # parts 0 and 2 are empty, written with no feature width
    parts = []
    for i in range(4):
        s = slice(cuts[i], cuts[i + 1])
        f = feats[s] if cuts[i] < cuts[i + 1] else np.zeros((0, 0))
        parts.append(
            write_feature_file(tmp_path / f"p{i}.h5", f, pids[s], cams[s], paths[s], metric="x")
        )
    out = concatenate_feature_files(parts, tmp_path / "all.h5", chunk_rows=3)
    with h5py.File(out) as h:
        np.testing.assert_array_equal(h["features"][:], feats)
        np.testing.assert_array_equal(h["pids"][:], pids)
        np.testing.assert_array_equal(h["camids"][:], cams)
        assert [p.decode() for p in h["paths"][:]] == paths
        assert h["features"].dtype == np.float32
        assert h.attrs["metric"] == "x" and h.attrs["format_version"] == FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_a_file_of_another_format_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as h:
        h["features"] = np.zeros((2, 2))
    with pytest.raises(FeatureFileError, match="hpc-reid extract"):
        evaluate_feature_files(tmp_path / "other.h5", tmp_path / "other.h5")
    with pytest.raises(FeatureFileError, match="cannot open"):
        evaluate_feature_files(tmp_path / "missing.h5", tmp_path / "other.h5")


def test_cli_eval_of_feature_files_prints_and_writes_results(tmp_path, capsys):
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_case(4, "cosine")
    q, g = write_case(tmp_path, qf, gf, q_pids, g_pids, q_cams, g_cams)
    argv = ["eval", "--query-features", str(q), "--gallery-features", str(g)]
    assert main([*argv, "--max-rank", "20", "--gallery-chunk", "32", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for key in ("rank-1", "rank-5", "rank-10", "rank-20", "mAP", "mINP"):
        assert key in printed
    results = json.loads((tmp_path / "results.json").read_text())
    d = reference_distances(qf, gf, "cosine")
    _, mAP, mINP, *_ = reference_metrics(d, q_pids, g_pids, q_cams, g_cams, 20)
    assert results["mAP"] == pytest.approx(mAP, abs=1e-6)
    assert results["mINP"] == pytest.approx(mINP, abs=1e-6)
    assert len(results["cmc"]) == 20
    assert main(["eval", "--query-features", str(q)]) == 2  # the gallery is missing
    assert main([*argv[:3], "--gallery-features", str(tmp_path / "nope.h5")]) == 2
