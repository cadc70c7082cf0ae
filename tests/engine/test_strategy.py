"""The DDP strategy's parts that CPU runs never showed: the center loss's update as it runs in
training (summed over ranks, 1/weight, fp16 unscaling and overflow skipping) against a hand
computation, and ``distributed.sync_bn`` reaching the model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hpc_reid.config import Config, OptimizerConfig
from hpc_reid.engine.errors import TrainingError
from hpc_reid.engine.optim import param_groups
from hpc_reid.engine.strategy import DDPStrategy, prepare_model, sync_bn_applies
from hpc_reid.losses import CenterLoss
from tests.ports import free_port

B, D_IN, D, CLASSES = 6, 5, 4, 5
CENTER_LR, MODEL_LR = 0.5, 0.1
CUDA = torch.device("cuda", 0)  # only named: no test here touches a GPU
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- center loss


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch: B inputs and their identities (some shared between the ranks)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, D_IN, generator=g, dtype=torch.float64)
    pids = torch.randint(0, CLASSES, (B,), generator=g)
    return x, pids


def _start() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same initial linear model (W, b) and centers on every rank, in float64."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(D, D_IN, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    centers = torch.randn(CLASSES, D, generator=g, dtype=torch.float64)
    return w, b, centers


def _expected_centers(ranks: int) -> torch.Tensor:
    """BoT's center step by hand: c <- c - lr * mean over ranks of dL_C/dc, where on one rank
    dL_C/dc_j = (2 / B) sum_{i: y_i = j} (c_j - f_i) and f = x W^T + b; the loss weight does not
    enter (the strategy divides it out)."""
    w, b, centers = _start()
    grad = torch.zeros_like(centers)
    for rank in range(ranks):
        x, pids = _inputs(rank)
        feats = x @ w.T + b
        for i in range(B):
            grad[pids[i]] += 2.0 / B * (centers[pids[i]] - feats[i])
    return centers - CENTER_LR * grad / ranks


def _strategy(precision: str, weight: float) -> tuple[DDPStrategy, nn.Linear, CenterLoss]:
    w, b, centers = _start()
    model = nn.Linear(D_IN, D)
    center = CenterLoss(CLASSES, D)
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
        center.centers.copy_(centers)
    optimizer = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
    strategy = DDPStrategy(
        model,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0),
        device=CPU,
        precision=precision,
        extra_params=list(center.parameters()),
        extra_optimizer=torch.optim.SGD(center.parameters(), lr=CENTER_LR),
        extra_grad_scale=1.0 / weight,
    )
    return strategy, model, center


def _loss(strategy, center, rank: int, weight: float) -> torch.Tensor:
    x, pids = _inputs(rank)
    feats = strategy.model(x.float())
    # a model term besides the weighted center loss, as in training (CE + triplet + center)
    return feats.pow(2).mean() + weight * center(feats, pids)


def _two_step_run(rank: int, precision: str, weight: float) -> dict[str, object]:
    """Step 1 as in training; step 2 with rank 1's loss overflowing fp32 once scaled."""
    strategy, model, center = _strategy(precision, weight)
    strategy.step(_loss(strategy, center, rank, weight))
    out: dict[str, object] = {"centers1": center.centers.detach().clone()}
    model_after_1 = [p.detach().clone() for p in model.parameters()]
    scale_after_1 = strategy.scaler.get_scale() if strategy.scaler.is_enabled() else None
    if precision == "fp16":
        loss = _loss(strategy, center, rank, weight)
        # 1e34 x the scale (65536) exceeds float32's range: every gradient becomes inf/nan
        strategy.step(loss * 1e34 if rank == 1 else loss)
        out["centers2"] = center.centers.detach().clone()
        out["model_unchanged"] = all(
            torch.equal(a, p) for a, p in zip(model_after_1, model.parameters(), strict=True)
        )
        out["scales"] = (scale_after_1, strategy.scaler.get_scale())
    return out


