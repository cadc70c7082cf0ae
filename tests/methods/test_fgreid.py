"""FGReID (issue 21): the head's forward against a direct numpy computation of the reference's
formulas (attention map with each image's own minimum or the batch's, cosine non-local over a
sample's positions, masked pooling, two BNs and one classifier) for images and T = 3 tracklets,
its shapes, each loss term against its formula written out in numpy on random inputs, the second
trunk started from a tiny run's checkpoint (a foreign or mismatching one refused), and the
configs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpc_reid.config import ConfigError, LossConfig, ModelConfig, load_config
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.errors import CheckpointError
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import train
from hpc_reid.losses import CenterLoss, ReidLoss, batch_hard_triplet_loss
from hpc_reid.methods.fgreid import FGReIDHead
from hpc_reid.methods.fgreid.losses import (
    OsmLoss,
    osm_caa_loss,
    rank_consistency_loss,
    satisfied_rank_loss,
    variance_loss,
)
from hpc_reid.models import build_model
from hpc_reid.models.backbones import feature_map_size
from tests.tiny import REPO, TINY_TRACKLETS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

MID, NL, CLASSES = 12, 5, 7


def small_cfg(**fgreid) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "backbone": "osnet_x0_25",
            "head": "fgreid",
            "fgreid": {"mid_dim": MID, "nonlocal_dim": NL, **fgreid},
        }
    )


def random_head(seed: int = 0, **fgreid) -> FGReIDHead:
    """A head (OSNet x0.25 second trunk, 128 channels) in float64 with every layer random: W_z
    and the BN shifts too, which start at zero and would hide the non-local block and the BN;
    conv1 small enough that the attention map is not saturated at 1 (where its offset, the
    minimum, would no longer show)."""
    torch.manual_seed(seed)
    head = FGReIDHead(128, CLASSES, small_cfg(**fgreid)).double()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if not name.startswith("trunk2."):
                p.normal_(0.0, 0.03 if name.startswith("conv1.") else 0.3)
    return head


# ----------------------------------------------------------------------- the head, in numpy


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def batch_norm_train(x, bn):
    """BatchNorm1d in training mode: the batch's mean and biased variance."""
    w, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    return (x - x.mean(0)) / np.sqrt(x.var(0) + bn.eps) * w + b


