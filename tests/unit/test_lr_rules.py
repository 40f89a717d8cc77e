"""Large-batch LR rules as pure functions: closed-form scaling, warm-up and decay, presets, LARS, and the
constructor's checks. The callback in training: tests/integration/test_large_batch_callback.py."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_firecaffe.callbacks import LargeBatchScaling
from lightning_firecaffe.callbacks.large_batch import DEFAULTS
from lightning_firecaffe.large_batch import (
    PRESETS,
    LRPlan,
    apply_lars,
    check_warmup_fits,
    decay_factor,
    is_lars_exempt,
    scale_factor,
    trust_ratio,
    warmup_limit,
)
from lightning_firecaffe.options import InvalidOption

# ----------------------------------------------------------------------------- pure rules


def test_scaling_rules_closed_form():
    assert scale_factor("linear", 4096, 256) == 16
    assert scale_factor("sqrt", 4096, 256) == 4
    assert scale_factor("none", 4096, 256) == 1
    assert scale_factor("linear", 128, 256) == 0.5  # smaller batches scale down too


def test_sqrt_vs_linear_peak():
    kw = dict(base_lr=0.1, reference_batch=256, max_iter=100)
    lin = LRPlan(global_batch=2048, rule="linear", **kw)
    sq = LRPlan(global_batch=2048, rule="sqrt", **kw)
    assert lin.peak_lr == pytest.approx(0.8)
    assert sq.peak_lr == pytest.approx(0.1 * math.sqrt(8))
    assert lin.peak_lr / sq.peak_lr == pytest.approx(math.sqrt(8))


def test_warmup_endpoints_and_midpoint():
    s = LRPlan(base_lr=0.1, global_batch=2048, reference_batch=256, max_iter=100, warmup_iters=10, decay="constant")
    assert s.lr_at(0) == pytest.approx(0.1)  # starts at the base LR (Goyal et al.), not 0
    assert s.lr_at(5) == pytest.approx((0.1 + 0.8) / 2)
    assert s.lr_at(10) == pytest.approx(0.8)
    assert s.lr_at(99) == pytest.approx(0.8)
    lrs = [s.lr_at(i) for i in range(11)]
    assert lrs == sorted(lrs)


def test_poly_at_zero_half_and_end():
    s = LRPlan(base_lr=0.08, global_batch=1024, reference_batch=1024, max_iter=1000, decay="poly", power=0.5)
    assert s.lr_at(0) == pytest.approx(0.08)
    assert s.lr_at(500) == pytest.approx(0.08 * math.sqrt(0.5))
    assert s.lr_at(1000) == pytest.approx(0.0)
    assert s.lr_at(5000) == pytest.approx(0.0)  # clamped past the end
    # Caffe's formula exactly: base * (1 - it/max_iter)^power
    assert s.lr_at(321) == pytest.approx(0.08 * (1 - 321 / 1000) ** 0.5)


def test_poly_after_warmup_runs_over_the_remaining_iterations():
    s = LRPlan(
        base_lr=0.1, global_batch=512, reference_batch=256, max_iter=110, warmup_iters=10, decay="poly", power=2.0
    )
    assert s.lr_at(10) == pytest.approx(0.2)
    assert s.lr_at(60) == pytest.approx(0.2 * 0.25)
    assert s.lr_at(110) == pytest.approx(0.0)


def test_step_cosine_constant():
    kw = dict(base_lr=1.0, global_batch=256, reference_batch=256, max_iter=100)
    step = LRPlan(decay="step", step_size=30, gamma=0.1, **kw)
    assert [step.lr_at(i) for i in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])
    cos = LRPlan(decay="cosine", **kw)
    assert (cos.lr_at(0), cos.lr_at(50), cos.lr_at(100)) == pytest.approx((1.0, 0.5, 0.0))
    const = LRPlan(decay="constant", **kw)
    assert {const.lr_at(i) for i in range(100)} == {1.0}
    assert decay_factor("cosine", 25, 100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_firecaffe_preset_is_the_paper_recipe():
    p = PRESETS["firecaffe"]
    assert (p.batch_size, p.base_lr, p.decay, p.power, p.momentum, p.weight_decay, p.max_epochs) == (
        1024,
        0.08,
        "poly",
        0.5,
        0.9,
        2e-4,
        72,
    )
    cb = LargeBatchScaling(preset="firecaffe")
    s = LRPlan(
        base_lr=cb.base_lr,
        global_batch=1024,
        reference_batch=cb.reference_batch,
        max_iter=91000,
        rule=cb.rule,
        decay=cb.decay,
        power=cb.power,
    )
    assert s.lr_at(0) == pytest.approx(0.08) and s.lr_at(45500) == pytest.approx(0.08 * math.sqrt(0.5))
    # explicit arguments override the preset
    assert LargeBatchScaling(preset="firecaffe", rule="sqrt", warmup=2).rule == "sqrt"


def test_unset_arguments_take_the_preset_then_the_defaults():
    """The Hydra config passes every key, null when a run does not change it: nulls must not fight a preset."""
    unset = {key: None for key in DEFAULTS}
    plain = LargeBatchScaling(**unset)
    assert (plain.reference_batch, plain.rule, plain.decay, plain.log_name) == (256, "linear", "poly", "lr")
    assert {k: getattr(plain, k) for k in DEFAULTS} == DEFAULTS
    recipe = LargeBatchScaling(preset="firecaffe", **unset)
    assert (recipe.base_lr, recipe.reference_batch, recipe.decay, recipe.power, recipe.momentum) == (
        0.08,
        1024,
        "poly",
        0.5,
        0.9,
    )
    assert LargeBatchScaling(preset="firecaffe", **{**unset, "reference_batch": 512}).reference_batch == 512


@pytest.mark.parametrize(
    "kwargs, option, match",
    [
        (dict(rule="cubic"), "rule", r"rule='cubic' is not one of linear, sqrt, none"),
        (dict(decay="exp"), "decay", r"decay='exp' is not one of poly, step, cosine, constant"),
        (dict(unit="hour"), "unit", r"unit='hour' is not one of epoch, step"),
        (dict(preset="alexnet"), "preset", r"preset='alexnet' is not one of firecaffe, bvlc_googlenet"),
        (dict(base_lr=-0.1), "base_lr", r"base_lr=-0.1 must be a positive"),
        (dict(base_lr=0.0), "base_lr", r"base_lr=0.0 must be a positive"),
        (dict(base_lr=math.inf), "base_lr", r"base_lr=inf must be a positive, finite"),
        (dict(warmup=-1), "warmup", r"warmup=-1 must be a number of epochs >= 0"),
        (dict(warmup="1"), "warmup", r"warmup='1' must be a number"),
        (dict(decay="step"), "step_size", r"step_size=None must be a number > 0 for decay='step'"),
        (dict(decay="step", step_size=2, gamma=2), "gamma", r"gamma=2 must be in \(0, 1\]"),
        (dict(decay="poly", power=0), "power", r"power=0 must be a number > 0"),
        (dict(reference_batch=0), "reference_batch", r"reference_batch=0 must be an integer >= 1"),
        (dict(reference_batch=2.5), "reference_batch", r"reference_batch=2.5 must be an integer"),
        (dict(momentum=1.5), "momentum", r"momentum=1.5 must be in \[0, 1\)"),
        (dict(weight_decay=-1e-4), "weight_decay", r"weight_decay=-0.0001 must be >= 0"),
        (dict(lars=True, lars_eta=0), "lars_eta", r"lars_eta=0 must be a number > 0"),
        (dict(log_name=""), "log_name", r"log_name='' must be a non-empty"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, option, match):
    with pytest.raises(InvalidOption, match=r"^LargeBatchScaling: " + match) as err:
        LargeBatchScaling(**kwargs)
    assert err.value.option == option and err.value.value == {**DEFAULTS, **kwargs}[option]


def test_a_refused_setting_reads_as_a_config_key():
    with pytest.raises(InvalidOption) as err:
        LargeBatchScaling(rule="x")
    assert err.value.under("callbacks.large_batch") == "callbacks.large_batch.rule='x' is not one of linear, sqrt, none"


def test_schedule_validation():
    kw = dict(base_lr=0.1, global_batch=512, reference_batch=256)
    with pytest.raises(ValueError, match=r"warm-up of 100 iterations is not shorter than training \(100"):
        LRPlan(max_iter=100, warmup_iters=100, **kw)
    with pytest.raises(InvalidOption, match=r"^LRPlan: base_lr=-1.0 must be a positive"):
        LRPlan(max_iter=100, **{**kw, "base_lr": -1.0})
    with pytest.raises(InvalidOption, match=r"^LRPlan: rule='cubic'"):
        LRPlan(max_iter=100, rule="cubic", **kw)
    with pytest.raises(InvalidOption, match=r"warmup=5 \(epochs\) is not shorter than training \(max_epochs=5\)"):
        check_warmup_fits(5, "epoch", max_epochs=5)
    with pytest.raises(InvalidOption, match=r"max_steps=10"):
        check_warmup_fits(10, "step", max_epochs=5, max_steps=10)
    check_warmup_fits(5, "epoch", max_epochs=-1, max_steps=100)  # epoch length unknown yet: checked later
    assert warmup_limit(8, "epoch", max_epochs=8) == ("max_epochs", 8)
    assert warmup_limit(2, "step", max_epochs=1, max_steps=3) is None


# ----------------------------------------------------------------------------- LARS


def test_trust_ratio_hand_computed():
    # ||w|| = 5, ||g|| = 1: eta * 5 / (1 + beta * 5)
    assert trust_ratio(5.0, 1.0, eta=0.001, beta=0.0) == pytest.approx(0.005)
    assert trust_ratio(5.0, 1.0, eta=0.001, beta=0.1) == pytest.approx(0.005 / 1.5)
    assert trust_ratio(0.0, 1.0) == 1.0 and trust_ratio(5.0, 0.0) == 1.0


def test_apply_lars_then_sgd_gives_the_lars_update():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([2.0]))  # a bias: exempt
    w.grad = torch.tensor([[0.6, 0.8]])  # ||g|| = 1
    b.grad = torch.tensor([0.5])
    lr, wd, eta = 2.0, 0.1, 0.001
    opt = torch.optim.SGD([w, b], lr=lr, weight_decay=wd)
    ratios = apply_lars(opt.param_groups, eta=eta)
    assert ratios == pytest.approx([0.005 / 1.5])
    assert torch.equal(b.grad, torch.tensor([0.5]))
    opt.step()
    ratio = 0.001 * 5 / (1 + 0.1 * 5)
    expect_w = torch.tensor([[3.0, 4.0]]) - lr * ratio * (torch.tensor([[0.6, 0.8]]) + wd * torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(w.detach(), expect_w)
    assert torch.allclose(b.detach(), torch.tensor([2.0 - lr * (0.5 + wd * 2.0)]))
    assert is_lars_exempt(torch.zeros(3)) and not is_lars_exempt(torch.zeros(3, 3))
