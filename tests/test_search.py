"""``hpc-reid index`` and ``hpc-reid search`` (hpc_reid/deploy/): the exact index ranks a gallery
as the evaluation does, sharding changes nothing, IVF-PQ's build-time recall is what its searches
give, and search end to end on a tiny checkpoint returns extract's ranking, with its refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from hpc_reid.cli import main
from hpc_reid.deploy.index import (
    GalleryIndexError,
    IndexSettings,
    index_files,
    open_index,
    recall_at_k,
    write_gallery_index,
)
from hpc_reid.evaluation.distances import RowDistance, evaluate_features, pairwise_distance
from hpc_reid.evaluation.feature_files import write_feature_file
from hpc_reid.evaluation.parts import RowLayout

# --- references --------------------------------------------------------------------------------


def numpy_distances(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    """The evaluation's distances written out in float64: 1 - cos, or ||q - g||."""
    q, g = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        return 1.0 - qn @ gn.T
    return np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))


def assert_same_order(got: np.ndarray, want: np.ndarray, dist: np.ndarray, tol: float = 1e-5):
    """Each query's ranked gallery rows equal, ties aside: wherever they differ, the two rows at
    that rank are at distances within ``tol`` of each other (by the reference ``dist``)."""
    assert got.shape == want.shape
    for q in range(len(want)):
        assert sorted(got[q]) == sorted(want[q])
        differ = got[q] != want[q]
        np.testing.assert_allclose(dist[q, got[q][differ]], dist[q, want[q][differ]], atol=tol)


def protocol_metrics(ranked, q_pids, g_pids, q_cams, g_cams, max_rank):
    """CMC and mAP of ranked gallery lists by the Market-1501 protocol, written as loops: skip
    the query's same-pid same-camera items, then the first positive's rank and AP."""
    cmc, aps = np.zeros(max_rank), []
    for q, order in enumerate(ranked):
        kept = [g for g in order if not (g_pids[g] == q_pids[q] and g_cams[g] == q_cams[q])]
        hits = [i for i, g in enumerate(kept) if g_pids[g] == q_pids[q]]
        if not hits:
            continue
        cmc[hits[0] :] += 1
        aps.append(np.mean([(n + 1) / (i + 1) for n, i in enumerate(hits)]))
    return cmc / len(aps), float(np.mean(aps))


def random_case(seed: int, num_q: int = 24, num_g: int = 300, dim: int = 32):
    rng = np.random.default_rng(seed)
    qf = rng.standard_normal((num_q, dim)).astype(np.float32)
    gf = rng.standard_normal((num_g, dim)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 12, num_q), rng.integers(0, 12, num_g)
    q_cams, g_cams = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def gallery_file(path, gf, pids, cams, metric="cosine", layout=None):
    names = [f"g{i:04d}.jpg" for i in range(len(gf))]
    return write_feature_file(path, gf, pids, cams, names, layout=layout, metric=metric)


# --- the exact index -----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_index_ranks_the_gallery_as_evaluate_features(tmp_path, metric):
    qf, gf, q_pids, g_pids, q_cams, g_cams = random_case(0)
    gallery = gallery_file(tmp_path / "gallery.h5", gf, g_pids, g_cams, metric)
    write_gallery_index(gallery, tmp_path / "g.index", IndexSettings(chunk_rows=64))
    index = open_index(tmp_path / "g.index")
    dist, ranked = index.search(qf, len(gf))
    # the evaluation's distance (what evaluate_features ranks by, ties by gallery index)
    evaluation = pairwise_distance(torch.from_numpy(qf), torch.from_numpy(gf), metric).numpy()
    want = np.argsort(evaluation, axis=1, kind="stable")
    reference = numpy_distances(qf, gf, metric)
    assert_same_order(ranked, want, reference)
    np.testing.assert_allclose(dist, np.take_along_axis(reference, ranked, 1), atol=1e-5)
    # the ranked lists give evaluate_features' CMC and mAP through the protocol written as loops
    result = evaluate_features(
        torch.from_numpy(qf), torch.from_numpy(gf), q_pids, g_pids, q_cams, g_cams, metric, 20
    )
    cmc, m_ap = protocol_metrics(ranked, q_pids, g_pids, q_cams, g_cams, 20)
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-12)
    assert result.mAP == pytest.approx(m_ap, abs=1e-12)


