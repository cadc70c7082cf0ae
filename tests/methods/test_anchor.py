"""The anchor loss (issue 17): the loss against direct formulas, the class anchors against a float64
reference on 1, 2 and 3 gloo ranks, and the refresh inside training (where, how often, resumed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_on_ranks, dataset_root
from hpc_reid.data.datasets import build_dataset
from hpc_reid.data.loaders import build_backend_test_loader
from hpc_reid.data.pack import pack_dataset
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.class_means import class_means
from hpc_reid.engine.trainer import train
from hpc_reid.losses import ReidLoss
from hpc_reid.methods.anchor import AnchorLoss, anchor_loss
from hpc_reid.models import build_model
from tests.ports import free_port
from tests.tiny import tiny_config as tiny

pytestmark = pytest.mark.usefixtures("one_thread")

ANCHOR = ["model.backbone=osnet_x0_25", "evaluation.at_start=false", "loss.anchor.weight=1.0"]


def tiny_config(tmp_path: Path, *extra: str):
    return tiny(tmp_path, "configs/synthetic/bot.yaml", *ANCHOR, *extra)


# ------------------------------------------------------------------------------ the loss


def reference_loss(f: np.ndarray, a: np.ndarray, y: np.ndarray, form: str, margin) -> float:
    """The anchor loss written out per sample in float64."""
    if form == "mse":
        return float(np.mean((f - a[y]) ** 2))
    if form == "l1":
        return float(np.mean(np.abs(f - a[y])))
    values = []
    for i in range(len(f)):
        d = np.sqrt(((f[i] - a) ** 2).sum(1))
        own, other = d[y[i]], min(d[c] for c in range(len(a)) if c != y[i])
        x = own - other
        values.append(np.log1p(np.exp(x)) if margin is None else max(0.0, x + margin))
    return float(np.mean(values))


@pytest.mark.parametrize(
    "form,margin", [("mse", 0.3), ("l1", 0.3), ("intra_inter", 0.3), ("intra_inter", None)]
)
def test_anchor_loss_value_and_gradient_equal_the_direct_formula(form, margin):
    rng = np.random.default_rng(7)
    f = rng.normal(size=(12, 5))
    a = rng.normal(size=(4, 5))
    y = rng.integers(0, 4, size=12)
    features = torch.tensor(f, requires_grad=True)
    value = anchor_loss(features, torch.tensor(a), torch.tensor(y), form, margin)
    assert value.item() == pytest.approx(reference_loss(f, a, y, form, margin), rel=1e-12)
    (grad,) = torch.autograd.grad(value, features)
    # central differences of the float64 reference (a hinge's kink is avoided by the seed: no
    # sample within 1e-3 of it, checked)
    eps = 1e-6
    numeric = np.zeros_like(f)
    for i in range(f.shape[0]):
        for j in range(f.shape[1]):
            up, down = f.copy(), f.copy()
            up[i, j] += eps
            down[i, j] -= eps
            diff = reference_loss(up, a, y, form, margin) - reference_loss(down, a, y, form, margin)
            numeric[i, j] = diff / (2 * eps)
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-5, atol=1e-8)
    if form == "mse":  # and the closed form: 2 (f - a_y) / (B D)
        np.testing.assert_allclose(grad.numpy(), 2 * (f - a[y]) / f.size, rtol=1e-12)


def test_anchors_get_no_gradient_and_a_term_never_refreshed_refuses_to_run():
    cfg = load_config(None, ["loss.anchor.weight=1"]).loss.anchor
    term = AnchorLoss(cfg, num_classes=3, feature_dim=4)
    with pytest.raises(RuntimeError, match="never computed"):
        term({"bn": torch.zeros(2, 4)}, torch.tensor([0, 1]))
    term.set_class_means(torch.randn(3, 4), epoch=0, step=0)
    features = torch.randn(2, 4, requires_grad=True)
    term({"bn": features}, torch.tensor([0, 2])).backward()
    assert features.grad is not None and not term.anchors.requires_grad
    with pytest.raises(ValueError, match=r"shape \(3, 5\) for anchors of shape \(3, 4\)"):
        term.set_class_means(torch.zeros(3, 5), epoch=1, step=4)


@pytest.mark.parametrize(
    "every_epochs,every_steps,expected",
    [
        (1, 0, [(0, 0), (1, 4), (2, 8)]),
        (2, 0, [(0, 0), (2, 8)]),
        (1, 3, [(0, 0), (0, 3), (1, 4), (1, 6), (2, 8), (2, 9)]),
    ],
)
def test_refreshes_are_due_at_epoch_starts_and_every_n_steps(every_epochs, every_steps, expected):
    """3 epochs of 4 steps: where ReidLoss.refresh recomputes, and a saved term is not due again
    at the step it was refreshed for (a resume at that point)."""
    cfg = load_config(
        None,
        [
            "loss.anchor.weight=1",
            f"loss.anchor.every_epochs={every_epochs}",
            f"loss.anchor.every_steps={every_steps}",
        ],
    ).loss
    criterion = ReidLoss(cfg, num_classes=3, feat_dim=2, output_keys={"global", "bn", "logits"})
    seen = []

    def means(requests):
        assert requests == [("bn", True)]
        return {("bn", True): torch.full((3, 2), float(len(seen)))}

    for step in range(12):
        epoch = step // 4
        if criterion.refresh(epoch, step, step % 4 == 0, means):
            seen.append((epoch, step))
    assert seen == expected
    restored = ReidLoss(cfg, num_classes=3, feat_dim=2, output_keys={"global", "bn", "logits"})
    restored.load_state_dict(criterion.state_dict())
    assert restored.anchor.refreshed_at == expected[-1]
    assert torch.equal(restored.anchor.anchors, criterion.anchor.anchors)
    assert not restored.refresh(*expected[-1][:1], expected[-1][1], True, means)


# --------------------------------------------------------------------- the class anchors


class TinyNet(nn.Module):
    """A deterministic model with two outputs of different widths, no BatchNorm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, images):
        x = self.conv(images).relu()
        pooled = x.mean((2, 3))
        return {"global": pooled, "bn": torch.cat([pooled, x.amax((2, 3))], 1)}


