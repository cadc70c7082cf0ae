"""CACE-Net's training side (issue 19): the pair graph against a per-pair loop written out in
float64 (chunked and not), the attention's form, the pair index convention, the mixed-up ID loss,
the pair triplet and the normalised triplet against direct formulas, and a tiny CACE model training
one step with all four terms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpc_reid.config import load_config
from hpc_reid.engine.trainer import train
from hpc_reid.losses import ReidLoss
from hpc_reid.methods.cace import CaceHead, PairGraph, pair_index
from hpc_reid.methods.cace.losses import mixed_up_id_loss, pair_labels, pair_triplet_loss
from hpc_reid.methods.cace.pair_graph import correspondence_attention
from hpc_reid.models import build_head, build_model
from tests.tiny import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CACE = [
    "model.head=cace",
    "loss.center.weight=0",
    "loss.triplet.normalize=true",
    "loss.triplet.margin=0.5",
    "loss.pair_id.weight=1",
    "loss.pair_triplet.weight=1",
]


def cace_config(*extra: str):
    return load_config(REPO / "configs/synthetic/bot.yaml", [*CACE, *extra])


# ------------------------------------------------------------------------------ the pair graph


def reference_pair(left, right, theta, g, w_o, min_degree=1e-3):
    """One pair written out from the released PairGraph's formulas in plain torch (float64): the
    two maps side by side along the width, nodes in row-major order, D, D^-1/2 (detached) and L
    formed as matrices."""
    c, h, width = left.shape
    p = torch.cat([left, right], dim=2)  # (C, H, 2W)
    nodes = p.reshape(c, -1)  # (C, N), node n = row * 2W + column
    y = theta @ nodes
    y = y / y.norm(dim=0, keepdim=True).clamp(min=1e-12)
    a = torch.relu(y.T @ y) * (1 - torch.eye(nodes.shape[1], dtype=y.dtype))
    d = a.sum(dim=1)
    s = torch.where(d > min_degree, d, torch.ones_like(d)).pow(-0.5).detach()
    lap = torch.diag(s) @ (torch.diag(d) - a) @ torch.diag(s)
    out = (nodes + w_o @ (g @ nodes) @ lap).reshape(c, h, 2 * width)
    return out[..., :width], out[..., width:]


def random_graph(channels=6, attention=3, chunk=64, seed=0) -> PairGraph:
    torch.manual_seed(seed)
    graph = PairGraph(channels, attention, chunk).double()
    with torch.no_grad():
        graph.out.weight.normal_()  # zero at init: a non-zero W_o to see the message
    return graph


def random_maps(b=3, c=6, h=3, w=2, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    maps[1, :, 0, 1] = 0.0  # a cell no other attends to: degree 0, counted as 1
    return maps


def test_pair_graph_values_and_gradients_equal_the_released_formulas_pair_by_pair():
    graph = random_graph(chunk=4)
    maps = random_maps()
    b = maps.shape[0]
    i, j = pair_index(b)
    x = maps.clone().requires_grad_(True)
    p0, p1 = graph(x, j, i)
    weights = [graph.theta.weight, graph.g.weight, graph.out.weight]
    probe = torch.randn(2, *p0.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    grads = torch.autograd.grad((p0 * probe[0]).sum() + (p1 * probe[1]).sum(), [x, *weights])

    xr = maps.clone().requires_grad_(True)
    wr = [w.detach()[:, :, 0, 0].clone().requires_grad_(True) for w in weights]
    total = 0.0
    for k in range(b * b):
        ref0, ref1 = reference_pair(xr[k % b], xr[k // b], *wr)
        torch.testing.assert_close(p0[k], ref0, rtol=0, atol=1e-12)
        torch.testing.assert_close(p1[k], ref1, rtol=0, atol=1e-12)
        total = total + (ref0 * probe[0, k]).sum() + (ref1 * probe[1, k]).sum()
    ref_grads = torch.autograd.grad(total, [xr, *wr])
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=0, atol=1e-11)
    for got, ref in zip(grads[1:], ref_grads[1:], strict=True):
        torch.testing.assert_close(got[:, :, 0, 0], ref, rtol=0, atol=1e-11)
    # the message did change the maps (the comparison is not of P with P)
    assert (p0 - maps[j]).abs().amax() > 0.1


@pytest.mark.parametrize("chunk", [1, 4, 9])
def test_pair_graph_values_and_gradients_are_the_same_chunked_and_unchunked(chunk):
    """Several chunks under grad also recompute each chunk in the backward pass (checkpointing):
    values and every gradient equal those of one chunk of all 9 pairs."""
    maps = random_maps()
    i, j = pair_index(maps.shape[0])
    results = []
    for size in (9, chunk):
        graph = random_graph(chunk=size)
        x = maps.clone().requires_grad_(True)
        p0, p1 = graph(x, j, i, reduce=lambda m: torch.cat([m.mean((2, 3)), m.amax((2, 3))], 1))
        weights = torch.arange(p0.numel(), dtype=p0.dtype).reshape(p0.shape).sin()
        ((p0 * weights).sum() + (p1 * weights.flip(0)).sum()).backward()
        grads = [x.grad] + [p.grad for p in graph.parameters()]
        results.append((p0.detach(), p1.detach(), grads))
    (a0, a1, ga), (b0, b1, gb) = results
    torch.testing.assert_close(b0, a0, rtol=0, atol=1e-13)
    torch.testing.assert_close(b1, a1, rtol=0, atol=1e-13)
    for x, y in zip(ga, gb, strict=True):
        assert x.abs().sum() > 0
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)


def test_correspondence_attention_is_symmetric_relu_cosine_without_self_edges():
    g = torch.Generator().manual_seed(2)
    y = F.normalize(torch.randn(4, 5, 7, generator=g, dtype=torch.float64), dim=1)
    a = correspondence_attention(y)
    cos = np.einsum("mcn,mcl->mnl", y.numpy(), y.numpy())
    assert (cos < 0).any()  # ReLU has something to cut
    for m in range(4):
        assert np.all(np.diag(a[m].numpy()) == 0.0)  # no self-edges
        for n in range(7):
            for ell in range(7):
                expected = 0.0 if n == ell else max(cos[m, n, ell], 0.0)
                assert a[m, n, ell].item() == pytest.approx(expected, abs=1e-14)
    torch.testing.assert_close(a, a.transpose(1, 2), rtol=0, atol=1e-15)


def test_zero_initialised_output_leaves_each_pair_its_two_maps_exactly():
    torch.manual_seed(0)
    graph = PairGraph(6, None, chunk=4)  # attention_dim None: 6 // 16 -> at least 1
    assert graph.attention_dim == 1 and torch.all(graph.out.weight == 0)
    maps = random_maps().float()
    i, j = pair_index(3)
    p0, p1 = graph(maps, j, i)
    assert torch.equal(p0, maps[j]) and torch.equal(p1, maps[i])


def test_pair_k_puts_image_k_mod_b_left_and_image_k_div_b_right_with_labels_y_i_y_j():
    b = 4
    i, j = pair_index(b)
    assert i.tolist() == [k // b for k in range(b * b)]
    assert j.tolist() == [k % b for k in range(b * b)]
    # the released get_pair_feature: x.repeat(b) on the left, x.repeat_interleave(b) on the right
    x = torch.arange(b)
    assert torch.equal(x[j], x.repeat(b)) and torch.equal(x[i], x.repeat_interleave(b))
    pids = torch.tensor([7, 3, 7, 5])
    y_i, y_j = pair_labels(pids)
    assert y_i.tolist() == [int(pids[k // b]) for k in range(b * b)]
    assert y_j.tolist() == [int(pids[k % b]) for k in range(b * b)]


def test_head_pairs_at_init_are_the_single_features_of_image_j_and_image_i():
    """W_o = 0 at init, so the halves are the images' own maps: in training, f0 of pair (i, j) is
    f of image j and f1 that of image i (each image appears B times in the B^2 pairs, so the
    pairs' BN batch statistics equal the single images'); in eval, pair_features(a, b) gives f(a),
    f(b), broadcasting one query map against its candidates."""
    cfg = cace_config("model.cace.embedding_dim=8", "model.cace.pooling=gem").model
    torch.manual_seed(0)
    head = build_head("cace", 16, 5, cfg).double()
    assert isinstance(head, CaceHead)
    maps = torch.rand(4, 16, 3, 2, generator=torch.Generator().manual_seed(3)).double()
    out = head.train()(maps)
    f = out["global"]
    f0 = out["pair_feat0"].view(4, 4, -1)
    f1 = out["pair_feat1"].view(4, 4, -1)
    for i in range(4):
        for j in range(4):
            torch.testing.assert_close(f0[i, j], f[j], rtol=0, atol=1e-10)
            torch.testing.assert_close(f1[i, j], f[i], rtol=0, atol=1e-10)
    head.eval()
    with torch.no_grad():
        f = head(maps)["bn"]
        a, b = head.pair_features(maps[:1], maps[1:])
    torch.testing.assert_close(a, f[:1].expand(3, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(b, f[1:], rtol=0, atol=1e-12)


def test_head_computes_the_pairs_i_le_j_and_equals_all_ordered_pairs_computed():
    """The head sends B(B + 1)/2 pairs through the graph and mirrors the rest: its pair features
    and gradients equal those of all B^2 ordered pairs computed one by one."""
    cfg = cace_config("model.cace.embedding_dim=8", "model.cace.pair_chunk=4").model
    torch.manual_seed(0)
    head = build_head("cace", 16, 5, cfg).double().train()
    with torch.no_grad():
        head.pair_graph.out.weight.normal_()
    maps = torch.rand(5, 16, 3, 2, generator=torch.Generator().manual_seed(8)).double()
    seen = []
    head.pair_graph.register_forward_hook(lambda m, args, out: seen.append(args[1].shape[0]))
    probe = torch.randn(2, 25, 8, generator=torch.Generator().manual_seed(9), dtype=maps.dtype)
    results = []
    for mirrored in (True, False):
        x = maps.clone().requires_grad_(True)
        if mirrored:
            out = head(x)
            f0, f1 = out["pair_feat0"], out["pair_feat1"]
        else:
            i, j = pair_index(5)
            pooled0, pooled1 = head.pair_graph(x, j, i, reduce=head.pool)
            f0, f1 = head.bn(head.embedding(pooled0)), head.bn(head.embedding(pooled1))
        loss = (f0 * probe[0]).sum() + (f1 * probe[1]).sum()
        grads = torch.autograd.grad(loss, [x, head.pair_graph.theta.weight, head.embedding.weight])
        results.append((f0.detach(), f1.detach(), grads))
    assert seen == [15, 25]
    (a0, a1, ga), (b0, b1, gb) = results
    torch.testing.assert_close(a0, b0, rtol=0, atol=1e-12)
    torch.testing.assert_close(a1, b1, rtol=0, atol=1e-12)
    for got, ref in zip(ga, gb, strict=True):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------ the losses


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def ce(logits: np.ndarray, label: int, eps: float) -> float:
    logp = log_softmax(logits)
    return float(-(1 - eps) * logp[label] - eps * logp.mean())


@pytest.mark.parametrize("alpha,eps", [(0.9, 0.0), (0.7, 0.1)])
def test_mixed_up_id_loss_equals_the_released_per_pair_formula(alpha, eps):
    rng = np.random.default_rng(4)
    b, classes = 4, 6
    pids = np.array([1, 1, 4, 2])
    l0, l1 = rng.normal(size=(2, b * b, classes)) * 3
    expected0 = expected1 = 0.0
    for i in range(b):
        for j in range(b):
            k = i * b + j
            # f0_k: image j conditioned on i; f1_k: image i conditioned on j
            expected0 += alpha * ce(l0[k], pids[j], eps) + (1 - alpha) * ce(l0[k], pids[i], eps)
            expected1 += alpha * ce(l1[k], pids[i], eps) + (1 - alpha) * ce(l1[k], pids[j], eps)
    expected = (expected0 + expected1) / (b * b)
    value = mixed_up_id_loss(torch.tensor(l0), torch.tensor(l1), torch.tensor(pids), alpha, eps)
    assert value.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("exclude_diagonal", [True, False])
def test_pair_triplet_equals_batch_hard_on_the_conditioned_distance_matrix(exclude_diagonal):
    rng = np.random.default_rng(5)
    b, d, margin = 6, 5, 0.5
    pids = np.array([0, 0, 1, 1, 2, 2])
    f0, f1 = rng.normal(size=(2, b * b, d))
    n0 = f0 / np.linalg.norm(f0, axis=1, keepdims=True)
    n1 = f1 / np.linalg.norm(f1, axis=1, keepdims=True)
    dm = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            dm[i, j] = np.linalg.norm(n0[i * b + j] - n1[i * b + j])
    terms = []
    for i in range(b):
        pos = [
            dm[i, j] for j in range(b) if pids[j] == pids[i] and (j != i or not exclude_diagonal)
        ]
        neg = [dm[i, j] for j in range(b) if pids[j] != pids[i]]
        terms.append(max(max(pos) - min(neg) + margin, 0.0))
    expected = float(np.mean(terms))
    value = pair_triplet_loss(
        torch.tensor(f0), torch.tensor(f1), torch.tensor(pids), margin, exclude_diagonal
    )
    assert value.item() == pytest.approx(expected, rel=1e-12)
    other = pair_triplet_loss(
        torch.tensor(f0), torch.tensor(f1), torch.tensor(pids), margin, not exclude_diagonal
    )
    assert other.item() != pytest.approx(expected, rel=1e-6)  # the diagonal is in the data's way


def test_pair_terms_name_a_batch_whose_pairs_do_not_match_its_pids():
    with pytest.raises(ValueError, match=r"loss.pair_id: 9 pair rows for \(4,\) pids"):
        mixed_up_id_loss(
            torch.zeros(9, 3), torch.zeros(9, 3), torch.zeros(4, dtype=torch.long), 0.9
        )
    with pytest.raises(ValueError, match=r"loss.pair_triplet: 16 pair rows for \(3,\) pids"):
        pair_triplet_loss(torch.zeros(16, 3), torch.zeros(16, 3), torch.zeros(3), 0.5)


@pytest.mark.parametrize("normalize", [True, False])
def test_triplet_term_with_normalize_is_batch_hard_on_unit_features(normalize):
    rng = np.random.default_rng(6)
    pids = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    feats = rng.normal(size=(8, 5))
    feats *= rng.uniform(0.2, 5.0, size=(8, 1))  # norms that differ, as an unnormalised BN output
    cfg = cace_config(
        f"loss.triplet.normalize={str(normalize).lower()}",
        "loss.ce.weight=0",
        "loss.pair_id.weight=0",
        "loss.pair_triplet.weight=0",
    ).loss
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True) if normalize else feats
    terms = []
    for a in range(8):
        dist = np.linalg.norm(x[a] - x, axis=1)
        pos = max(dist[p] for p in range(8) if pids[p] == pids[a] and p != a)
        neg = min(dist[n] for n in range(8) if pids[n] != pids[a])
        terms.append(max(pos - neg + 0.5, 0.0))
    outputs = {"global": torch.tensor(feats)}
    _, parts = ReidLoss(cfg, 4, 5)(outputs, torch.tensor(pids))
    assert parts["triplet"].item() == pytest.approx(float(np.mean(terms)), rel=1e-12)


# ------------------------------------------------------------------------------ in training


def test_a_tiny_cace_model_trains_a_step_with_all_four_terms_and_ranks_with_f_alone(tmp_path):
    config = tiny_config(
        tmp_path,
        "configs/synthetic/bot.yaml",
        *CACE,
        "model.backbone=osnet_x0_25",
        "model.cace.embedding_dim=32",
        "model.cace.pair_chunk=5",  # 16 pairs: 4 chunks, checkpointed
        "logging.log_every=1",
        "logging.run_name=c",
        "evaluation.at_start=false",
    )
    train(config, max_steps=1)
    lines = (tmp_path / "runs/c/metrics.jsonl").read_text().splitlines()
    step = next(r for r in map(json.loads, lines) if r["kind"] == "train")
    for term in ("ce", "triplet", "pair_id", "pair_triplet"):
        assert np.isfinite(step[term]) and step[term] > 0, term
    assert "center" not in step

    torch.manual_seed(0)
    model = build_model(config.model, num_classes=8).eval()
    calls = []
    model.head.pair_graph.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 32))
    assert set(out) == {"global", "bn"} and not calls  # no pairs at test time
    assert torch.equal(out["bn"], out["global"]) and out["bn"].shape == (3, 32)
    assert model.retrieval_parts["global"].key == "bn"


def test_cace_meta_names_its_shape_for_checkpoints():
    head = build_head("cace", 64, 3, cace_config("model.cace.attention_dim=8").model)
    assert head.meta == {
        "head": "cace",
        "embedding_dim": 768,
        "cace_pooling": "concat",
        "attention_dim": 8,
    }
    assert head.embedding.in_features == 128 and head.feature_dim == 768
    assert head.output_keys >= {"logits", "pair_logits0", "pair_logits1", "pair_feat0"}