def test_exact_index_of_global_and_local_rows_ranks_the_global_part(tmp_path):
    qf, gf, _, g_pids, _, g_cams = random_case(1, dim=16)
    rng = np.random.default_rng(2)
    local_q = rng.standard_normal((len(qf), 4 * 8)).astype(np.float32)
    local_g = rng.standard_normal((len(gf), 4 * 8)).astype(np.float32)
    layout = RowLayout.build(
        {"global": ("bn", "metric", (16,)), "local": ("local", "dmli", (4, 8))}
    )
    rows_q, rows_g = np.hstack([qf, local_q]), np.hstack([gf, local_g])
    gallery = gallery_file(tmp_path / "gallery.h5", rows_g, g_pids, g_cams, layout=layout)
    record = write_gallery_index(gallery, tmp_path / "g.index")
    assert record["part"] == {"name": "global", "key": "bn", "columns": [0, 16]}
    _, ranked = open_index(tmp_path / "g.index").search(qf, len(gf))
    distance = RowDistance(layout, "global", metric="cosine")  # evaluation.distance=global
    evaluation = distance(torch.from_numpy(rows_q), torch.from_numpy(rows_g)).numpy()
    assert_same_order(ranked, np.argsort(evaluation, 1, kind="stable"), evaluation)
    with pytest.raises(GalleryIndexError, match="part distance 'dmli'"):
        write_gallery_index(gallery, tmp_path / "l.index", part="local")
    only_local = RowLayout.build({"local": ("local", "dmli", (4, 8))})
    dmli = gallery_file(tmp_path / "dmli.h5", local_g, g_pids, g_cams, layout=only_local)
    with pytest.raises(GalleryIndexError, match=r"local \(distance dmli\).*none of its parts"):
        write_gallery_index(dmli, tmp_path / "d.index")


@pytest.mark.parametrize("kind", ["exact", "ivf-pq"])
def test_sharded_build_equals_the_one_shard_build(tmp_path, kind):
    _, gf, _, g_pids, _, g_cams = random_case(3, num_g=500)
    gallery = gallery_file(tmp_path / "gallery.h5", gf, g_pids, g_cams)
    ivf = dict(nlist=8, m=4, nbits=4, recall_queries=50) if kind == "ivf-pq" else {}
    one = write_gallery_index(gallery, tmp_path / "one", IndexSettings(kind, **ivf))
    three = write_gallery_index(
        gallery, tmp_path / "three", IndexSettings(kind, shards=3, chunk_rows=37, **ivf)
    )
    assert three["shards"] == 3 and three["rows"] == one["rows"] == 500
    assert three.get("recall") == one.get("recall")
    a, b = open_index(tmp_path / "one"), open_index(tmp_path / "three")
    assert a.index.ntotal == b.index.ntotal == 500
    if kind == "exact":  # the stored rows themselves, in row order
        np.testing.assert_array_equal(a.index.reconstruct_n(0, 500), b.index.reconstruct_n(0, 500))
    queries = np.random.default_rng(4).standard_normal((10, 32)).astype(np.float32)
    for x, y in zip(a.search(queries, 50), b.search(queries, 50), strict=True):
        np.testing.assert_array_equal(x, y)


def test_index_files_hold_each_rows_path_pid_and_camera(tmp_path):
    _, gf, _, g_pids, _, g_cams = random_case(5, num_g=40)
    gallery = gallery_file(tmp_path / "gallery.h5", gf, g_pids, g_cams)
    write_gallery_index(gallery, tmp_path / "g.index", IndexSettings(chunk_rows=7))
    index = open_index(tmp_path / "g.index")
    rows = np.array([39, 0, 7, 7, 13])
    paths, pids, cams = index.labels(rows)
    assert paths == [f"g{i:04d}.jpg" for i in rows]
    np.testing.assert_array_equal(pids, g_pids[rows])
    np.testing.assert_array_equal(cams, g_cams[rows])
    assert not list(tmp_path.glob(".*"))  # no temporary file left


# --- IVF-PQ recall -------------------------------------------------------------------------------


def test_recall_at_k_is_the_mean_overlap_of_top_k_lists():
    rng = np.random.default_rng(6)
    # ranked lists hold distinct rows; the exact ones may end with -1 (fewer rows than k)
    approx = np.stack([rng.permutation(30)[:10] for _ in range(20)])
    exact = np.stack([rng.permutation(30)[:10] for _ in range(20)])
    exact[0, 7:] = -1
    for k in (1, 5, 10):
        pairs = zip(approx, exact, strict=True)
        want = np.mean([len(set(a[:k]) & set(e[:k][e[:k] >= 0])) / k for a, e in pairs])
        assert recall_at_k(approx, exact, k) == pytest.approx(want)