def _rank_main(rank: int, port: int, weight: float, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for precision in ("fp32", "fp16"):
            out[(rank, precision)] = _two_step_run(rank, precision, weight)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("weight", [0.0005, 1.0])
def test_one_process_center_step_is_bots_unweighted_sgd_step(weight):
    strategy, _, center = _strategy("fp32", weight)
    strategy.step(_loss(strategy, center, 0, weight))
    got = center.centers.detach().double()
    torch.testing.assert_close(got, _expected_centers(1), rtol=1e-5, atol=1e-5)


def test_two_rank_center_step_averages_over_ranks_and_fp16_overflow_skips_it():
    """The production path (DDPStrategy._step_extra) on 2 gloo ranks: the centers after one step
    equal the hand-computed mean-over-ranks SGD step in fp32 and under an fp16 GradScaler; an
    overflowing step on one rank skips the centers' and the model's step on both ranks and halves
    the scale."""
    weight = 0.01
    out = mp.Manager().dict()
    mp.spawn(_rank_main, args=(free_port(), weight, out), nprocs=2, join=True)
    expected = _expected_centers(2)
    assert not torch.allclose(expected, _expected_centers(1))  # the ranks' batches differ
    for rank in (0, 1):
        for precision in ("fp32", "fp16"):
            got = out[(rank, precision)]["centers1"].double()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        fp16 = out[(rank, "fp16")]
        assert torch.equal(fp16["centers2"], fp16["centers1"]), f"rank {rank} stepped on inf"
        assert fp16["model_unchanged"], f"rank {rank}: the model stepped on inf"
        assert fp16["scales"] == (65536.0, 32768.0)


# ----------------------------------------------------------------------------- SyncBatchNorm


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.BatchNorm1d(8),
    )


def _config(sync_bn, channels_last: bool = False) -> Config:
    return Config.model_validate(
        {"distributed": {"sync_bn": sync_bn}, "engine": {"channels_last": channels_last}}
    )


def _kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__]


def test_sync_bn_default_is_auto():
    assert Config().distributed.sync_bn == "auto"


@pytest.mark.parametrize("setting", ["auto", True])
def test_prepare_model_converts_batchnorm_for_cuda_with_two_ranks(setting):
    model = _bn_model()
    before = {n: p for n, p in model.named_parameters()}
    groups = {g["name"]: len(g["params"]) for g in param_groups(model, OptimizerConfig(), 0.1)}
    converted, note = prepare_model(model, _config(setting), CUDA, world=2)
    assert _kinds(converted) == ["SyncBatchNorm", "SyncBatchNorm"]
    assert "2 BatchNorm layers synchronised across 2 ranks" in note
    # the same parameter objects (an optimizer built before would still hold them) ...
    after = dict(converted.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    # ... and the optimizer built after keeps SyncBatchNorm weights in the norm-layer group
    groups_after = param_groups(converted, OptimizerConfig(), 0.1)
    assert {g["name"]: len(g["params"]) for g in groups_after} == groups
    norm = next(g for g in groups_after if g["name"] == "norm_weights")
    assert {id(p) for p in norm["params"]} == {id(before["1.weight"]), id(before["5.weight"])}


@pytest.mark.parametrize(
    ("setting", "device", "world", "says"),
    [
        ("auto", CUDA, 1, "one process, nothing to synchronise"),
        (True, CUDA, 1, "one process, nothing to synchronise"),
        (False, CUDA, 2, "own batch statistics"),
        ("auto", CPU, 2, "off on cpu"),
        ("auto", CPU, 1, "one process"),
    ],
)
def test_prepare_model_keeps_batchnorm_where_sync_bn_does_not_apply(setting, device, world, says):
    converted, note = prepare_model(_bn_model(), _config(setting), device, world)
    assert _kinds(converted) == ["BatchNorm2d", "BatchNorm1d"]
    assert says in note
    assert sync_bn_applies(setting, device, world) is False


@pytest.mark.parametrize("world", [1, 2])
def test_sync_bn_true_on_cpu_is_refused_naming_the_key(world):
    with pytest.raises(TrainingError, match=r"distributed\.sync_bn=true .* runs only on CUDA"):
        prepare_model(_bn_model(), _config(True), CPU, world)


def test_prepare_model_applies_channels_last():
    model, _ = prepare_model(_bn_model(), _config("auto", channels_last=True), CPU, 1)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()


def test_prepare_model_keeps_deepspeed_weights_contiguous_for_its_byte_view_broadcast():
    config = _config("auto", channels_last=True).model_copy(deep=True)
    config.engine.strategy = "deepspeed"
    model, _ = prepare_model(_bn_model(), config, CPU, 1)
    weight = model[0].weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    weight.data.view(torch.uint8)  # what deepspeed.initialize does to broadcast it