def numpy_head(head: FGReIDHead, first, second, frames: int, batch_min: bool):
    """The reference's forward written out per sample: ``first`` and ``second`` the two trunks'
    maps (B*frames, C, h, w) as numpy arrays; returns (F1, F2, logits1, logits2, M)."""
    p = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    n, c, h, w = first.shape
    cells = h * w
    w1, b1 = p["conv1.weight"][:, :, 0, 0], p["conv1.bias"]
    w2, b2 = p["conv2.weight"][:, :, 0, 0], p["conv2.bias"]
    wt, wg = p["non_local.theta.weight"][:, :, 0, 0], p["non_local.g.weight"][:, :, 0, 0]
    wz = p["non_local.w_z.weight"][:, :, 0, 0]
    a = np.stack([w1 @ first[i].reshape(c, cells) + b1[:, None] for i in range(n)])
    g = a.mean(axis=2)
    m = np.empty((n, cells))
    for i in range(n):
        s = softmax(g[i])
        floor = a.min() if batch_min else a[i].min()
        for q in range(cells):
            m[i, q] = 1.0 / (1.0 + np.exp(-np.sum(s * (a[i, :, q] - floor))))
    cm = second.shape[1]
    z = np.stack([(w2 @ second[i].reshape(cm, cells) + b2[:, None]) * m[i] for i in range(n)])
    pooled = np.empty((n, MID))
    for j in range(n // frames):
        zs = np.concatenate([z[j * frames + t] for t in range(frames)], axis=1)  # (mid, T*cells)
        theta = np.maximum(wt @ zs, 0)
        theta = theta / np.maximum(np.linalg.norm(theta, axis=0), 1e-12)
        affinity = softmax(theta.T @ theta, axis=1)  # row i: position i's weights over j
        mixed = np.maximum(wg @ zs, 0) @ affinity.T  # column i: sum_j affinity[i, j] g_j
        zp = wz @ mixed + zs
        for t in range(frames):
            frame = j * frames + t
            pooled[frame] = zp[:, t * cells : (t + 1) * cells].sum(1) / m[frame].sum()
    b = n // frames
    f1 = batch_norm_train(g.reshape(b, frames, MID).mean(1), head.bn1)
    f2 = batch_norm_train(pooled.reshape(b, frames, MID).mean(1), head.bn2)
    wc = p["classifier.weight"]
    return f1, f2, f1 @ wc.T, f2 @ wc.T, m.reshape(n, h, w)


@pytest.mark.parametrize("batch_min", [False, True])
@pytest.mark.parametrize("frames", [1, 3])
def test_head_forward_equals_the_reference_formulas_written_out_per_sample(frames, batch_min):
    head = random_head(batch_min=batch_min).train()
    gen = torch.Generator().manual_seed(1)
    b = 4 if frames == 1 else 2  # B != T: a mix-up of the two axes shows
    images = torch.randn(b * frames, 3, 64, 32, generator=gen, dtype=torch.float64)
    first = torch.randn(b * frames, 128, 4, 2, generator=gen, dtype=torch.float64)
    fmap = first if frames == 1 else first.unflatten(0, (b, frames))
    out = head(fmap, images)
    with torch.no_grad():
        second = head.trunk2(images)
    f1, f2, y1, y2, m = numpy_head(head, first.numpy(), second.numpy(), frames, batch_min)
    feat = np.concatenate([f1, f2], axis=1)
    np.testing.assert_allclose(out["global"].detach().numpy(), feat, rtol=1e-9, atol=1e-10)
    assert out["bn"] is out["global"]
    np.testing.assert_allclose(out["logits"].detach().numpy(), y1, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["logits2"].detach().numpy(), y2, rtol=1e-9, atol=1e-10)
    maps = out["attention"].detach().numpy().reshape(m.shape)
    np.testing.assert_allclose(maps, m, rtol=1e-12)
    assert (m >= 0.5).all() and m.max() < 0.99  # a non-negative sum; not saturated


def test_head_shapes_for_images_and_tracklets_in_training_and_eval():
    torch.manual_seed(0)
    model = build_model(small_cfg(), CLASSES).train()
    images = model(torch.randn(4, 3, 64, 32))
    clips = model(torch.randn(2, 3, 3, 64, 32))
    assert {k: tuple(v.shape) for k, v in images.items()} == {
        "global": (4, 2 * MID),
        "bn": (4, 2 * MID),
        "logits": (4, CLASSES),
        "logits2": (4, CLASSES),
        "attention": (4, 4, 2),
    }
    assert {k: tuple(v.shape) for k, v in clips.items()} == {
        "global": (2, 2 * MID),
        "bn": (2, 2 * MID),
        "logits": (2, CLASSES),
        "logits2": (2, CLASSES),
        "attention": (2, 3, 4, 2),
    }
    assert model.feature_dim == 2 * MID and set(images) == model.output_keys
    model.eval()
    assert set(model(torch.randn(2, 3, 64, 32))) == {"global", "bn", "attention"}


def test_eval_features_are_per_image_and_a_one_frame_tracklet_is_its_image_unless_batch_min():
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(5, 3, 64, 32, generator=gen, dtype=torch.float64)
    first = torch.randn(5, 128, 4, 2, generator=gen, dtype=torch.float64)
    own = random_head().eval()
    with torch.no_grad():
        whole = own(first, images)["global"]
        alone = torch.cat([own(first[i : i + 1], images[i : i + 1])["global"] for i in range(5)])
        clips = own(first.unsqueeze(1), images)["global"]
    torch.testing.assert_close(alone, whole, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(clips, whole, rtol=1e-10, atol=1e-12)
    batch = random_head(batch_min=True).eval()
    with torch.no_grad():  # the reference's batch-wide minimum: alone, every image but the one
        whole = batch(first, images)["global"]  # holding the batch's minimum changes
        alone = torch.cat([batch(first[i : i + 1], images[i : i + 1])["global"] for i in range(5)])
    moved = [not torch.allclose(whole[i], alone[i], rtol=0, atol=1e-9) for i in range(5)]
    assert sum(moved) >= 4


def test_a_second_trunk_with_another_map_size_is_refused_naming_both():
    head = FGReIDHead(128, CLASSES, small_cfg())
    with pytest.raises(ValueError, match=r"second trunk's maps .* the first trunk's"):
        head(torch.randn(2, 128, 8, 4), torch.randn(2, 3, 64, 32))


# ----------------------------------------------------------------------------- the loss terms


def random_batch(seed=0, ids=4, k=4, dim=10):
    gen = np.random.default_rng(seed)
    pids = np.repeat(gen.permutation(20)[:ids], k)
    return gen.standard_normal((ids * k, dim)), pids, gen


def test_ce_with_also_is_the_mean_label_smoothed_ce_of_both_branches():
    _, pids, gen = random_batch(1)
    y1, y2 = gen.standard_normal((2, len(pids), CLASSES + 20))
    eps, k = 0.1, y1.shape[1]

    def ce(logits):
        q = np.full(logits.shape, eps / k)
        q[np.arange(len(pids)), pids] += 1 - eps
        return np.mean(-(q * np.log(softmax(logits))).sum(1))

    loss = ReidLoss(
        LossConfig.model_validate(
            {"ce": {"also": ["logits2"]}, "triplet": {"weight": 0}, "center": {"weight": 0}}
        ),
        k,
        4,
    )
    outputs = {"logits": torch.tensor(y1), "logits2": torch.tensor(y2)}
    total, _ = loss(outputs, torch.tensor(pids))
    np.testing.assert_allclose(float(total), (ce(y1) + ce(y2)) / 2, rtol=1e-10)
    with pytest.raises(ValueError, match="also"):
        LossConfig.model_validate({"ce": {"also": ["logits"]}})


def test_cosine_triplet_is_the_mean_of_max_0_cos_n_minus_cos_p_plus_margin():
    f, pids, _ = random_batch(2)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    cos = unit @ unit.T
    margin, terms = 0.2, []
    for a in range(len(pids)):
        pos = [cos[a, j] for j in range(len(pids)) if pids[j] == pids[a] and j != a]
        neg = [cos[a, j] for j in range(len(pids)) if pids[j] != pids[a]]
        terms.append(max(0.0, max(neg) - min(pos) + margin))
    ours = batch_hard_triplet_loss(torch.tensor(f), torch.tensor(pids), margin, "cosine")
    np.testing.assert_allclose(float(ours), np.mean(terms), rtol=1e-10)
    term = ReidLoss(
        LossConfig.model_validate(
            {
                "ce": {"weight": 0},
                "center": {"weight": 0},
                "triplet": {"distance": "cosine", "margin": margin},
            }
        ),
        20,
        f.shape[1],
    )
    np.testing.assert_allclose(
        float(term({"global": torch.tensor(f)}, torch.tensor(pids))[0]), np.mean(terms), rtol=1e-10
    )


def numpy_osm(f, pids, centers, alpha, sigma, l):  # noqa: E741  (the paper's name)
    x = f / np.linalg.norm(f, axis=1, keepdims=True)
    c = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    n = len(pids)
    a = np.array([softmax(x[i] @ c.T)[pids[i]] for i in range(n)])
    wp = wn = lp = ln = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            d = np.sqrt(max(np.sum((x[i] - x[j]) ** 2), 1e-12))
            s_neg = max(alpha - d, 1e-12)
            if pids[i] == pids[j]:
                weight = np.exp(-(d**2) / sigma**2) * min(a[i], a[j])
                wp, lp = wp + weight, lp + weight * d**2
            else:
                weight = s_neg * min(a[i], a[j])
                wn, ln = wn + weight, ln + weight * s_neg**2
    return (1 - l) * 0.5 * lp / wp + l * 0.5 * ln / wn


@pytest.mark.parametrize("alpha,sigma,l", [(2.0708620, 0.1985924, 0.4834911), (1.2, 0.8, 0.5)])
def test_osm_with_class_aware_attention_equals_its_formula(alpha, sigma, l):  # noqa: E741
    f, pids, gen = random_batch(3, dim=6)
    centers = gen.standard_normal((20, 6))
    ours = osm_caa_loss(torch.tensor(f), torch.tensor(pids), torch.tensor(centers), alpha, sigma, l)
    np.testing.assert_allclose(float(ours), numpy_osm(f, pids, centers, alpha, sigma, l), rtol=1e-9)


def test_osm_reads_the_center_terms_centers_through_reid_loss_and_is_refused_without_them():
    f, pids, _ = random_batch(4, dim=6)
    cfg = LossConfig.model_validate(
        {"ce": {"weight": 0}, "triplet": {"weight": 0}, "osm": {"weight": 0.5}}
    )
    torch.manual_seed(0)
    criterion = ReidLoss(cfg, 20, 6)
    _, parts = criterion({"global": torch.tensor(f)}, torch.tensor(pids))
    centers = criterion.center.centers.detach().double().numpy()
    expected = numpy_osm(f, pids, centers, cfg.osm.alpha, cfg.osm.sigma, cfg.osm.l)
    np.testing.assert_allclose(float(parts["osm"]), expected, rtol=1e-5)
    assert not any("osm" in k for k in criterion.state_dict())  # no second copy of the centers
    off = cfg.model_copy(update={"center": cfg.center.model_copy(update={"weight": 0.0})})
    with pytest.raises(ConfigError, match=r"loss\.osm reads the state of loss\.center"):
        ReidLoss(off, 20, 6)
    with pytest.raises(ValueError, match=r"loss\.osm\.weight=0\.5 reads the center loss"):
        load_config(None, ["loss.osm.weight=0.5", "loss.center.weight=0"])


@pytest.mark.parametrize("center_grad", [True, False])
def test_osm_moves_the_centers_only_with_center_grad(center_grad):
    f, pids, _ = random_batch(5, dim=6)
    center = CenterLoss(20, 6).double()
    section = LossConfig().osm.model_copy(update={"center_grad": center_grad})
    term = OsmLoss(section)
    term.link({"center": center})
    term({"global": torch.tensor(f, requires_grad=True)}, torch.tensor(pids)).backward()
    moved = center.centers.grad is not None and center.centers.grad.abs().sum() > 0
    assert moved == center_grad


@pytest.mark.parametrize("instances", [None, 4])
def test_variance_term_equals_its_formula(instances):
    f, pids, _ = random_batch(6, ids=5, k=4)
    b, spread = len(pids), 0.0
    for i in range(b):
        same = f[pids == pids[i]]
        proto = same.mean(0) if instances is None else same.sum(0) / instances
        spread += np.sum((f[i] - proto) ** 2)
    pooled = b - 5 if instances is None else (instances - 1) * b / instances
    ours = variance_loss(torch.tensor(f), torch.tensor(pids), instances)
    np.testing.assert_allclose(float(ours), spread / pooled, rtol=1e-10)


def test_variance_with_a_fixed_k_is_the_reference_prototype_sum_over_k():
    # the reference's proto = (one-hot^T f) / 4 on a batch whose identities have 3 images: the
    # prototypes then are 3/4 of the means, and the term is not the within-class variance
    f, pids, _ = random_batch(7, ids=4, k=3)
    onehot = (pids[:, None] == np.arange(20)[None, :]).astype(float)
    proto = (onehot.T @ f / 4)[pids]
    expected = np.sum((f - proto) ** 2) / (3 * len(pids) / 4)
    np.testing.assert_allclose(
        float(variance_loss(torch.tensor(f), torch.tensor(pids), 4)), expected, rtol=1e-10
    )


def test_satisfied_rank_and_rank_consistency_equal_their_formulas():
    _, pids, gen = random_batch(8)
    y1, y2 = gen.standard_normal((2, len(pids), 20)) * 2
    p1, p2 = softmax(y1), softmax(y2)
    own1, own2 = p1[np.arange(len(pids)), pids], p2[np.arange(len(pids)), pids]
    for mr, ms in [(2.0, 1.0), (0.1, 0.3)]:
        sr = np.mean(
            np.minimum(np.maximum(own1 - own2 + mr, 0), np.maximum(2 * ms - own1 - own2, 0))
        )
        ours = satisfied_rank_loss(torch.tensor(y1), torch.tensor(y2), torch.tensor(pids), mr, ms)
        np.testing.assert_allclose(float(ours), sr, rtol=1e-6)
    kl = np.mean(np.sum(p1 * np.log(p1 / p2), axis=1))
    for margin in (0.005, kl + 0.1):
        ours = rank_consistency_loss(torch.tensor(y1), torch.tensor(y2), margin)
        np.testing.assert_allclose(float(ours), max(kl - margin, 0.0), rtol=1e-6, atol=1e-12)


# ------------------------------------------------- a tiny run, and the second trunk started from it


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/synthetic/fgreid.yaml on the tiny set, one epoch (4 steps of 2 ids x 2 images)."""
    tmp = tmp_path_factory.mktemp("fgreid")
    config = tiny_config(
        tmp,
        "configs/synthetic/fgreid.yaml",
        "schedule.epochs=1",
        "schedule.milestones=[]",
        "schedule.warmup_epochs=0",
        "logging.log_every=1",
    )
    train(config)
    return SimpleNamespace(tmp=tmp, config=config, run=tmp / "runs" / config.name)


def test_a_tiny_run_trains_every_fgreid_term_and_evaluates(tiny_run):
    lines = [json.loads(x) for x in (tiny_run.run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "train"]
    assert len(steps) == 4
    for name in (
        "ce",
        "triplet",
        "center",
        "osm",
        "variance",
        "satisfied_rank",
        "rank_consistency",
    ):
        assert all(np.isfinite(x[name]) for x in steps), name
    assert (tiny_run.run / "results.json").is_file()


def trunk_weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["strategy"]["model"]
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def test_second_trunk_starts_from_the_backbone_weights_of_a_run(tiny_run):
    cfg = small_cfg(second_init_from=str(tiny_run.run))
    torch.manual_seed(0)
    head = build_model(cfg, CLASSES).head
    latest = (
        tiny_run.run / "checkpoints" / (tiny_run.run / "checkpoints/latest").read_text().strip()
    )
    expected = trunk_weights(latest)
    got = head.trunk2.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_second_trunk_refuses_a_foreign_file_another_backbone_and_a_missing_path(
    tiny_run, tmp_path
):
    plain = tmp_path / "plain.pt"
    torch.save({"base.conv1.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match=r"second_init_from=.*not an hpc-reid checkpoint"):
        build_model(small_cfg(second_init_from=str(plain)), CLASSES)
    other = build_model(ModelConfig(backbone="resnet18", pretrained=None), CLASSES)
    CheckpointManager(tmp_path / "r18").save(
        {"strategy": {"model": other.state_dict()}, "model_meta": {"backbone": "resnet18"}}, 1, 1
    )
    with pytest.raises(
        CheckpointError,
        match=r"model.backbone: resnet18.*do not fit the second "
        r"trunk osnet_x0_25.*missing key.*unexpected key",
    ):
        build_model(small_cfg(second_init_from=str(tmp_path / "r18")), CLASSES)
    CheckpointManager(tmp_path / "mutual").save(
        {"strategy": {"model": {"members.0.backbone.conv1.weight": torch.zeros(1)}}}, 1, 1
    )
    with pytest.raises(CheckpointError, match=r"holds no backbone\.\* weights.*members\."):
        build_model(small_cfg(second_init_from=str(tmp_path / "mutual")), CLASSES)
    with pytest.raises(CheckpointError, match="not found"):
        build_model(small_cfg(second_init_from=str(tmp_path / "none.pt")), CLASSES)


# ---------------------------------------------------------------------------------- configs


def test_configs_validate_and_cuhk01_is_two_resnet50_trunks_at_256x150_16x10_maps():
    synthetic = load_config(REPO / "configs/synthetic/fgreid.yaml")
    cuhk01 = load_config(REPO / "configs/cuhk01/fgreid.yaml", ["data.root=/nowhere"])
    for c in (synthetic, cuhk01):
        assert c.model.head == "fgreid" and c.loss.ce.also == ["logits2"]
        assert c.loss.triplet.distance == "cosine" and c.loss.osm.weight > 0
        beta = c.loss.osm.weight
        assert c.loss.triplet.weight == pytest.approx(1 - beta)
    assert synthetic.model.backbone == "osnet_x0_25"
    m = cuhk01.model
    assert (m.backbone, m.fgreid.mid_dim, m.fgreid.nonlocal_dim) == ("resnet50", 1024, 256)
    assert (cuhk01.data.height, cuhk01.data.width) == (256, 150)
    assert feature_map_size(m.backbone, m.last_stride, 256, 150) == (16, 10)
    assert cuhk01.sampler.num_identities * cuhk01.sampler.num_instances == 128
    with torch.device("meta"):  # shapes only: two ResNet-50s cost nothing here
        model = build_model(m, 871)
        out = model.train()(torch.empty(2, 3, 256, 150))
    assert out["global"].shape == (2, 2048) and out["attention"].shape == (2, 16, 10)
    assert out["logits2"].shape == (2, 871)


#: configs/synthetic/fgreid_video.yaml (the synthetic video job with the fgreid head and its whole
#: objective) on 8 identities in 2 cameras, 2 tracklets each per camera of 2-9 frames at 64x32,
#: clips of T = 3 (at most 2 a tracklet), the tiny head widths
FGREID_VIDEO = [
    *TINY_TRACKLETS,
    f"model.fgreid.mid_dim={MID}",
    f"model.fgreid.nonlocal_dim={NL}",
    "logging.run_name=v",
]


def test_a_tiny_video_run_trains_on_tracklets_and_eval_of_its_checkpoint_gives_its_numbers(
    tmp_path,
):
    config = tiny_config(tmp_path, "configs/synthetic/fgreid_video.yaml", *FGREID_VIDEO)
    assert config.data.synthetic.tracklets and config.model.head == "fgreid"
    assert config.loss.osm.weight > 0 and config.loss.ce.also == ["logits2"]
    summary = train(config)
    run = tmp_path / "runs/v"
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["rank-1"] <= 1.0 and results["mAP"] == pytest.approx(summary["mAP"])
    again = evaluate_checkpoint(CheckpointManager(run).latest(), out_dir=tmp_path / "eval")
    assert again == pytest.approx(summary)
