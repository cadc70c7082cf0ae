from __future__ import annotations

import io
import math
import sys
import types

import pytest
import torch
from torch import nn

from hpc_reid.config import OptimizerConfig, ScheduleConfig
from hpc_reid.engine.optim import build_optimizer, build_scheduler, scaled_lr

pytestmark = pytest.mark.usefixtures("one_thread")


def _opt_cfg(**kw) -> OptimizerConfig:
    return OptimizerConfig.model_validate(kw)


# ----------------------------------------------------------------------------- LR scaling


@pytest.mark.parametrize(
    ("rule", "expected", "note"),
    [
        ("none", 3.5e-4, "lr 3.5e-4 (no scaling rule, global batch 128)"),
        ("linear", 7.0e-4, "lr 3.5e-4 x 128/64 (linear rule) = 7.0e-4"),
        ("sqrt", 3.5e-4 * 2**0.5, "lr 3.5e-4 x sqrt(128/64) (sqrt rule) = 4.95e-4"),
    ],
)
def test_scaled_lr_applies_the_rule_and_describes_it(rule, expected, note):
    cfg = _opt_cfg(lr=3.5e-4, lr_scaling={"rule": rule, "base_batch_size": 64})
    lr, text = scaled_lr(cfg, 128)
    assert lr == pytest.approx(expected, rel=1e-12)
    assert text == note


# ----------------------------------------------------------------------------- parameter groups


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3, bias=False)
        self.fc_again = self.fc  # shared: one entry in the optimizer
        self.head = nn.Linear(3, 2)
        self.head.requires_grad_(False)  # frozen: left out
        self.scale = nn.Parameter(torch.ones(3))


# By hand: which group every trainable parameter belongs to.
EXPECTED_GROUP = {
    "conv.weight": "weights",
    "fc.weight": "weights",
    "scale": "weights",
    "bn.weight": "norm_weights",
    "inorm.weight": "norm_weights",
    "gn.weight": "norm_weights",
    "ln.weight": "norm_weights",
    "conv.bias": "biases",
    "bn.bias": "biases",
    "inorm.bias": "biases",
    "gn.bias": "biases",
    "ln.bias": "biases",
}


def test_param_groups_follow_bot_bias_and_norm_rules_and_skip_frozen():
    model = _Net()
    cfg = _opt_cfg(
        name="sgd", weight_decay=5e-4, weight_decay_bias=1e-5, bias_lr_factor=2.0, momentum=0.8
    )
    opt = build_optimizer(model, cfg, lr=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: g["name"] for g in opt.param_groups for p in g["params"]}
    count = sum(len(g["params"]) for g in opt.param_groups)
    assert got == EXPECTED_GROUP
    assert count == len(EXPECTED_GROUP)
    hyper = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert hyper == {
        "weights": (0.01, 5e-4),
        "norm_weights": (0.01, 1e-5),
        "biases": (0.02, 1e-5),
    }
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.8 and g["nesterov"] is False for g in opt.param_groups)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_fused_true_runs_torch_fused_kernel_on_cpu_for_every_optimizer(name, cls):
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, _opt_cfg(name=name, betas=(0.8, 0.99), fused=True), lr=1e-3)
    assert type(opt) is cls
    assert all(g["fused"] is True for g in opt.param_groups)
    if name != "sgd":
        assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # the fused kernel really runs


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_default_is_off_on_cpu_where_foreach_is_faster(name):
    opt = build_optimizer(nn.Linear(4, 2), _opt_cfg(name=name), lr=1e-3)
    assert all(not g["fused"] for g in opt.param_groups)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_default_is_on_for_cuda_parameters():
    opt = build_optimizer(nn.Linear(4, 2).cuda(), _opt_cfg(name="adam"), lr=1e-3)
    assert all(g["fused"] is True for g in opt.param_groups)


