"""AlignedReID's mutual learning (model.members, loss.mutual_*): the three terms against direct
float64 formulas for 2 and 3 members; the gradient each member receives from the summed loss of
one optimizer against member-by-member losses with detached peers (huanghoujing's train_ml.py,
one optimizer per model); the members' model (distinct initial weights, the flat outputs layout,
member 0 in eval mode, its meta); config errors; and a tiny end-to-end run that trains,
checkpoints, resumes exactly and evaluates member 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_reid.config import ConfigError, LossConfig, load_config
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.errors import CheckpointError
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import model_meta, train
from hpc_reid.losses import (
    ReidLoss,
    batch_hard_triplet_loss,
    label_smoothing_cross_entropy,
)
from hpc_reid.methods.alignedreid import mutual  # noqa: F401  (registers loss.mutual_*)
from hpc_reid.methods.alignedreid.dmli import dmli_matrix
from hpc_reid.methods.alignedreid.local_triplet import local_triplet_loss
from hpc_reid.models import ReidModel, build_model
from tests.tiny import TINY_BATCH, TINY_DATA

REPO = Path(__file__).resolve().parents[2]
MUTUAL = ("mutual_prob", "mutual_global", "mutual_local")
KEYS = ("global", "bn", "logits", "local")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------- references (float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference_pm(logits: list[np.ndarray]) -> float:
    """sum_i sum_{j != i} sum_b KL(p_j[b] || p_i[b]) / ((K - 1) N), KL written out."""
    k, n = len(logits), len(logits[0])
    p = [_softmax(x) for x in logits]
    total = 0.0
    for i in range(k):
        for j in range(k):
            if j != i:
                total += float((p[j] * (np.log(p[j]) - np.log(p[i]))).sum())
    return total / ((k - 1) * n)


def reference_euclidean(x: np.ndarray) -> np.ndarray:
    """Pairwise distances, the square clamped at 1e-12 (the diagonal: 1e-6), as the losses do."""
    n = len(x)
    return np.array(
        [[math.sqrt(max(((x[a] - x[b]) ** 2).sum(), 1e-12)) for b in range(n)] for a in range(n)]
    )


def reference_dmli(f: np.ndarray, g: np.ndarray) -> float:
    """Shortest right/down path through d_ij = (e^x - 1) / (e^x + 1) of the stripe distances
    (Zhang et al., arXiv 1711.08184), a plain DP; the squared distance clamped as above."""
    s = len(f)
    table = [[0.0] * s for _ in range(s)]
    for i in range(s):
        for j in range(s):
            e = math.sqrt(max(float(((f[i] - g[j]) ** 2).sum()), 1e-12))
            d = (math.exp(e) - 1.0) / (math.exp(e) + 1.0)
            before = [table[i - 1][j]] if i else []
            before += [table[i][j - 1]] if j else []
            table[i][j] = d + (min(before) if before else 0.0)
    return table[-1][-1]


def reference_distance_mutual(matrices: list[np.ndarray]) -> float:
    """sum_i sum_{j != i} sum_ab (D_i - D_j)_ab^2 / ((K - 1) N^2)."""
    k, n = len(matrices), len(matrices[0])
    total = sum(
        ((matrices[i] - matrices[j]) ** 2).sum() for i in range(k) for j in range(k) if j != i
    )
    return float(total) / ((k - 1) * n * n)


# --------------------------------------------------------------------------- helpers


def _members(k: int, seed: int, n: int = 8, classes: int = 4, dim: int = 6, stripes: int = 3):
    """k members' outputs (float64 leaves) for a batch of n images of ``classes`` identities."""
    g = torch.Generator().manual_seed(seed)
    members = []
    for _ in range(k):
        out = {
            "global": torch.randn(n, dim, generator=g, dtype=torch.float64),
            "logits": 3 * torch.randn(n, classes, generator=g, dtype=torch.float64),
            "local": torch.randn(n, stripes, 5, generator=g, dtype=torch.float64),
        }
        out["bn"] = out["global"].clone()
        members.append({key: v.requires_grad_() for key, v in out.items()})
    pids = torch.arange(n) % classes
    return members, pids