def low_rank_rows(seed: int, n: int = 800, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 6)) @ rng.standard_normal((6, dim))).astype(np.float32)


def test_ivf_pq_recall_is_measured_against_exact_search_and_high_on_easy_data(tmp_path, capsys):
    gf = low_rank_rows(7)
    n = len(gf)
    gallery = gallery_file(tmp_path / "gallery.h5", gf, np.arange(n), np.zeros(n, int))
    # every row a recall query, so that the test can recompute what the build measured; m = D
    # scalar-quantises each column with 256 levels and nprobe = nlist visits every cell: easy
    argv = ["index", "--features", str(gallery), "--out", str(tmp_path / "easy.index")]
    argv += ["--kind", "ivf-pq", "--nlist", "4", "--m", "32", "--nprobe", "4"]
    assert main([*argv, "--recall-queries", str(n), "--chunk-rows", "100"]) == 0
    easy = json.loads((tmp_path / "easy.index.json").read_text())
    assert "recall@1 " in capsys.readouterr().out
    assert set(easy["recall"]) == {"1", "10", "100"} and easy["recall_queries"] == n
    _, approx = open_index(tmp_path / "easy.index").search(gf, 100)
    exact = np.argsort(numpy_distances(gf, gf, "cosine"), axis=1, kind="stable")[:, :100]
    for k in (1, 10, 100):
        pairs = zip(approx, exact, strict=True)
        overlap = np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in pairs])
        assert easy["recall"][str(k)] == pytest.approx(overlap, abs=2e-3)  # near-ties aside
        assert 0.9 <= easy["recall"][str(k)] <= 1.0
    hard = write_gallery_index(
        gallery, tmp_path / "hard.index", IndexSettings("ivf-pq", nlist=16, m=2, nbits=4, nprobe=1)
    )
    for k in ("1", "10", "100"):
        assert 0.0 <= hard["recall"][k] < easy["recall"][k]


# --- refusals of index ---------------------------------------------------------------------------


