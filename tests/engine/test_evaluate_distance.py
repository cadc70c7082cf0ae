"""The trainer's evaluation follows evaluation.distance over the parts the model declares: a part
the model lacks is a ConfigError before any extraction; a model of two parts is ranked (and
re-ranked) with their weighted sum."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpc_reid.config import ConfigError, ModelConfig, load_config
from hpc_reid.data.datasets.base import ImageRecord
from hpc_reid.engine import evaluate
from hpc_reid.evaluation.rerank import rerank_dense
from hpc_reid.models import build_model
from tests.evaluation.reference import reference_metrics
from tests.evaluation.stripes import combined_float64
from tests.evaluation.test_parts import TwoPartModel

NUM_Q, NUM_G = 12, 45


def test_a_model_without_local_features_asked_for_local_fails_before_extraction(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("evaluation read images before checking evaluation.distance")

    for name in ("build_backend_test_loader", "extract_features", "probe_layout"):
        monkeypatch.setattr(evaluate, name, no_work)
    model = build_model(ModelConfig(backbone="osnet_x0_25"), 5)  # the baseline
    config = load_config(None, ["evaluation.distance=global+local"])
    dataset = SimpleNamespace(query=[], gallery=[])
    message = (
        r"evaluation\.distance: 'local' is not a retrieval part of this model \(it declares: "
        r"global\)"
    )
    with pytest.raises(ConfigError, match=message):
        evaluate.evaluate_model(model, dataset, config, torch.device("cpu"))
    with pytest.raises(ConfigError, match=message):  # the trainer's check when it builds the model
        evaluate.check_evaluation_distance(model, config)
    evaluate.check_evaluation_distance(model, load_config(None, ["evaluation.distance=global"]))


def images_of(records: list[ImageRecord]) -> torch.Tensor:
    """A fixed random image per record (its path is its index), small: the model pools it."""
    index = [int(r.path) for r in records]
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((NUM_Q + NUM_G, 3, 6, 4)).astype(np.float32)
    return torch.from_numpy(pool[index])


def records(start: int, n: int, seed: int) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    pids, cams = rng.integers(0, 6, n), rng.integers(0, 3, n)
    return [
        ImageRecord(str(start + i), int(p), int(c))
        for i, (p, c) in enumerate(zip(pids, cams, strict=True))
    ]


@pytest.mark.parametrize("rerank", [False, True], ids=["plain", "rerank"])
def test_a_two_part_model_is_ranked_with_the_weighted_sum_of_its_parts(monkeypatch, rerank):
    def loader(recs, *args):  # batches of 5, as a test loader gives them
        batches = [recs[i : i + 5] for i in range(0, len(recs), 5)]
        return [(images_of(b), [r.pid for r in b], [r.camid for r in b]) for b in batches]

    monkeypatch.setattr(evaluate, "build_backend_test_loader", loader)
    model = TwoPartModel()
    dataset = SimpleNamespace(query=records(0, NUM_Q, 1), gallery=records(NUM_Q, NUM_G, 2))
    sets = ["evaluation.distance=global+local", "evaluation.distance_weights.local=0.5"]
    sets += ["evaluation.metric=euclidean", "evaluation.plots=false"]
    sets += [f"evaluation.rerank.enabled={str(rerank).lower()}", "evaluation.rerank.k1=6"]
    sets += ["evaluation.rerank.k2=3"]
    config = load_config(None, sets)
    summary = evaluate.evaluate_model(model, dataset, config, torch.device("cpu"))
    # the reference: the model's parts, their float64 weighted sum, ranked by a full sort
    with torch.no_grad():
        out = model(images_of(dataset.query + dataset.gallery))
    rows = torch.cat([out["bn"], out["local"].flatten(1)], dim=1).numpy()
    q, g = dataset.query, dataset.gallery
    ids = [np.array([r.pid for r in q]), np.array([r.pid for r in g])]
    ids += [np.array([r.camid for r in q]), np.array([r.camid for r in g])]
    d = combined_float64(rows, rows, "euclidean", 1.0, 0.5)
    distmat = d[:NUM_Q, NUM_Q:]
    if rerank:
        n = NUM_Q
        distmat = rerank_dense(distmat, d[:n, :n], d[n:, n:], k1=6, k2=3, lambda_value=0.3)
    _, mAP, mINP, *_ = reference_metrics(distmat, *ids, 50)
    assert summary["mAP"] == pytest.approx(mAP, abs=1e-9)
    assert summary["mINP"] == pytest.approx(mINP, abs=1e-9)
    assert ("without_rerank/mAP" in summary) == rerank
