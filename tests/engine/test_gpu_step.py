"""The training step on CUDA, against the same step in fp32 on the CPU (``gpu``: skipped without a
CUDA device).

One DDPStrategy step (ResNet-18 at 64x32, cross-entropy + center loss, fused SGD on the GPU) in
fp32, bf16 and fp16 (GradScaler), with channels_last and with ``torch.compile``; the whole trainer
in a 1-rank NCCL group, resumed mid-run; SyncBatchNorm from ``prepare_model`` under NCCL (in a
group of one, torch runs it with BatchNorm's kernels: the cross-rank statistics need 2 GPUs).

Tolerances come from the same comparison made with CPU autocast (bf16 / fp16 against fp32, on this
model and batch): the loss agrees to 2e-5 relative, the updated model's loss decrease to 0.1%, the
model's update to cosine 0.988 (bf16) and 0.9986 (fp16). The bounds below leave a margin for
cuDNN's other kernels: cosine 0.9 and 0.97, loss 1e-2 and 2e-3, decrease within 20%. fp32 runs
with TF32 off, so it matches to summation order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hpc_reid.config import Config, load_config
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.optim import build_optimizer, strategy_args
from hpc_reid.engine.strategy import DDPStrategy, prepare_model
from hpc_reid.engine.trainer import train
from hpc_reid.losses import ReidLoss
from hpc_reid.models import build_model
from tests.ports import free_port
from tests.tiny import TINY_BATCH, TINY_DATA, TINY_SCHEDULE

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, needs_cuda]

REPO = Path(__file__).resolve().parents[2]
CLASSES, BATCH, LR = 8, 16, 0.01
CPU = torch.device("cpu")
# precision: (loss relative error, cosine of the model's update, loss decrease ratio bound)
TOLERANCE = {"fp32": (1e-4, 0.9999, 0.01), "bf16": (1e-2, 0.9, 0.2), "fp16": (2e-3, 0.97, 0.2)}


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 as IEEE fp32: cuDNN's convolutions use TF32 by default (cuBLAS's matmuls do not)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _batch(device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 64, 32, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    pids = torch.arange(CLASSES).repeat_interleave(BATCH // CLASSES).to(device)
    return images, pids


def _one_step(device, precision="fp32", channels_last=False, compile=False) -> dict:
    """One training step as the trainer runs it; returns the loss, the model's update (float64,
    on the CPU), the model after the step (on the CPU) and the fp16 loss scale."""
    config = Config.model_validate(
        {
            "model": {"backbone": "resnet18"},
            "loss": {"triplet": {"weight": 0.0}},  # hard mining may flip on rounding: not smooth
            "optimizer": {"name": "sgd", "lr": LR},
            "engine": {"precision": precision, "channels_last": channels_last},
        }
    )
    torch.manual_seed(0)
    model = build_model(config.model, CLASSES).to(device)  # built on the CPU: the same weights
    model, _ = prepare_model(model, config, device, 1)
    criterion = ReidLoss(config.loss, CLASSES, model.feature_dim).to(device)
    optimizer = build_optimizer(model, config.optimizer, LR)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    strategy = DDPStrategy(
        model, optimizer, constant, device=device, **strategy_args(config, criterion)
    )
    if precision == "fp16":
        # at GradScaler's default 65536 a fresh model's first step may overflow and be skipped
        # (as designed); 256 keeps this one compared step in range (256 on the CPU: cos 0.9986)
        strategy.scaler = torch.amp.GradScaler(device.type, init_scale=256.0)
    forward = torch.compile(strategy.model) if compile else strategy.model
    before = [p.detach().double().cpu() for p in model.parameters()]
    images, pids = _batch(device, channels_last)
    with strategy.autocast():
        outputs = forward(images)
    total, _ = criterion({k: v.float() for k, v in outputs.items()}, pids)
    strategy.step(total)
    after = [p.detach().double().cpu() for p in model.parameters()]
    update = torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)])
    scale = strategy.scaler.get_scale() if strategy.scaler.is_enabled() else None
    plain = model.float().cpu().to(memory_format=torch.contiguous_format)
    return {
        "loss": total.item(),
        "update": update,
        "model": plain,
        "criterion": criterion.cpu(),
        "scale": scale,
    }


def _loss_after(result: dict) -> float:
    """The loss of the updated model on the same batch, in fp32 on the CPU."""
    images, pids = _batch(CPU, False)
    with torch.no_grad():
        return result["criterion"](result["model"](images), pids)[0].item()


@pytest.fixture(scope="module")
def cpu_step() -> dict:
    result = _one_step(CPU)
    result["after"] = _loss_after(result)
    return result


def _assert_matches_cpu(result: dict, cpu: dict, precision: str) -> None:
    loss_tol, min_cos, decrease_tol = TOLERANCE[precision]
    assert result["loss"] == pytest.approx(cpu["loss"], rel=loss_tol)
    cos = torch.nn.functional.cosine_similarity(result["update"], cpu["update"], dim=0).item()
    assert cos > min_cos, f"{precision}: the update's cosine with fp32 on the CPU is {cos:.4f}"
    decrease, cpu_decrease = cpu["loss"] - _loss_after(result), cpu["loss"] - cpu["after"]
    assert cpu_decrease > 0
    assert decrease == pytest.approx(cpu_decrease, rel=decrease_tol)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_step_matches_the_cpu_fp32_step_within_its_precision(no_tf32, cpu_step, precision):
    result = _one_step(torch.device("cuda", 0), precision)
    _assert_matches_cpu(result, cpu_step, precision)
    if precision == "fp16":
        assert result["scale"] == 256.0  # not skipped: an overflow would have halved it


def test_cuda_bf16_channels_last_step_matches_the_cpu_fp32_step(no_tf32, cpu_step):
    result = _one_step(torch.device("cuda", 0), "bf16", channels_last=True)
    _assert_matches_cpu(result, cpu_step, "bf16")


def test_compiled_cuda_bf16_channels_last_step_matches_the_cpu_fp32_step(no_tf32, cpu_step):
    torch._dynamo.reset()
    result = _one_step(torch.device("cuda", 0), "bf16", channels_last=True, compile=True)
    _assert_matches_cpu(result, cpu_step, "bf16")


# ----------------------------------------------------------------------------- NCCL


@pytest.fixture
def nccl_group(monkeypatch):
    """A 1-rank NCCL group made from torchrun's variables, as a launcher would leave it."""
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method="env://", rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_trainer_runs_and_resumes_on_cuda_in_a_one_rank_nccl_group(tmp_path, nccl_group, capsys):
    sets = [
        *TINY_DATA,
        "model.backbone=osnet_x0_25",
        *TINY_BATCH,
        *TINY_SCHEDULE,
        "evaluation.every_epochs=0",
        "evaluation.backend=torch",  # the ranking kernels have tests of their own
        "loader.backend=torch",
        "logging.progress_bar=false",
        "logging.log_every=2",
        "engine.device=cuda",
        "engine.precision=bf16",
        "engine.channels_last=true",
        f"data.synthetic.cache_dir={tmp_path / 'cache'}",
        f"logging.output_dir={tmp_path / 'runs'}",
        "logging.run_name=nccl",
    ]
    config = load_config(REPO / "configs/synthetic/bot.yaml", sets)
    stopped = train(config, max_steps=5)
    assert stopped == {"stopped_at_step": 5, "preempted": False}
    state = load_checkpoint(CheckpointManager(tmp_path / "runs/nccl").latest())
    assert isinstance(state["rng"][0]["cuda"], torch.Tensor)  # this device's generator only
    summary = train(config, resume="auto")
    assert dist.is_initialized()  # the trainer leaves a group it found to its creator
    for key in ("rank-1", "mAP", "mINP"):
        assert 0.0 <= summary[key] <= 1.0
    out = capsys.readouterr().out
    assert "1 process(es) on cuda:0" in out
    assert "distributed.sync_bn=auto: one process, nothing to synchronise" in out
    assert "resumed from" in out