def _flat(members: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The layout a MutualModel returns: member 0 under its keys, member i under members.i.*."""
    return {ReidLoss.member_key(i, k): v for i, m in enumerate(members) for k, v in m.items()}


def _loss_config(**weights: float) -> LossConfig:
    sections = {name: {"weight": 0.0} for name in ("ce", "triplet", "center")}
    sections.update({name: {"weight": w} for name, w in weights.items()})
    return LossConfig.model_validate(sections)


# ------------------------------------------------------------------------- term values


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_mutual_term_equals_its_direct_formula_for_2_and_3_members(k, seed):
    members, pids = _members(k, seed)
    outputs = _flat(members)
    as_np = {key: [m[key].detach().numpy() for m in members] for key in KEYS}
    expected = {
        "mutual_prob": reference_pm(as_np["logits"]),
        "mutual_global": reference_distance_mutual(
            [reference_euclidean(x) for x in as_np["global"]]
        ),
        "mutual_local": reference_distance_mutual(
            [np.array([[reference_dmli(a, b) for b in x] for a in x]) for x in as_np["local"]]
        ),
    }
    for name in MUTUAL:
        loss = ReidLoss(_loss_config(**{name: 0.7}), 4, 6, output_keys=outputs.keys())
        total, parts = loss(outputs, pids)
        assert set(parts) == {name}
        assert parts[name].item() == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
        assert total.item() == pytest.approx(0.7 * expected[name], rel=1e-9, abs=1e-12), name
        assert expected[name] > 1e-3  # random members differ: a zero would prove nothing


def test_mutual_terms_vanish_between_identical_members():
    members, pids = _members(1, seed=3)
    twin = {k: v.detach().clone().requires_grad_() for k, v in members[0].items()}
    outputs = _flat([members[0], twin])
    loss = ReidLoss(_loss_config(**dict.fromkeys(MUTUAL, 1.0)), 4, 6, outputs.keys())
    _, parts = loss(outputs, pids)
    for name in MUTUAL:
        assert parts[name].item() == pytest.approx(0.0, abs=1e-12), name


# --------------------------------------------------------------------------- gradients

WEIGHTS = {
    "ce": 0.9,
    "triplet": 1.1,
    "center": 0.05,
    "local_triplet": 0.8,
    "mutual_prob": 0.6,
    "mutual_global": 1.3,
    "mutual_local": 0.7,
}


def _member_by_member_loss(i, members, pids, centers) -> torch.Tensor:
    """Member i's loss as its own optimizer sees it in the reference: its own terms on its own
    outputs, plus its mutual terms with every peer's outputs detached (written out here)."""
    me = members[i]
    peers = [m for j, m in enumerate(members) if j != i]
    k, n = len(members), len(pids)
    own = (
        WEIGHTS["ce"] * label_smoothing_cross_entropy(me["logits"], pids, 0.1)
        + WEIGHTS["triplet"] * batch_hard_triplet_loss(me["global"], pids, 0.3)
        + WEIGHTS["center"] * ((me["global"] - centers[i][pids]) ** 2).sum(1).mean()
        + WEIGHTS["local_triplet"] * local_triplet_loss(me["local"], me["global"], pids, 0.3)
    )
    log_p = torch.log_softmax(me["logits"], 1)
    pm = sum(
        (q.exp() * (q - log_p)).sum()
        for q in (torch.log_softmax(p["logits"].detach(), 1) for p in peers)
    ) / ((k - 1) * n)

    def dist(x):
        return (x[:, None] - x[None]).pow(2).sum(-1).clamp(min=1e-12).sqrt()

    def local(x):
        return dmli_matrix(x, x)

    gdm = sum((dist(me["global"]) - dist(p["global"]).detach()).pow(2).sum() for p in peers) / (
        (k - 1) * n * n
    )
    ldm = sum((local(me["local"]) - local(p["local"]).detach()).pow(2).sum() for p in peers) / (
        (k - 1) * n * n
    )
    mutual_terms = WEIGHTS["mutual_prob"] * pm + WEIGHTS["mutual_global"] * gdm
    return own + mutual_terms + WEIGHTS["mutual_local"] * ldm


@pytest.mark.parametrize("k", [2, 3])
def test_each_member_gets_the_gradient_of_its_own_loss_with_detached_peers(k):
    """d(sum of every member's loss)/d(member i) = d(loss_i with detached peers)/d(member i), for
    its outputs (hence its parameters, which reach no other member's outputs) and its centers."""
    members, pids = _members(k, seed=7)
    outputs = _flat(members)
    cfg = LossConfig.model_validate(
        {name: {"weight": w} for name, w in WEIGHTS.items()}
        | {"ce": {"weight": WEIGHTS["ce"], "label_smoothing": 0.1}}
    )
    torch.manual_seed(0)
    loss = ReidLoss(cfg, 4, 6, output_keys=outputs.keys()).double()
    assert len(loss.center) == k  # one set of centers a member
    centers = [c.centers for c in loss.center]
    total, parts = loss(outputs, pids)
    assert set(parts) == set(WEIGHTS)
    for i in range(k):
        leaves = [members[i][key] for key in ("global", "logits", "local")] + [centers[i]]
        joint = torch.autograd.grad(total, leaves, retain_graph=True)
        alone = torch.autograd.grad(_member_by_member_loss(i, members, pids, centers), leaves)
        for key, a, b in zip(("global", "logits", "local", "centers"), joint, alone, strict=True):
            assert b.abs().max() > 1e-6, (i, key)  # a gradient to compare
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"member {i}, {key}")
    # the objective is the members' losses summed
    expected = sum(_member_by_member_loss(i, members, pids, centers) for i in range(k))
    torch.testing.assert_close(total, expected, rtol=1e-9, atol=1e-12)