class _ComplexNet(nn.Module):
    """Complex parameters have no fused kernel in torch."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, dtype=torch.complex64))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_falls_back_where_unsupported_and_explicit_true_is_an_error(name):
    model = _ComplexNet()
    opt = build_optimizer(model, _opt_cfg(name=name), lr=1e-3)
    assert all(not g["fused"] for g in opt.param_groups)
    model.w.grad = torch.ones_like(model.w)
    opt.step()
    with pytest.raises(ValueError, match=r"optimizer\.fused=true"):
        build_optimizer(model, _opt_cfg(name=name, fused=True), lr=1e-3)


def test_apex_missing_is_an_error_pointing_to_torch_fused(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # makes `import apex` fail
    with pytest.raises(ValueError, match=r"apex is not installed.*torch's fused optimizers"):
        build_optimizer(nn.Linear(2, 2), _opt_cfg(apex=True), lr=1e-3)


def test_apex_present_builds_fused_adam_over_the_same_groups(monkeypatch):
    class FusedAdam(torch.optim.Adam):
        def __init__(self, params, lr, betas, adam_w_mode):
            self.adam_w_mode = adam_w_mode
            super().__init__(params, lr=lr, betas=betas)

    apex = types.ModuleType("apex")
    apex.optimizers = types.ModuleType("apex.optimizers")
    apex.optimizers.FusedAdam = FusedAdam
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    opt = build_optimizer(_Net(), _opt_cfg(name="adamw", apex=True, bias_lr_factor=2.0), lr=1e-3)
    assert isinstance(opt, FusedAdam) and opt.adam_w_mode is True
    assert {g["name"]: g["lr"] for g in opt.param_groups}["biases"] == pytest.approx(2e-3)


# ----------------------------------------------------------------------------- schedule

IPE = 3  # iterations per epoch
BASE_LR, BIAS_FACTOR = 1e-3, 2.0


def _expected_weight_lr(it: int, cfg: ScheduleConfig) -> float:
    """The weights group's LR at iteration ``it``, written from the schedule's definition."""
    warm_iters = cfg.warmup_epochs * IPE
    warm = 1.0
    if it < warm_iters:
        warm = cfg.warmup_factor + (1 - cfg.warmup_factor) * it / warm_iters
    if cfg.kind == "multistep":
        epoch = it // IPE
        passed = len([m for m in cfg.milestones if epoch >= m])
        return BASE_LR * warm * cfg.gamma**passed
    if cfg.kind == "exponential":  # huanghoujing's adjust_lr_exp, its epoch ep counted from 1
        ep = it // IPE + 1
        if ep < cfg.decay_start:
            return BASE_LR * warm
        exponent = float(ep + 1 - cfg.decay_start) / (cfg.epochs + 1 - cfg.decay_start)
        return BASE_LR * warm * cfg.decay_to**exponent
    if it < warm_iters:
        return BASE_LR * warm
    progress = (it - warm_iters) / (cfg.epochs * IPE - warm_iters)
    return cfg.min_lr + (BASE_LR - cfg.min_lr) * (1 + math.cos(math.pi * progress)) / 2


SCHEDULES = {
    "multistep": ScheduleConfig(
        epochs=10,
        kind="multistep",
        milestones=[4, 7],
        gamma=0.1,
        warmup_epochs=2,
        warmup_factor=0.01,
    ),
    "multistep_no_warmup": ScheduleConfig(
        epochs=6, kind="multistep", milestones=[1, 5], gamma=0.5, warmup_epochs=0
    ),
    "cosine": ScheduleConfig(
        epochs=10, kind="cosine", warmup_epochs=3, warmup_factor=0.1, min_lr=1e-6
    ),
    "exponential": ScheduleConfig(
        epochs=10, kind="exponential", decay_start=4, decay_to=0.001, warmup_epochs=2
    ),
}


def _setup(cfg: ScheduleConfig):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = build_optimizer(model, _opt_cfg(name="adam", bias_lr_factor=BIAS_FACTOR), lr=BASE_LR)
    return model, opt, build_scheduler(opt, cfg, IPE)


def _train(model, opt, sched, iters: int, seed: int) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    lrs = []
    for _ in range(iters):
        lrs.append({grp["name"]: grp["lr"] for grp in opt.param_groups})
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_lr_at_every_iteration_equals_closed_form_and_groups_keep_their_ratio(kind):
    cfg = SCHEDULES[kind]
    model, opt, sched = _setup(cfg)
    lrs = _train(model, opt, sched, cfg.epochs * IPE, seed=0)
    for it, lr in enumerate(lrs):
        expected = _expected_weight_lr(it, cfg)
        assert lr["weights"] == pytest.approx(expected, rel=1e-12), it
        assert lr["norm_weights"] == pytest.approx(expected, rel=1e-12), it
        assert lr["biases"] == pytest.approx(BIAS_FACTOR * expected, rel=1e-12), it


@pytest.mark.parametrize("kind", ["multistep", "cosine", "exponential"])
def test_resume_from_state_dicts_continues_the_schedule_and_training_exactly(kind):
    cfg, total, cut = SCHEDULES[kind], SCHEDULES[kind].epochs * IPE, 13
    straight_model, opt, sched = _setup(cfg)
    straight = _train(straight_model, opt, sched, total, seed=1)

    model, opt, sched = _setup(cfg)
    first = _train(model, opt, sched, cut, seed=1)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    model2, opt2, sched2 = _setup(cfg)
    model2.load_state_dict(state["m"])
    opt2.load_state_dict(state["o"])
    sched2.load_state_dict(state["s"])
    # Continue with the same data stream as the uninterrupted run.
    g = torch.Generator().manual_seed(1)
    for _ in range(cut):
        torch.randn(8, 4, generator=g)
    rest = []
    for _ in range(total - cut):
        rest.append({grp["name"]: grp["lr"] for grp in opt2.param_groups})
        opt2.zero_grad()
        model2(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        opt2.step()
        sched2.step()
    assert first + rest == straight
    for a, b in zip(model2.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_cosine_floor_above_base_lr_is_an_error():
    cfg = ScheduleConfig(epochs=4, kind="cosine", warmup_epochs=0, min_lr=1.0)
    opt = build_optimizer(nn.Linear(2, 2), _opt_cfg(), lr=1e-3)
    with pytest.raises(ValueError, match=r"schedule\.min_lr"):
        build_scheduler(opt, cfg, IPE)


# ----------------------------------------------------------------------------- decoder groups


class _EncoderDecoder(nn.Module):
    """An encoder and, under a nested module named ``decoder`` (SAN's ``head.decoder``), a decoder;
    ``decoders`` (another name that merely starts alike) stays with the encoder."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.decoders = nn.Linear(4, 4)
        self.head = nn.Module()
        self.head.bn = nn.BatchNorm1d(4)
        self.head.decoder = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


DECODER_GROUP = {  # by hand, from the rule: a module path component equal to "decoder"
    "conv.weight": "weights",
    "conv.bias": "biases",
    "decoders.weight": "weights",
    "decoders.bias": "biases",
    "head.bn.weight": "norm_weights",
    "head.bn.bias": "biases",
    "head.decoder.0.weight": "decoder_weights",
    "head.decoder.0.bias": "decoder_biases",
    "head.decoder.1.weight": "decoder_norm_weights",
    "head.decoder.1.bias": "decoder_biases",
}


def test_decoder_parameters_get_groups_of_their_own_lr_betas_and_constant_mark():
    model = _EncoderDecoder()
    cfg = _opt_cfg(
        bias_lr_factor=2.0, betas=(0.9, 0.999), decoder_lr=1e-5, decoder_betas=(0.5, 0.999)
    )
    opt = build_optimizer(model, cfg, lr=8e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: g["name"] for g in opt.param_groups for p in g["params"]}
    assert got == DECODER_GROUP
    assert opt.param_groups[0]["name"] == "weights"  # the lr the run log shows
    hyper = {
        g["name"]: (g["lr"], g["betas"], g.get("constant_lr", False)) for g in opt.param_groups
    }
    assert hyper == {
        "weights": (8e-4, (0.9, 0.999), False),
        "norm_weights": (8e-4, (0.9, 0.999), False),
        "biases": (pytest.approx(1.6e-3), (0.9, 0.999), False),
        "decoder_weights": (1e-5, (0.5, 0.999), True),
        "decoder_norm_weights": (1e-5, (0.5, 0.999), True),
        "decoder_biases": (pytest.approx(2e-5), (0.5, 0.999), True),
    }


def test_decoder_weight_decay_applies_to_the_decoder_groups_only():
    cfg = _opt_cfg(weight_decay=5e-4, decoder_lr=1e-5, decoder_weight_decay=0.0)
    opt = build_optimizer(_EncoderDecoder(), cfg, lr=8e-4)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay["weights"] == 5e-4
    assert decay["decoder_weights"] == decay["decoder_norm_weights"] == 0.0
    assert decay["decoder_biases"] == 0.0
    with pytest.raises(ValueError, match=r"decoder_weight_decay=0\.0 .*decoder_lr set"):
        build_optimizer(_EncoderDecoder(), _opt_cfg(decoder_weight_decay=0.0), lr=1e-3)


def test_without_decoder_lr_the_decoder_is_grouped_like_any_module():
    model = _EncoderDecoder()
    opt = build_optimizer(model, _opt_cfg(), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: g["name"] for g in opt.param_groups for p in g["params"]}
    assert got == {n: kind.removeprefix("decoder_") for n, kind in DECODER_GROUP.items()}


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_decoder_lr_stays_constant_while_the_schedule_moves_the_rest(kind):
    cfg = SCHEDULES[kind]
    torch.manual_seed(0)
    model = _EncoderDecoder()
    opt = build_optimizer(model, _opt_cfg(bias_lr_factor=BIAS_FACTOR, decoder_lr=3e-5), lr=BASE_LR)
    sched = build_scheduler(opt, cfg, IPE)
    for it in range(cfg.epochs * IPE):
        lr = {grp["name"]: grp["lr"] for grp in opt.param_groups}
        assert lr["weights"] == pytest.approx(_expected_weight_lr(it, cfg), rel=1e-12), it
        assert lr["decoder_weights"] == lr["decoder_norm_weights"] == 3e-5, it
        assert lr["decoder_biases"] == pytest.approx(3e-5 * BIAS_FACTOR, rel=1e-12), it
        opt.step()  # no gradients: only the schedule moves
        sched.step()


def test_decoder_options_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match=r"optimizer\.decoder_lr=0\.001 .* no trainable .*decoder"):
        build_optimizer(_Net(), _opt_cfg(decoder_lr=1e-3), lr=1e-3)
    betas = r"decoder_betas=\(0\.5, 0\.999\) .* optimizer\.decoder_lr set"
    with pytest.raises(ValueError, match=betas):
        build_optimizer(_EncoderDecoder(), _opt_cfg(decoder_betas=(0.5, 0.999)), lr=1e-3)
    with pytest.raises(ValueError, match=r"optimizer\.amsgrad=True is an Adam option"):
        build_optimizer(_Net(), _opt_cfg(name="sgd", amsgrad=True), lr=1e-3)