def test_index_refuses_inputs_it_cannot_index(tmp_path, capsys):
    _, gf, _, g_pids, _, g_cams = random_case(8, num_g=60, dim=30)
    gallery = gallery_file(tmp_path / "gallery.h5", gf, g_pids, g_cams)
    empty = write_feature_file(tmp_path / "empty.h5", np.zeros((0, 30)), [], [], [])
    (tmp_path / "junk.h5").write_text("not HDF5")
    out = ["--out", str(tmp_path / "x.index")]
    cases = [
        (["--features", str(empty)], "holds no rows"),
        (["--features", str(tmp_path / "junk.h5")], "cannot open feature file"),
        (["--features", str(gallery), "--kind", "ivf-pq", "--m", "7"], "--m 7 must divide .* 30"),
        (["--features", str(gallery), "--kind", "ivf-pq"], "training needs 256..60 rows"),
        (["--features", str(gallery), "--shards", "61"], "--shards 61 for a gallery of 60"),
        (["--features", str(gallery), "--part", "local"], "no retrieval part 'local'"),
    ]
    for argv, message in cases:
        assert main(["index", *argv, *out]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("hpc-reid: error: ") and re.search(message, err), err
    assert not list(tmp_path.glob("x.index*"))


# --- search end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A tiny checkpoint, its extracted query and gallery files, and the exact gallery index."""
    from hpc_reid.engine.checkpoint import CheckpointManager
    from hpc_reid.engine.trainer import train
    from tests.engine.test_trainer import tiny_config

    tmp = tmp_path_factory.mktemp("search")
    train(tiny_config(tmp, "logging.run_name=s"), max_steps=1)
    checkpoint = CheckpointManager(tmp / "runs/s").latest()
    assert main(["extract", "--checkpoint", str(checkpoint), "--out-dir", str(tmp / "f")]) == 0
    argv = ["index", "--features", str(tmp / "f/gallery.h5"), "--out", str(tmp / "g.index")]
    assert main(argv) == 0
    return tmp, checkpoint


def read_features(path):
    with h5py.File(path) as f:
        return f["features"][:], [p.decode() for p in f["paths"][:]], f["pids"][:], f["camids"][:]


def test_search_with_a_checkpoint_returns_extracts_ranking_as_json_and_png(deployed, tmp_path):
    tmp, checkpoint = deployed
    qf, q_paths, _, _ = read_features(tmp / "f/query.h5")
    gf, g_paths, g_pids, g_cams = read_features(tmp / "f/gallery.h5")
    top = 5
    argv = ["search", "--model", str(checkpoint), "--index", str(tmp / "g.index")]
    argv += ["--image", q_paths[0], q_paths[3], "--top", str(top), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    dist = numpy_distances(qf, gf, "cosine")
    for q in (0, 3):
        name = q_paths[q].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        record = json.loads((tmp_path / f"out/{name}.json").read_text())
        assert record["query"].endswith(q_paths[q].rsplit("/", 1)[-1])
        assert record["metric"] == "cosine" and record["kind"] == "exact"
        results = record["results"]
        assert [r["rank"] for r in results] == list(range(1, top + 1))
        want = np.argsort(dist[q], kind="stable")[:top]  # extract's row of the same image
        assert_same_order(np.array([[r["row"] for r in results]]), want[None], dist[q][None])
        for r in results:
            assert r["path"] == g_paths[r["row"]] and r["camid"] == g_cams[r["row"]]
            assert r["pid"] == (g_pids[r["row"]] if g_pids[r["row"]] >= 0 else None)
            assert r["distance"] == pytest.approx(dist[q, r["row"]], abs=1e-4)
        with Image.open(tmp_path / f"out/{name}.png") as im:
            assert im.size == (64 + 12 + top * (64 + 2) - 2, 128 + 26)
            # the first ranked cell shows the gallery image, framed grey
            cell = np.asarray(im.convert("RGB"))[:128, 76:140]
            assert tuple(cell[0, 0]) == (150, 150, 150)


def test_search_reads_a_query_folder_and_skips_other_files(deployed, tmp_path):
    tmp, checkpoint = deployed
    _, q_paths, _, _ = read_features(tmp / "f/query.h5")
    folder = tmp_path / "queries"
    folder.mkdir()
    for p in q_paths[:3]:
        shutil.copy(p, folder / p.rsplit("/", 1)[-1])
    (folder / "notes.txt").write_text("not a query")
    argv = ["search", "--model", str(checkpoint), "--index", str(tmp / "g.index"), "--top", "3"]
    assert main([*argv, "--query-dir", str(folder), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*.json"))) == 3
    assert len(list((tmp_path / "o").glob("*.png"))) == 3


def write_empty_index(path):
    """An index of no rows, with its id map and settings as `hpc-reid index` writes them."""
    index_path, ids_path, json_path = index_files(path)
    faiss.write_index(faiss.IndexFlatIP(8), str(index_path))
    with h5py.File(ids_path, "w") as f:
        f.create_dataset("pids", shape=(0,), dtype=np.int64)
        f.attrs["build_id"] = "b"
    record = {"format_version": 1, "build_id": "b", "rows": 0, "metric": "cosine", "kind": "exact"}
    json_path.write_text(json.dumps({**record, "part": {"name": "global"}}))


def test_search_refuses_bad_inputs_with_clear_errors(deployed, tmp_path, capsys):
    tmp, checkpoint = deployed
    _, q_paths, _, _ = read_features(tmp / "f/query.h5")
    not_image = tmp_path / "q.jpg"
    not_image.write_text("text, not JPEG")
    other = gallery_file(tmp_path / "other.h5", np.ones((50, 7)), np.arange(50), np.zeros(50, int))
    write_gallery_index(other, tmp_path / "other.index")
    shutil.copy(tmp / "g.index", tmp_path / "no_ids.index")
    shutil.copy(tmp / "g.index.json", tmp_path / "no_ids.index.json")
    write_empty_index(tmp_path / "empty.index")
    model = ["--model", str(checkpoint)]
    image = ["--image", q_paths[0]]
    cases = [
        ([*model, "--index", str(tmp / "g.index"), "--image", str(not_image)], "not an image"),
        ([*model, "--index", str(tmp / "g.index"), "--image", "nope.jpg"], "does not exist"),
        ([*model, "--index", str(tmp_path / "other.index"), *image], "holds 7-d rows"),
        ([*model, "--index", str(tmp_path / "empty.index"), *image], "is empty"),
        ([*model, "--index", str(tmp_path / "no_ids.index"), *image], "missing id map file"),
        ([*model, "--index", str(tmp / "g.index")], "give query images with --image"),
        ([*model, "--index", str(tmp / "g.index"), *image, "--top", "0"], "--top 0"),
        (
            ["--model", "m.onnx", "--index", str(tmp / "g.index"), *image, "--set", "x.y=1"],
            "--config and --set apply to a checkpoint",
        ),
    ]
    for argv, message in cases:
        assert main(["search", *argv, "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("hpc-reid: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_search_with_an_onnx_export_ranks_as_the_eager_model(deployed, tmp_path):
    from hpc_reid.deploy.search import resized_images
    from hpc_reid.engine.saved import saved_model
    from hpc_reid.evaluation.parts import part_features
    from hpc_reid.export import export_checkpoint

    tmp, checkpoint = deployed
    _, q_paths, _, _ = read_features(tmp / "f/query.h5")
    gf, g_paths, _, _ = read_features(tmp / "f/gallery.h5")
    model_path = tmp_path / "m.onnx"
    export_checkpoint(checkpoint, model_path, dynamic_batch=True)
    queries = [q_paths[1], q_paths[4], q_paths[5]]
    argv = ["search", "--model", str(model_path), "--index", str(tmp / "g.index"), "--top", "6"]
    assert main([*argv, "--image", *queries, "--out", str(tmp_path / "out")]) == 0
    # the eager model on the same bilinearly resized pixels, normalised here
    with saved_model(checkpoint) as (config, _, _, _, model):
        augment = config.loader.augment
        images = resized_images(
            [Path(p) for p in queries],
            config.data.height,
            config.data.width,
            augment.mean,
            augment.std,
        )
        with torch.inference_mode():
            rows = part_features(model.eval(), model(images))["global"].numpy()
    dist = numpy_distances(rows, gf, "cosine")
    for q, path in enumerate(queries):
        name = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        record = json.loads((tmp_path / f"out/{name}.json").read_text())
        assert record["model"].startswith(f"ONNX model {model_path}")
        got = np.array([[r["row"] for r in record["results"]]])
        want = np.argsort(dist[q], kind="stable")[None, :6]
        assert_same_order(got, want, dist[q][None], tol=1e-4)
        for r in record["results"]:
            assert r["distance"] == pytest.approx(dist[q, r["row"]], abs=1e-4)
            assert r["path"] == g_paths[r["row"]]
        assert (tmp_path / f"out/{name}.png").stat().st_size > 0


def test_search_with_an_alignedreid_checkpoint_ranks_by_its_global_part(tmp_path):
    from hpc_reid.engine.checkpoint import CheckpointManager
    from hpc_reid.engine.trainer import train
    from tests.engine.test_extract_parts import aligned_config

    train(aligned_config(tmp_path), max_steps=1)
    checkpoint = CheckpointManager(tmp_path / "runs/a").latest()
    assert main(["extract", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "f")]) == 0
    argv = ["index", "--features", str(tmp_path / "f/gallery.h5"), "--out", str(tmp_path / "i")]
    assert main(argv) == 0
    qf, q_paths, _, _ = read_features(tmp_path / "f/query.h5")
    gf, _, _, _ = read_features(tmp_path / "f/gallery.h5")
    with h5py.File(tmp_path / "f/gallery.h5") as f:
        width = RowLayout.from_json(f.attrs["layout"]).part("global").width
    assert json.loads((tmp_path / "i.json").read_text())["part"]["columns"] == [0, width]
    assert width < gf.shape[1]  # the local stripes follow the global feature in each row
    argv = ["search", "--model", str(checkpoint), "--index", str(tmp_path / "i"), "--top", "4"]
    assert main([*argv, "--image", q_paths[2], "--out", str(tmp_path / "o"), "--no-picture"]) == 0
    dist = numpy_distances(qf[2:3, :width], gf[:, :width], "cosine")
    name = q_paths[2].rsplit("/", 1)[-1].rsplit(".", 1)[0]
    record = json.loads((tmp_path / f"o/{name}.json").read_text())
    got = np.array([[r["row"] for r in record["results"]]])
    assert_same_order(got, np.argsort(dist, 1, kind="stable")[:, :4], dist)
    assert not (tmp_path / f"o/{name}.png").exists()
