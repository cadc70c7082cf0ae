"""AlignedReID's local triplet loss: against explicit loops over anchors and candidates (mining
with the global or the DMLI distance, hinge and soft margin), its gradient, the anchors without a
triplet (as the global triplet: left out, no error), and the cross-rank variant over 2 gloo ranks
equal to one process on the concatenated batch."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hpc_reid.losses import batch_hard_triplet_loss
from hpc_reid.methods.alignedreid.dmli import dmli_paired
from hpc_reid.methods.alignedreid.local_triplet import (
    cross_rank_local_triplet_loss,
    local_triplet_loss,
)
from tests.ports import free_port

MARGINS = [0.3, None]
MINING = ["global", "local"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DMLI distance of two (S, C) images (dmli_paired is checked against a plain-Python DP in
    test_dmli.py)."""
    return dmli_paired(a.unsqueeze(0), b.unsqueeze(0))[0]


def _loop_reference(local, global_feats, pids: list[int], margin, mining: str) -> torch.Tensor:
    """Loops: for every anchor with a positive and a negative, the hardest of each by the mining
    distance, then the hinge / softplus of the local distances to those two."""
    terms = []
    for a in range(len(pids)):
        pos = [p for p in range(len(pids)) if p != a and pids[p] == pids[a]]
        neg = [n for n in range(len(pids)) if pids[n] != pids[a]]
        if not pos or not neg:
            continue  # no triplet for this anchor, as in the global triplet loss
        if mining == "global":

            def mine(c, a=a):
                return float(torch.linalg.vector_norm(global_feats[a] - global_feats[c]))
        else:

            def mine(c, a=a):
                return float(_one_pair(local[a], local[c]).detach())

        p = max(pos, key=mine)
        n = min(neg, key=mine)
        gap = _one_pair(local[a], local[p]) - _one_pair(local[a], local[n])
        terms.append(F.softplus(gap) if margin is None else torch.relu(gap + margin))
    return torch.stack(terms).mean() if terms else local.sum() * 0.0


def _batch(seed: int, b: int = 12, s: int = 4, c: int = 5, d: int = 6, ids: int = 4):
    g = torch.Generator().manual_seed(seed)
    local = torch.randn(b, s, c, generator=g, dtype=torch.float64)
    global_feats = torch.randn(b, d, generator=g, dtype=torch.float64)
    pids = torch.randint(0, ids, (b,), generator=g)
    return local, global_feats, pids


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_triplet_equals_loop_reference_in_value_and_gradient(mining, margin, seed):
    local, global_feats, pids = _batch(seed)
    pids[3] = 17  # an identity seen once: its anchor has no positive and is left out
    x1, x2 = local.clone().requires_grad_(), local.clone().requires_grad_()
    g1 = global_feats.clone().requires_grad_()
    ours = local_triplet_loss(x1, g1, pids, margin, mining)
    ref = _loop_reference(x2, global_feats, pids.tolist(), margin, mining)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-8, atol=1e-10)
    assert g1.grad is None  # the mining distance carries no gradient


def test_mining_with_global_and_with_local_distance_pick_different_pairs_here():
    """The two modes are not the same computation in disguise on this batch."""
    local, global_feats, pids = _batch(4)
    by_global = local_triplet_loss(local, global_feats, pids, 0.3, "global")
    by_local = local_triplet_loss(local, global_feats, pids, 0.3, "local")
    assert abs(float(by_global - by_local)) > 1e-3


def test_local_mining_needs_no_global_features():
    local, global_feats, pids = _batch(5)
    torch.testing.assert_close(
        local_triplet_loss(local, None, pids, 0.3, "local"),
        local_triplet_loss(local, global_feats, pids, 0.3, "local"),
    )


def _gaps(local, global_feats, pids: list[int], mining: str) -> list[float]:
    """d_ap - d_an of every anchor with a triplet, by the loops above (for the hinge's kink)."""
    out = []
    for a in range(len(pids)):
        pos = [p for p in range(len(pids)) if p != a and pids[p] == pids[a]]
        neg = [n for n in range(len(pids)) if pids[n] != pids[a]]

        def mine(c, a=a):
            if mining == "global":
                return float(torch.linalg.vector_norm(global_feats[a] - global_feats[c]))
            return float(_one_pair(local[a], local[c]).detach())

        p, n = max(pos, key=mine), min(neg, key=mine)
        out.append(float(_one_pair(local[a], local[p]) - _one_pair(local[a], local[n])))
    return out


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("margin", MARGINS)
def test_gradcheck_local_triplet_in_float64_on_a_tiny_batch(mining, margin):
    """Away from the hinge's kink (|gap + margin| >= 1e-3 checked) and, through the DP, from ties
    of its min (random inputs); the mining choice is constant under gradcheck's 1e-6 steps."""
    local, global_feats, pids = _batch(6, b=6, s=3, c=4, ids=3)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    if margin is not None:
        gaps = _gaps(local, global_feats, pids.tolist(), mining)
        assert min(abs(g + margin) for g in gaps) > 1e-3
    x = local.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: local_triplet_loss(t, global_feats, pids, margin, mining), (x,), eps=1e-6
    )


