from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from hpc_reid.config import LossConfig
from hpc_reid.losses import (
    ReidLoss,
    all_gather_with_grad,
    batch_hard_triplet_loss,
    cross_rank_batch_hard_triplet_loss,
)
from hpc_reid.losses.triplet import _batch_hard_terms

MARGINS = [0.3, None]


pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force(x: torch.Tensor, pids: list[int], margin: float | None) -> torch.Tensor:
    """Hermans et al. Eq. 5 by explicit loops over anchors, positives and negatives."""
    terms = []
    for a in range(len(pids)):
        pos = [
            torch.linalg.vector_norm(x[a] - x[p])
            for p in range(len(pids))
            if p != a and pids[p] == pids[a]
        ]
        neg = [
            torch.linalg.vector_norm(x[a] - x[n]) for n in range(len(pids)) if pids[n] != pids[a]
        ]
        if not pos or not neg:
            continue  # no triplet for this anchor
        gap = torch.stack(pos).max() - torch.stack(neg).min()
        terms.append(F.softplus(gap) if margin is None else torch.relu(gap + margin))
    return torch.stack(terms).mean() if terms else x.sum() * 0.0


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_equals_brute_force_loops_in_value_and_gradient(margin, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(14, 5, generator=g, dtype=torch.float64)
    pids = torch.randint(0, 4, (14,), generator=g)
    pids[3] = 17  # an identity seen once: its anchor has no positive and is excluded
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ours = batch_hard_triplet_loss(x1, pids, margin)
    ref = _brute_force(x2, pids.tolist(), margin)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-8, atol=1e-10)


def test_batch_hard_without_any_triplet_is_zero_with_zero_gradient():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for pids in (torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 3])):
        loss = batch_hard_triplet_loss(x, pids, 0.3)
        (grad,) = torch.autograd.grad(loss, x)
        assert float(loss.detach()) == 0.0
        assert torch.equal(grad, torch.zeros_like(x))


def test_batch_hard_gradient_is_finite_for_duplicate_features():
    x = torch.ones(
        4, 3, requires_grad=True
    )  # every distance 0: the clamped sqrt keeps grads finite
    batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 1]), None).backward()
    assert torch.isfinite(x.grad).all()


def test_cross_rank_loss_in_one_process_is_the_local_loss():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert all_gather_with_grad(x) is x
    torch.testing.assert_close(
        cross_rank_batch_hard_triplet_loss(x, pids, 0.3), batch_hard_triplet_loss(x, pids, 0.3)
    )


# ----------------------------------------------------------------------------- two real ranks

WORLD, LOCAL_B, DIM, IN_DIM = 2, 8, 5, 6


def _global_batch() -> dict[str, torch.Tensor]:
    """The concatenated 2 x B batch; rank r holds rows [r*B, (r+1)*B)."""
    g = torch.Generator().manual_seed(1234)
    pids = torch.randint(0, 5, (WORLD * LOCAL_B,), generator=g)
    pids[5] = 99  # seen once: excluded, so the global count of anchors differs from 2B
    return {
        "features": torch.randn(WORLD * LOCAL_B, DIM, generator=g, dtype=torch.float64),
        "pids": pids,
        "inputs": torch.randn(WORLD * LOCAL_B, IN_DIM, generator=g, dtype=torch.float64),
        "weights": torch.randn(WORLD * LOCAL_B, DIM, generator=g, dtype=torch.float64),
    }


def _model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Linear(IN_DIM, DIM).double()