def test_each_members_parameters_get_the_gradient_of_its_own_loss_with_detached_peers():
    """The same on a built model of 2 members: the parameter gradients of the summed loss of one
    optimizer equal, member by member, those of its own loss (its own forward) with its peers'
    outputs computed without gradient, as the reference's per-model optimizers receive them."""
    config = _model_config("model.members=2", "loss.center.weight=0.05")
    cfg = LossConfig.model_validate(
        {name: {"weight": w} for name, w in WEIGHTS.items()}
        | {"ce": {"weight": WEIGHTS["ce"], "label_smoothing": 0.1}}
    )
    torch.manual_seed(4)
    model = build_model(config.model, 4).train()
    loss = ReidLoss(cfg, 4, model.feature_dim, model.output_keys)
    x = torch.randn(8, 3, 64, 32, generator=torch.Generator().manual_seed(5))
    pids = torch.arange(8) % 4
    total, _ = loss(model(x), pids)
    centers = [c.centers for c in loss.center]
    for i, member in enumerate(model.members):
        params = [p for p in member.parameters() if p.requires_grad]
        joint = torch.autograd.grad(total, params, retain_graph=True)
        with torch.no_grad():
            others = [m(x) for m in model.members]
        others[i] = member(x)
        alone = torch.autograd.grad(_member_by_member_loss(i, others, pids, centers), params)
        assert max(b.abs().max() for b in alone) > 1e-4
        for a, b in zip(joint, alone, strict=True):
            # equal up to float32 reordering, relative to each gradient's scale: the grad-mode and
            # no_grad forwards may take other kernels (3e-6 of a 2.7 gradient on an Intel Xeon)
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=f"member {i}")


# ------------------------------------------------------------------------------- model


def _model_config(*extra: str):
    return load_config(
        REPO / "configs/synthetic/alignedreid.yaml",
        [*TINY_DATA, "engine.device=cpu", "model.local.stripes=4", *extra],
    )


def test_members_start_from_their_own_weights_member_0_as_a_single_model_would():
    single = _model_config().model
    two = _model_config("model.members=2").model
    torch.manual_seed(11)
    alone = build_model(single, 8)
    torch.manual_seed(11)
    model = build_model(two, 8)
    assert isinstance(alone, ReidModel) and len(model.members) == 2
    first, second = model.members[0].state_dict(), model.members[1].state_dict()
    for key, value in alone.state_dict().items():
        assert torch.equal(first[key], value), key
    learned = [k for k, v in first.items() if v.is_floating_point() and v.numel() > 1]
    assert any(not torch.equal(first[k], second[k]) for k in learned)
    # what the trainer reads: member 0's declarations, and the member count in the meta
    assert model.feature_dim == alone.feature_dim
    assert model.retrieval_parts == alone.retrieval_parts
    config = _model_config("model.members=2")
    assert model_meta(config, 8, model) == {
        **model_meta(_model_config(), 8, alone),
        "members": 2,
    }


def test_training_outputs_are_every_members_flat_and_eval_outputs_member_0s():
    config = _model_config("model.members=3")
    torch.manual_seed(2)
    model = build_model(config.model, 8)
    x = torch.randn(4, 3, 64, 32)
    model.train()
    outputs = model(x)
    assert set(outputs) == set(model.output_keys)
    assert all(isinstance(v, torch.Tensor) for v in outputs.values())  # the trainer's .float()
    split = ReidLoss.member_outputs(outputs)
    assert len(split) == 3
    for member, out in zip(model.members, split, strict=True):
        alone = member(x)
        assert set(out) == set(alone)
        for key in alone:
            torch.testing.assert_close(out[key], alone[key], msg=key)
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
        reference = model.members[0](x)
    assert set(evaluated) == set(reference)
    for key in reference:
        assert torch.equal(evaluated[key], reference[key]), key