@pytest.mark.parametrize("mining", MINING)
def test_batch_without_any_triplet_is_zero_with_zero_gradient_as_the_global_triplet(mining):
    local, global_feats, _ = _batch(7, b=4)
    for pids in (torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 3])):
        x = local.clone().requires_grad_()
        loss = local_triplet_loss(x, global_feats, pids, 0.3, mining)
        (grad,) = torch.autograd.grad(loss, x)
        assert (
            float(loss.detach()) == 0.0 == float(batch_hard_triplet_loss(global_feats, pids, 0.3))
        )
        assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("mining", MINING)
def test_identity_seen_once_is_left_out_not_an_error_as_in_the_global_triplet(mining):
    """The global triplet loss leaves an anchor without a positive out of the mean (Hermans et al.
    define no term for it); the local one does the same rather than raise."""
    local, global_feats, _ = _batch(8, b=5)
    pids = torch.tensor([0, 0, 1, 1, 2])  # identity 2 once
    loss = local_triplet_loss(local, global_feats, pids, 0.3, mining)
    # the reference's mean runs over the 4 anchors with a triplet; sample 4 is still a negative
    ref = _loop_reference(local, global_feats, pids.tolist(), 0.3, mining)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert float(loss) > 0


def test_half_local_features_give_a_finite_float32_loss_and_gradient():
    local, global_feats, pids = _batch(9)
    x = local.to(torch.bfloat16).requires_grad_()
    loss = local_triplet_loss(x, global_feats.to(torch.bfloat16), pids, 0.3, "local")
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(x.grad.float()).all()
    ref = local_triplet_loss(x.detach().double(), global_feats, pids, 0.3, "local")
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=1e-4)


def test_bad_arguments_are_errors_naming_the_problem():
    local, global_feats, pids = _batch(10)
    with pytest.raises(ValueError, match="mining='nearest'"):
        local_triplet_loss(local, global_feats, pids, 0.3, "nearest")
    with pytest.raises(ValueError, match="needs the global features"):
        local_triplet_loss(local, None, pids, 0.3, "global")
    with pytest.raises(ValueError, match=r"local features \(B, S, C\)"):
        local_triplet_loss(local[:, 0], global_feats, pids, 0.3, "global")
    with pytest.raises(ValueError, match=r"global features \(B, D\)"):
        local_triplet_loss(local, global_feats[:5], pids, 0.3, "global")


def test_cross_rank_in_one_process_is_the_local_loss():
    local, global_feats, pids = _batch(11)
    for mining in MINING:
        want = local_triplet_loss(local, global_feats, pids, 0.3, mining)
        torch.testing.assert_close(
            cross_rank_local_triplet_loss(local, global_feats, pids, 0.3, mining), want
        )
        torch.testing.assert_close(
            local_triplet_loss(local, global_feats, pids, 0.3, mining, cross_rank=True), want
        )


# ----------------------------------------------------------------------------- two real ranks

WORLD, LOCAL_B = 2, 8


def _global_batch():
    """The concatenated 2 x B batch; rank r holds rows [r*B, (r+1)*B)."""
    local, global_feats, pids = _batch(1234, b=WORLD * LOCAL_B, ids=5)
    pids[5] = 99  # seen once: left out, so the global count of anchors differs from 2B
    return local, global_feats, pids


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        local, global_feats, pids = _global_batch()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        out = {}
        for mining in MINING:
            for margin in MARGINS:
                x = local[rows].clone().requires_grad_()
                loss = local_triplet_loss(
                    x, global_feats[rows], pids[rows], margin, mining, cross_rank=True
                )
                loss.backward()
                out[(mining, margin)] = (loss.detach(), x.grad)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo_local_triplet")
    mp.spawn(_rank_worker, args=(free_port(), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("margin", MARGINS)
def test_cross_rank_over_two_gloo_ranks_equals_one_process_on_the_whole_batch(
    two_ranks, mining, margin
):
    """Loss averaged over the ranks (DDP's mean) and each feature's gradient, summed over ranks
    and divided by W as DDP does, equal the single-process loss on the concatenated batch."""
    local, global_feats, pids = _global_batch()
    x = local.clone().requires_grad_()
    single = local_triplet_loss(x, global_feats, pids, margin, mining)
    single.backward()
    mean = sum(r[(mining, margin)][0] for r in two_ranks) / WORLD
    grads = torch.cat([r[(mining, margin)][1] for r in two_ranks]) / WORLD
    assert abs(float(mean - single.detach())) < 1e-12
    assert float((grads - x.grad).abs().max()) < 1e-12
    assert float(x.grad.abs().max()) > 1e-3  # a gradient worth comparing