def _rank_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        data = _global_batch()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        pids = data["pids"][rows]
        out: dict[str, object] = {}
        for margin in MARGINS:
            x = data["features"][rows].clone().requires_grad_()
            loss = cross_rank_batch_hard_triplet_loss(x, pids, margin)
            loss.backward()
            out[f"loss/{margin}"], out[f"grad/{margin}"] = loss.detach(), x.grad

        # The naive scheme: local anchors only, remote copies detached (loses remote anchors' pull).
        x = data["features"][rows].clone().requires_grad_()
        index = torch.arange(rows.start, rows.stop)
        terms, _ = _batch_hard_terms(
            x, pids, index, all_gather_with_grad(x), all_gather_with_grad(pids), 0.3
        )
        everyone = torch.arange(WORLD * LOCAL_B)
        feats, all_pids = data["features"], data["pids"]
        n_valid = _batch_hard_terms(feats, all_pids, everyone, feats, all_pids, 0.3)[1].sum()
        naive = terms.sum() * WORLD / n_valid  # the same value as the exact loss
        naive.backward()
        out["naive_loss"] = naive.detach()
        out["naive_grad"] = x.grad

        model = DistributedDataParallel(_model())
        feats = model(data["inputs"][rows])
        cross_rank_batch_hard_triplet_loss(feats, pids, 0.3).backward()
        out["ddp_grads"] = [p.grad.clone() for p in model.parameters()]

        x = data["features"][rows].clone().requires_grad_()
        gathered = all_gather_with_grad(x)
        (gathered * data["weights"]).sum().backward()
        out["gathered"], out["gather_grad"] = gathered.detach(), x.grad

        cfg = LossConfig.model_validate(
            {"ce": {"weight": 0}, "center": {"weight": 0}, "triplet": {"cross_rank": True}}
        )
        _, parts = ReidLoss(cfg, num_classes=5, feat_dim=DIM)({"global": x}, pids)
        out["reid_triplet"] = parts["triplet"]
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_rank_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("margin", MARGINS)
def test_cross_rank_loss_averaged_over_ranks_equals_single_process_loss(two_ranks, margin):
    data = _global_batch()
    single = batch_hard_triplet_loss(data["features"], data["pids"], margin)
    mean = sum(r[f"loss/{margin}"] for r in two_ranks) / WORLD
    torch.testing.assert_close(mean, single, rtol=0, atol=1e-6)
    assert abs(float(mean - single)) < 1e-12


@pytest.mark.parametrize("margin", MARGINS)
def test_cross_rank_feature_gradient_averaged_like_ddp_equals_single_process(two_ranks, margin):
    data = _global_batch()
    x = data["features"].clone().requires_grad_()
    batch_hard_triplet_loss(x, data["pids"], margin).backward()
    # DDP divides the sum of the ranks' gradients by W; each feature lives on one rank only.
    averaged = torch.cat([r[f"grad/{margin}"] for r in two_ranks]) / WORLD
    torch.testing.assert_close(averaged, x.grad, rtol=0, atol=1e-6)
    assert float((averaged - x.grad).abs().max()) < 1e-12


def test_mining_local_anchors_only_would_not_match_so_the_check_has_teeth(two_ranks):
    data = _global_batch()
    single = batch_hard_triplet_loss(data["features"], data["pids"], 0.3)
    x = data["features"].clone().requires_grad_()
    batch_hard_triplet_loss(x, data["pids"], 0.3).backward()
    naive = torch.cat([r["naive_grad"] for r in two_ranks]) / WORLD
    mean = sum(r["naive_loss"] for r in two_ranks) / WORLD
    assert abs(float(mean - single)) < 1e-12  # right value ...
    assert float((naive - x.grad).abs().max()) > 1e-3  # ... wrong gradient


def test_cross_rank_under_real_ddp_gives_single_process_parameter_gradients(two_ranks):
    data = _global_batch()
    model = _model()
    batch_hard_triplet_loss(model(data["inputs"]), data["pids"], 0.3).backward()
    for rank in two_ranks:
        for got, p in zip(rank["ddp_grads"], model.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, rtol=0, atol=1e-6)
            assert float((got - p.grad).abs().max()) < 1e-12


def test_all_gather_with_grad_concatenates_in_rank_order_and_grads_only_local_slice(two_ranks):
    data = _global_batch()
    for rank, out in enumerate(two_ranks):
        assert torch.equal(out["gathered"], data["features"])
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        assert torch.equal(out["gather_grad"], data["weights"][rows])


def test_reid_loss_uses_the_cross_rank_triplet_under_torch_distributed(two_ranks):
    for out in two_ranks:
        torch.testing.assert_close(out["reid_triplet"], out["loss/0.3"], rtol=0, atol=1e-12)
