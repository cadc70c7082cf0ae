"""CACE-Net's conditional re-scoring (evaluation.rescore_k, issue 19) against a brute force written
here: every query's top-K by the single-image cosine distance (numpy), each candidate's pair
distance from the model one pair at a time, the final list built in plain Python and CMC / AP /
INP under a plain-Python Market protocol; K = 0 is the single-image path exactly; 2 and 3 gloo
ranks give one process's numbers; the refusals."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_reid.config import ConfigError
from hpc_reid.data.build import dataset_on_ranks
from hpc_reid.data.loaders import build_backend_test_loader
from hpc_reid.engine.evaluate import evaluate_model, evaluation_distance, shard_features
from hpc_reid.evaluation import evaluate_features
from hpc_reid.methods.cace.model import normalized_pair_distance
from hpc_reid.methods.cace.rescore import rescore_ranking
from hpc_reid.models import build_model
from tests.ports import free_port
from tests.tiny import tiny_config as tiny

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
CACE = ["sampler.num_identities=4", "sampler.num_instances=2", "model.backbone=osnet_x0_25"]


def tiny_config(tmp: Path, *extra: str):
    return tiny(tmp, "configs/synthetic/cace.yaml", *CACE, *extra)


def cace_model(config, num_classes: int) -> torch.nn.Module:
    """A random cace model whose pair graph conditions (its output conv is zero at init, which
    would make the pair distance a function of the single-image one and leave the order as it
    is)."""
    torch.manual_seed(0)
    model = build_model(config.model, num_classes)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.pair_graph.out.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cace_rescore")
    config = tiny_config(tmp)
    dataset = dataset_on_ranks(config.data, True, announce=lambda _: None)
    return tmp, dataset, cace_model(config, dataset.num_train_pids)


# ------------------------------------------------------------------------------ the reference


def market_metrics(order, q_pid, q_cam, g_pids, g_cams):
    """(first positive's rank or None, AP, INP) of one query's ranked gallery list ``order``,
    junk (same pid and camera) skipped, as Market-1501's evaluation does."""
    kept = [g for g in order if not (g_pids[g] == q_pid and g_cams[g] == q_cam)]
    hits = [r + 1 for r, g in enumerate(kept) if g_pids[g] == q_pid]
    if not hits:
        return None, None, None
    ap = sum((i + 1) / r for i, r in enumerate(hits)) / len(hits)
    return hits[0], ap, len(hits) / hits[-1]


def brute_force(model, dataset, config, k: int, flip: bool) -> dict[str, float]:
    """Summary of the re-scored ranking, one query and one candidate at a time."""

    def images(records):
        loader = build_backend_test_loader(records, config.loader, 64, 32, CPU)
        return torch.cat([b["images"] for b in loader])

    with torch.no_grad():
        qx, gx = images(dataset.query), images(dataset.gallery)

        def feats(x):
            f = model(x)["bn"]
            return (f + model(x.flip(-1))["bn"]) / 2 if flip else f

        qf, gf = feats(qx).double().numpy(), feats(gx).double().numpy()
        qf /= np.linalg.norm(qf, axis=1, keepdims=True)
        gf /= np.linalg.norm(gf, axis=1, keepdims=True)
        g_pids = [r.pid for r in dataset.gallery]
        g_cams = [r.camid for r in dataset.gallery]
        firsts, aps, inps = [], [], []
        for q, record in enumerate(dataset.query):
            d = 1 - gf @ qf[q]
            single = sorted(range(len(gf)), key=lambda g: (d[g], g))
            qmap = model.backbone(qx[q : q + 1])
            pair = {}
            for g in single[:k]:
                f0, f1 = model.head.pair_features(qmap, model.backbone(gx[g : g + 1]))
                pair[g] = float(normalized_pair_distance(f0, f1))
            top = sorted(single[:k], key=lambda g: (pair[g], single.index(g)))
            first, ap, inp = market_metrics(
                top + single[k:], record.pid, record.camid, g_pids, g_cams
            )
            if first is not None:
                firsts.append(first), aps.append(ap), inps.append(inp)
    out = {f"rank-{r}": np.mean([f <= r for f in firsts]) for r in (1, 5, 10, 20)}
    return {**out, "mAP": np.mean(aps), "mINP": np.mean(inps)}


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("k,flip", [(5, False), (5, True), (10_000, False)])
def test_rescored_metrics_equal_a_brute_force_per_pair_loop_and_market_protocol(tiny_set, k, flip):
    """K = 5 with and without flip averaging (the top-K from flip-averaged features, the pair
    distance from un-flipped maps), and K beyond the gallery (the whole list re-scored)."""
    tmp, dataset, model = tiny_set
    config = tiny_config(
        tmp, f"evaluation.rescore_k={k}", f"evaluation.flip_average={str(flip).lower()}"
    )
    summary = evaluate_model(model, dataset, config, CPU)
    expected = brute_force(model, dataset, config, min(k, len(dataset.gallery)), flip)
    assert {key: summary[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    plain = evaluate_model(model, dataset, tiny_config(tmp, f"evaluation.flip_average={flip}"), CPU)
    # the single-image metrics beside them; without_flip/ (image-only, not re-scored) as before
    assert {key: summary[f"without_rescore/{key}"] for key in expected} == {
        key: plain[key] for key in expected
    }
    assert {key: v for key, v in summary.items() if key.startswith("without_flip/")} == {
        key: v for key, v in plain.items() if key.startswith("without_flip/")
    }
    assert summary["mAP"] != plain["mAP"]  # the pairs did re-order: the check can fail


def test_rescore_k_zero_is_the_single_image_ranking_exactly(tiny_set):
    """K = 0: evaluate_model's summary is the single-image path's (no without_rescore keys), and
    the re-scorer's per-query results with K = 0 are those of the single-image distances."""
    tmp, dataset, model = tiny_set
    config = tiny_config(tmp, "evaluation.rescore_k=0")
    summary = evaluate_model(model, dataset, config, CPU)
    qf = shard_features(model, dataset.query, config, CPU)
    gf = shard_features(model, dataset.gallery, config, CPU)
    distance = evaluation_distance(model, config, CPU)
    labels = [
        np.array([getattr(r, a) for r in s])
        for a in ("pid", "camid")
        for s in (dataset.query, dataset.gallery)
    ]
    plain = evaluate_features(qf, gf, labels[0], labels[1], labels[2], labels[3], metric=distance)
    assert summary == plain.summary()
    result = rescore_ranking(model, dataset, config, qf, gf, distance, CPU)
    np.testing.assert_array_equal(result.ap, plain.ap)
    np.testing.assert_array_equal(result.inp, plain.inp)
    np.testing.assert_array_equal(result.cmc, plain.cmc)


def _rescore_rank(rank: int, world: int, port: int, tmp: str, out: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = tiny_config(Path(tmp), "evaluation.rescore_k=6", "evaluation.rescore_batch=4")
        dataset = dataset_on_ranks(config.data, rank == 0, announce=lambda _: None)
        model = cace_model(config, dataset.num_train_pids)
        model.load_state_dict(torch.load(Path(tmp) / "model.pt"))
        out[rank] = evaluate_model(model, dataset, config, CPU)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_rescoring_on_gloo_ranks_equals_one_process(tiny_set, world):
    """Queries sharded by rank (3 ranks: uneven shares), candidates 4 images a batch: every rank
    returns one process's summary."""
    tmp, dataset, model = tiny_set
    torch.save(model.state_dict(), tmp / "model.pt")
    config = tiny_config(tmp, "evaluation.rescore_k=6", "evaluation.rescore_batch=4")
    expected = evaluate_model(model, dataset, config, CPU)
    out = mp.Manager().dict()
    mp.spawn(_rescore_rank, args=(world, free_port(), str(tmp), out), nprocs=world, join=True)
    for rank in range(world):
        assert out[rank] == pytest.approx(expected, abs=1e-12)


def test_rescoring_a_head_without_pair_features_is_refused_naming_key_and_head(tmp_path):
    config = tiny(tmp_path, "configs/synthetic/bot.yaml", "evaluation.rescore_k=10")
    dataset = dataset_on_ranks(config.data, True, announce=lambda _: None)
    model = build_model(config.model, dataset.num_train_pids)
    with pytest.raises(ConfigError, match=r"evaluation.rescore_k=10.*'bnneck' head"):
        evaluate_model(model, dataset, config, CPU)


def test_rescoring_with_k_reciprocal_reranking_is_refused(tiny_set):
    tmp, dataset, model = tiny_set
    config = tiny_config(tmp, "evaluation.rescore_k=10", "evaluation.rerank.enabled=true")
    with pytest.raises(ConfigError, match=r"evaluation.rescore_k=10 with evaluation.rerank"):
        evaluate_model(model, dataset, config, CPU)