def test_sync_batchnorm_from_prepare_model_runs_on_cuda_under_nccl(nccl_group):
    """prepare_model as for 2 ranks converts BatchNorm, and the optimizer built after holds the
    converted layers in its norm group; in the 1-rank group SyncBatchNorm runs forward and
    backward on CUDA and equals BatchNorm. (With a world size of 1 torch's SyncBatchNorm takes
    BatchNorm's own kernels, so its cross-rank reduction is not exercised here.)"""
    device = torch.device("cuda", 0)
    config = Config.model_validate({"model": {"backbone": "resnet18"}})
    torch.manual_seed(0)
    plain = build_model(config.model, CLASSES).to(device)
    torch.manual_seed(0)
    synced, note = prepare_model(build_model(config.model, CLASSES).to(device), config, device, 2)
    assert "synchronised across 2 ranks" in note
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
        for m in synced.modules()
    )
    optimizer = build_optimizer(synced, config.optimizer, LR)
    norm = next(g for g in optimizer.param_groups if g["name"] == "norm_weights")
    sync_weights = {id(m.weight) for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)}
    assert sync_weights <= {id(p) for p in norm["params"]}
    images, _ = _batch(device, False)
    g = torch.Generator().manual_seed(2)
    weights = {
        k: torch.randn(BATCH, n, generator=g).to(device)
        for k, n in (("global", plain.feature_dim), ("logits", CLASSES))
    }
    outputs = {}
    for name, model in (("plain", plain), ("synced", synced)):
        out = model(images)
        sum((out[k] * w).sum() for k, w in weights.items()).backward()  # a loss with a gradient
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        outputs[name] = (out["bn"].detach(), grads)
    torch.testing.assert_close(outputs["synced"][0], outputs["plain"][0])
    assert all(grad is not None for grad in outputs["synced"][1])
    for a, b in zip(outputs["synced"][1], outputs["plain"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    bn = next(m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm))
    assert bn.num_batches_tracked.item() == 1