def reference_means(dataset, config, key: str, flip: bool) -> np.ndarray:
    """Per-class means in float64: the model in float64 on every training image, one process."""
    model = TinyNet().double().eval()
    # the images as the run's loader backend decodes them (DALI and PIL resize differently)
    loader = build_backend_test_loader(
        dataset.train, config.loader, config.data.height, config.data.width, "cpu"
    )
    rows, labels = [], []
    with torch.no_grad():
        for batch in loader:
            images = batch["images"].double()
            f = model(images)[key]
            if flip:
                f = (f + model(images.flip(-1))[key]) / 2
            rows.append(f.numpy())
            labels.append(batch["pids"].numpy())
    rows, labels = np.concatenate(rows), np.concatenate(labels)
    return np.stack([rows[labels == c].mean(0) for c in range(dataset.num_train_pids)])


def _means_rank(rank: int, world: int, port: int, tmp: str, out: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = tiny_config(Path(tmp))
        dataset = dataset_on_ranks(config.data, rank == 0)
        requests = [("bn", True), ("global", False)]
        means = class_means(
            TinyNet(), dataset.train, config, torch.device("cpu"), requests, dataset.num_train_pids
        )
        out[rank] = {r: m.numpy() for r, m in means.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_class_means_over_ranks_equal_the_float64_single_process_reference(tmp_path, world):
    config = tiny_config(tmp_path)
    dataset = dataset_on_ranks(config.data, True)  # generated once, before the ranks read it
    expected = {
        ("bn", True): reference_means(dataset, config, "bn", True),
        ("global", False): reference_means(dataset, config, "global", False),
    }
    out = mp.Manager().dict()
    mp.spawn(_means_rank, args=(world, free_port(), str(tmp_path), out), nprocs=world, join=True)
    for rank in range(world):
        for request, ref in expected.items():
            np.testing.assert_allclose(out[rank][request], ref, rtol=0, atol=2e-6)
        if rank:  # and every rank holds the very same anchors
            for request in expected:
                assert np.array_equal(out[rank][request], out[0][request])


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_class_means_from_an_hdf5_pack_equal_those_from_the_folder(tmp_path, backend):
    """The anchors read through either loader backend, from the image folder or its HDF5 pack
    (the same JPEG bytes), are the same."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    config = tiny_config(tmp_path, f"loader.backend={backend}")
    name, root = dataset_root(config.data, announce=lambda _: None)
    pack = tmp_path / "tiny.h5"
    pack_dataset(build_dataset(name, root), pack)
    requests = [("bn", True)]
    means = {}
    for source in (root, pack):
        dataset = build_dataset(name, source)
        means[source] = class_means(
            TinyNet(), dataset.train, config, torch.device("cpu"), requests, dataset.num_train_pids
        )[("bn", True)]
    assert torch.equal(means[root], means[pack])


def test_a_class_without_training_images_is_named(tmp_path):
    config = tiny_config(tmp_path)
    dataset = dataset_on_ranks(config.data, True)
    missing = [r for r in dataset.train if r.pid != 2]
    with pytest.raises(ValueError, match=r"1 of \d+ classes have no image \(2\)"):
        class_means(TinyNet(), missing, config, torch.device("cpu"), [("bn", False)], 8)


# ------------------------------------------------------------------------- in training


def state(path: Path) -> dict:
    return load_checkpoint(path)


def test_anchors_are_refreshed_before_each_epoch_with_that_moments_weights(tmp_path, capsys):
    """4 steps an epoch: the checkpoint at step 4 (end of epoch 1) holds the weights that the
    anchors of epoch 2 are computed with, before step 5; they equal the class means of that model
    (post-BNNeck, flip-averaged) computed here in float64."""
    config = tiny_config(tmp_path, "logging.run_name=a")
    train(config, max_steps=4)
    at_4 = state(CheckpointManager(tmp_path / "runs/a").latest())
    assert at_4["criterion"]["anchor.refreshed"].tolist() == [0, 0]
    capsys.readouterr()
    train(config, resume="auto", max_steps=5)
    assert "epoch 2, step 4: loss.anchor refreshed over the 50 training images" in (
        capsys.readouterr().out
    )
    at_5 = state(CheckpointManager(tmp_path / "runs/a").latest())
    assert at_5["criterion"]["anchor.refreshed"].tolist() == [1, 4]

    dataset = dataset_on_ranks(config.data, True)
    model = build_model(config.model, dataset.num_train_pids)
    model.load_state_dict(at_4["strategy"]["model"])
    model = model.double().eval()
    # the images as the run's loader backend decodes them (DALI and PIL resize differently)
    loader = build_backend_test_loader(
        dataset.train, config.loader, config.data.height, config.data.width, "cpu"
    )
    sums = np.zeros((dataset.num_train_pids, model.feature_dim))
    counts = np.zeros(dataset.num_train_pids)
    with torch.no_grad():
        for batch in loader:
            images = batch["images"].double()
            f = ((model(images)["bn"] + model(images.flip(-1))["bn"]) / 2).numpy()
            for row, pid in zip(f, batch["pids"].tolist(), strict=True):
                sums[pid] += row
                counts[pid] += 1
    expected = sums / counts[:, None]
    np.testing.assert_allclose(at_5["criterion"]["anchor.anchors"].numpy(), expected, atol=2e-5)


@pytest.mark.parametrize("every_steps", [0, 3])
def test_a_run_with_the_anchor_loss_resumes_bit_exact(tmp_path, every_steps):
    """5 + 5 steps (stopping mid-epoch 2, and with every_steps=3 between two refreshes) equal 10
    steps straight: weights, anchors and the step of their last refresh."""
    extra = [f"loss.anchor.every_steps={every_steps}"]
    straight = tiny_config(tmp_path, "logging.run_name=straight", *extra)
    train(straight, max_steps=10)
    split = tiny_config(tmp_path, "logging.run_name=split", *extra)
    train(split, max_steps=5)
    train(split, resume="auto", max_steps=10)
    a = state(CheckpointManager(tmp_path / "runs/straight").latest())
    b = state(CheckpointManager(tmp_path / "runs/split").latest())
    for part in ("model",):
        for key, value in a["strategy"][part].items():
            assert torch.equal(value, b["strategy"][part][key]), key
    for key, value in a["criterion"].items():
        assert torch.equal(value, b["criterion"][key]), key
    last = [2, 8] if every_steps == 0 else [2, 9]
    assert a["criterion"]["anchor.refreshed"].tolist() == last