# ------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("name", MUTUAL)
def test_a_mutual_term_with_one_member_is_a_config_error_naming_both_keys(name):
    with pytest.raises(ConfigError, match=rf"loss\.{name}\.weight=1\.0.*model\.members=1"):
        _model_config(f"loss.{name}.weight=1")
    # built without a Config (the keys named by the loss, from the model's outputs)
    members, pids = _members(1, seed=0)
    cfg = _loss_config(**{name: 1.0})
    with pytest.raises(ConfigError, match=rf"loss\.{name}.*model\.members=1"):
        ReidLoss(cfg, 4, 6, output_keys=members[0].keys())
    with pytest.raises(ConfigError, match=rf"loss\.{name}.*model\.members=1"):
        ReidLoss(cfg, 4, 6)(members[0], pids)


def test_a_term_with_state_built_for_one_member_refuses_the_outputs_of_two():
    """Without the model's output keys the criterion has one set of centers; two members'
    outputs are then refused, not trained against one member's centers."""
    members, pids = _members(2, seed=0)
    loss = ReidLoss(_loss_config(center=0.1), 4, 6).double()
    with pytest.raises(ValueError, match=r"loss\.center keeps state for 1 member.*2 members"):
        loss(_flat(members), pids)


def test_members_below_one_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.members"):
        _model_config("model.members=0")


def test_mutual_local_on_a_head_without_stripes_is_refused_naming_the_term_and_the_output():
    config = _model_config("model.head=bnneck", "model.members=2", "loss.local_triplet.weight=0")
    model = build_model(config.model, 8)
    cfg = _loss_config(mutual_local=1.0)
    with pytest.raises(ConfigError, match=r"loss\.mutual_local reads the model output 'local'"):
        ReidLoss(cfg, 8, model.feature_dim, model.output_keys, "bnneck")


# ----------------------------------------------------------------------------- end to end


def _tiny_run(tmp_path: Path, name: str, *extra: str):
    return load_config(
        REPO / "configs/synthetic/alignedreid.yaml",
        [
            *TINY_DATA,
            *TINY_BATCH,
            "model.local.stripes=4",
            "schedule.epochs=2",
            "schedule.milestones=[2]",
            "schedule.warmup_epochs=1",
            "evaluation.every_epochs=0",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            "logging.log_every=1",
            "engine.device=cpu",
            f"data.synthetic.cache_dir={tmp_path / 'cache'}",
            f"logging.output_dir={tmp_path / 'runs'}",
            f"logging.run_name={name}",
            *extra,
        ],
    )


def test_two_members_train_checkpoint_resume_exactly_and_evaluate_member_0(tmp_path):
    """2 epochs of 4 steps: straight, and split at step 3 then resumed with resume="auto"; the
    same weights and centers of both members, and the final evaluation is member 0's."""
    two = ["model.members=2", "loss.mutual_global.weight=1"]
    straight = train(_tiny_run(tmp_path, "straight", *two))
    split = _tiny_run(tmp_path, "split", *two)
    assert train(split, max_steps=3)["stopped_at_step"] == 3
    resumed = train(split, resume="auto")
    assert resumed == pytest.approx(straight)
    for key in ("rank-1", "mAP"):
        assert 0.0 <= resumed[key] <= 1.0

    logged = (tmp_path / "runs/split/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in logged if '"kind": "train"' in line]
    assert len(steps) == 8 and all(step["mutual_global"] > 0 for step in steps)

    a = load_checkpoint(CheckpointManager(tmp_path / "runs/straight").latest())
    b = load_checkpoint(CheckpointManager(tmp_path / "runs/split").latest())
    assert b["step"] == 8 and b["model_meta"]["members"] == 2
    model, criterion = b["strategy"]["model"], b["criterion"]
    assert {k.split(".")[1] for k in model} == {"0", "1"}  # members.0.*, members.1.*
    assert set(criterion) == {"center.0.centers", "center.1.centers"}
    for state in ("model", "criterion"):
        x = a["strategy"]["model"] if state == "model" else a["criterion"]
        y = model if state == "model" else criterion
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key
    assert not torch.equal(
        model["members.0.head.local_conv.weight"], model["members.1.head.local_conv.weight"]
    )

    # the saved model evaluates as the run did: member 0
    path = CheckpointManager(tmp_path / "runs/split").latest()
    again = evaluate_checkpoint(path, out_dir=tmp_path / "eval")
    assert again == pytest.approx(resumed)
    # a run of another member count refuses it, and a one-member checkpoint is refused by two
    with pytest.raises(CheckpointError, match="from another model"):
        train(_tiny_run(tmp_path, "single"), resume=str(path))
    train(_tiny_run(tmp_path, "single", "evaluation.at_start=false"), max_steps=1)
    single = CheckpointManager(tmp_path / "runs/single").latest()
    with pytest.raises(CheckpointError, match=r"members: checkpoint None, this run 2"):
        train(_tiny_run(tmp_path, "two", *two), resume=str(single))