def test_amsgrad_with_apex_is_refused(monkeypatch):
    apex = types.ModuleType("apex")
    apex.optimizers = types.ModuleType("apex.optimizers")
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    with pytest.raises(ValueError, match="FusedAdam has no AMSGrad"):
        build_optimizer(_Net(), _opt_cfg(apex=True, amsgrad=True), lr=1e-3)


def _adam_reference(p, grads, lr, betas, eps, weight_decay, decoupled, amsgrad=True):
    """AMSGrad (Reddi, Kale and Kumar, ICLR 2018, Algorithm 2) with Adam's bias corrections, as
    torch documents it, in float64 numpy: the step divides by the running maximum of v (by v
    itself without ``amsgrad``: plain Adam)."""
    import numpy as np

    p = p.astype(np.float64).copy()
    m, v, v_max = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = np.maximum(v_max, v) if amsgrad else v
        p = p - lr / (1 - b1**t) * m / (np.sqrt(v_max / (1 - b2**t)) + eps)
    return p


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_amsgrad_follows_the_running_maximum_of_the_second_moment(name):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, dtype=torch.float64))
    start = w.detach().numpy().copy()
    # large gradients first, then small ones: v falls below its maximum and AMSGrad leaves Adam
    grads = [torch.randn(6, dtype=torch.float64) * scale for scale in (5.0, 3.0, 0.1, 0.1, 0.05)]
    cfg = _opt_cfg(name=name, amsgrad=True, weight_decay=1e-2, betas=(0.9, 0.99))
    holder = nn.Module()
    holder.w = w
    opt = build_optimizer(holder, cfg, lr=1e-2)
    assert all(g["amsgrad"] is True for g in opt.param_groups)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    args = (start, [g.numpy() for g in grads], 1e-2, (0.9, 0.99), 1e-8, 1e-2, name == "adamw")
    expected = _adam_reference(*args)
    torch.testing.assert_close(w.detach(), torch.from_numpy(expected), rtol=1e-12, atol=1e-14)
    plain = _adam_reference(*args, amsgrad=False)  # the inputs tell the two apart
    assert abs(plain - expected).max() > 1e-6  # far beyond the tolerance above
