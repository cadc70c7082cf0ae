"""One DDP step on 2 gloo ranks x batch B gives the gradients of 1 process x batch 2B.

BatchNorm runs on running statistics (per-rank batch statistics would differ by design) and the
triplet loss mines across ranks, so both runs mine over the same 2B features. The loss is the
trainer's whole ReidLoss (cross-entropy + triplet + center).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpc_reid.config import LossConfig, ModelConfig
from hpc_reid.losses import ReidLoss
from hpc_reid.models import build_model
from tests.ports import free_port

B, CLASSES = 8, 4


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone="osnet_x0_25"), CLASSES).double()
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    loss = ReidLoss(LossConfig(triplet={"cross_rank": True}), CLASSES, model.feature_dim).double()
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2 * B, 3, 64, 32, generator=generator, dtype=torch.float64)
    # identity-balanced like the sampler: each rank holds 2 identities x 4 images
    pids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)
    return model, loss, images, pids


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_main(rank: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, loss, images, pids = _setup()
        ddp = DistributedDataParallel(model)
        local = slice(rank * B, (rank + 1) * B)
        total, _ = loss(ddp(images[local]), pids[local])
        total.backward()
        out[f"center{rank}"] = loss.center.centers.grad.clone()
        if rank == 0:
            out["grads"] = _grads(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_of_b_match_one_process_of_2b():
    torch.set_num_threads(1)
    model, loss, images, pids = _setup()
    total, _ = loss(model(images), pids)
    total.backward()
    expected = _grads(model)
    expected_center = loss.center.centers.grad.clone()

    out = mp.Manager().dict()
    mp.spawn(_rank_main, args=(free_port(), out), nprocs=2, join=True)
    got = out["grads"]
    assert got.keys() == expected.keys()
    assert len(got) > 50  # the whole backbone, not just the head
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-7, atol=1e-10, msg=name)
    # the centers live outside DDP, so each rank holds its own gradient; their mean is the
    # one-process gradient (what DDPStrategy._step_extra relies on: tests/engine/test_strategy.py
    # checks that path itself)
    center = (out["center0"] + out["center1"]) / 2
    torch.testing.assert_close(center, expected_center, rtol=1e-7, atol=1e-12)
