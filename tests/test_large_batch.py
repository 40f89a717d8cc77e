"""Large-batch LR scaling: closed-form rules, LARS, global-batch inference, and exact resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from lightning_firecaffe.callbacks import LargeBatchScaling
from lightning_firecaffe.callbacks.large_batch import DEFAULTS
from lightning_firecaffe.large_batch import (
    PRESETS,
    LRSchedule,
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
    lin = LRSchedule(global_batch=2048, rule="linear", **kw)
    sq = LRSchedule(global_batch=2048, rule="sqrt", **kw)
    assert lin.peak_lr == pytest.approx(0.8)
    assert sq.peak_lr == pytest.approx(0.1 * math.sqrt(8))
    assert lin.peak_lr / sq.peak_lr == pytest.approx(math.sqrt(8))


def test_warmup_endpoints_and_midpoint():
    s = LRSchedule(base_lr=0.1, global_batch=2048, reference_batch=256, max_iter=100, warmup_iters=10,
                   decay="constant")
    assert s.lr_at(0) == pytest.approx(0.1)  # starts at the base LR (Goyal et al.), not 0
    assert s.lr_at(5) == pytest.approx((0.1 + 0.8) / 2)
    assert s.lr_at(10) == pytest.approx(0.8)
    assert s.lr_at(99) == pytest.approx(0.8)
    lrs = [s.lr_at(i) for i in range(11)]
    assert lrs == sorted(lrs)


def test_poly_at_zero_half_and_end():
    s = LRSchedule(base_lr=0.08, global_batch=1024, reference_batch=1024, max_iter=1000, decay="poly", power=0.5)
    assert s.lr_at(0) == pytest.approx(0.08)
    assert s.lr_at(500) == pytest.approx(0.08 * math.sqrt(0.5))
    assert s.lr_at(1000) == pytest.approx(0.0)
    assert s.lr_at(5000) == pytest.approx(0.0)  # clamped past the end
    # Caffe's formula exactly: base * (1 - it/max_iter)^power
    assert s.lr_at(321) == pytest.approx(0.08 * (1 - 321 / 1000) ** 0.5)


def test_poly_after_warmup_runs_over_the_remaining_iterations():
    s = LRSchedule(base_lr=0.1, global_batch=512, reference_batch=256, max_iter=110, warmup_iters=10,
                   decay="poly", power=2.0)
    assert s.lr_at(10) == pytest.approx(0.2)
    assert s.lr_at(60) == pytest.approx(0.2 * 0.25)
    assert s.lr_at(110) == pytest.approx(0.0)


def test_step_cosine_constant():
    kw = dict(base_lr=1.0, global_batch=256, reference_batch=256, max_iter=100)
    step = LRSchedule(decay="step", step_size=30, gamma=0.1, **kw)
    assert [step.lr_at(i) for i in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])
    cos = LRSchedule(decay="cosine", **kw)
    assert (cos.lr_at(0), cos.lr_at(50), cos.lr_at(100)) == pytest.approx((1.0, 0.5, 0.0))
    const = LRSchedule(decay="constant", **kw)
    assert {const.lr_at(i) for i in range(100)} == {1.0}
    assert decay_factor("cosine", 25, 100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_firecaffe_preset_is_the_paper_recipe():
    p = PRESETS["firecaffe"]
    assert (p.batch_size, p.base_lr, p.decay, p.power, p.momentum, p.weight_decay, p.max_epochs) == (
        1024, 0.08, "poly", 0.5, 0.9, 2e-4, 72)
    cb = LargeBatchScaling(preset="firecaffe")
    s = LRSchedule(base_lr=cb.base_lr, global_batch=1024, reference_batch=cb.reference_batch, max_iter=91000,
                   rule=cb.rule, decay=cb.decay, power=cb.power)
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
        0.08, 1024, "poly", 0.5, 0.9)
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
        LRSchedule(max_iter=100, warmup_iters=100, **kw)
    with pytest.raises(InvalidOption, match=r"^LRSchedule: base_lr=-1.0 must be a positive"):
        LRSchedule(max_iter=100, **{**kw, "base_lr": -1.0})
    with pytest.raises(InvalidOption, match=r"^LRSchedule: rule='cubic'"):
        LRSchedule(max_iter=100, rule="cubic", **kw)
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


# ----------------------------------------------------------------------------- Lightning


class TinyModel(BoringModel):
    """BoringModel with a chosen per-device batch and plain SGD (no scheduler)."""

    def __init__(self, batch_size: int = 2, lr: float = 0.1, momentum: float = 0.0):
        super().__init__()
        self.batch_size, self.lr, self.momentum = batch_size, lr, momentum

    def train_dataloader(self):
        return DataLoader(RandomDataset(32, 64), batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class LRRecorder(pl.Callback):
    """Records (global_step, lr) at every optimizer step; rank 0 can dump them to a JSON file."""

    def __init__(self, out: Path | None = None):
        self.steps: dict[int, float] = {}
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[trainer.global_step] = optimizer.param_groups[0]["lr"]

    def on_train_end(self, trainer, pl_module):
        if self.out is not None and trainer.global_rank == 0:
            cb = next(c for c in trainer.callbacks if isinstance(c, LargeBatchScaling))
            self.out.write_text(json.dumps({
                "steps": self.steps, "global_batch": cb.global_batch, "layout": cb.batch_layout,
                "max_iter": cb.schedule.max_iter, "warmup_iters": cb.schedule.warmup_iters,
                "world_size": trainer.world_size, "summary": cb.describe(),
            }))


def _trainer(tmp_path, callbacks, **kw):
    args = dict(
        accelerator="cpu", devices=1, max_epochs=3, limit_train_batches=8, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def test_callback_follows_the_schedule_and_logs_every_step(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    cb = LargeBatchScaling(reference_batch=2, warmup=1, unit="epoch", decay="poly", power=0.5)
    rec = LRRecorder()
    trainer = _trainer(tmp_path, [cb, rec], accumulate_grad_batches=2, log_every_n_steps=1,
                       logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(TinyModel(batch_size=2, lr=0.1))
    # global batch 2 x 1 x 2 = 4 = 2x the reference; 8 batches / 2 = 4 steps per epoch, 3 epochs
    assert cb.global_batch == 4 and cb.batch_layout == {"per_device": 2, "world_size": 1, "accumulate": 2}
    s = cb.schedule
    assert (s.max_iter, s.warmup_iters, s.peak_lr) == (12, 4, pytest.approx(0.2))
    expected = [0.1 + 0.1 * i / 4 for i in range(4)] + [0.2 * (1 - i / 8) ** 0.5 for i in range(8)]
    assert [rec.steps[i] for i in range(12)] == pytest.approx(expected)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): float(r["lr"]) for r in rows if r.get("lr")}
    assert logged == pytest.approx(dict(enumerate(expected)))
    lines = [r.getMessage() for r in caplog.records if "LargeBatchScaling: global batch" in r.getMessage()]
    assert len(lines) == 1
    assert "global batch 4" in lines[0] and "peak LR 0.2" in lines[0] and "warm-up 4 iterations" in lines[0]
    assert "12 iterations in total" in lines[0]


def test_warmup_longer_than_the_run_is_refused(tmp_path):
    cb = LargeBatchScaling(reference_batch=2, warmup=5, unit="step")
    with pytest.raises(ValueError, match="not shorter than training"):
        _trainer(tmp_path, [cb], max_epochs=None, max_steps=4).fit(TinyModel())
    cb = LargeBatchScaling(reference_batch=2, warmup=2, unit="epoch")  # 2 epochs of 8 steps > max_steps=6
    with pytest.raises(ValueError, match=r"warmup=2 epochs.*warm-up of 16 iterations is not shorter than training"):
        _trainer(tmp_path, [cb], max_epochs=5, max_steps=6).fit(TinyModel())


def test_momentum_weight_decay_and_per_group_base_lrs(tmp_path):
    class TwoGroups(TinyModel):
        def configure_optimizers(self):
            w, b = self.layer.weight, self.layer.bias
            return torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.1)

    cb = LargeBatchScaling(reference_batch=1, rule="sqrt", decay="constant", momentum=0.9, weight_decay=2e-4)
    trainer = _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2)
    trainer.fit(TwoGroups(batch_size=4))
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.2, 0.02])  # sqrt(4) = 2, ratio kept
    assert {g["momentum"] for g in groups} == {0.9} and {g["weight_decay"] for g in groups} == {2e-4}


def test_lars_in_training_moves_weights_by_eta_times_their_norm(tmp_path):
    model = TinyModel(batch_size=4, lr=0.5)
    w0 = model.layer.weight.detach().clone()
    cb = LargeBatchScaling(reference_batch=4, decay="constant", lars=True, lars_eta=0.01)
    _trainer(tmp_path, [cb], max_epochs=None, max_steps=1).fit(model)
    # no weight decay: ratio * ||g|| = eta * ||w||, so one SGD step moves w by lr * eta * ||w||
    moved = torch.linalg.vector_norm(model.layer.weight.detach() - w0)
    assert float(moved) == pytest.approx(0.5 * 0.01 * float(torch.linalg.vector_norm(w0)), rel=1e-4)


def test_resume_continues_the_lr_sequence_exactly(tmp_path):
    def run(ckpt_path=None, ckpt_dir=None):
        cb = LargeBatchScaling(reference_batch=2, warmup=1, unit="epoch", decay="poly", power=0.5)
        rec = LRRecorder()
        cbs = [cb, rec]
        if ckpt_dir is not None:
            cbs.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1))
        trainer = _trainer(tmp_path, cbs, accumulate_grad_batches=2, max_epochs=4, enable_checkpointing=True)
        # base LR taken from the optimizer: a resume that re-read it would start from a decayed LR
        trainer.fit(TinyModel(batch_size=2, lr=0.1, momentum=0.9), ckpt_path=ckpt_path)
        return rec.steps, trainer

    full, _ = run(ckpt_dir=tmp_path / "ckpt")
    assert len(full) == 16
    ckpt = tmp_path / "ckpt" / "epoch=1-step=5.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, trainer = run(ckpt_path=ckpt)
    assert min(resumed) == 5 and trainer.global_step == 16
    assert resumed == {k: v for k, v in full.items() if k >= 5}  # exact, not approximately


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_global_batch_inferred_across_two_processes_and_accumulation(tmp_path):
    out = tmp_path / "rank0.json"
    cb = LargeBatchScaling(reference_batch=4, warmup=2, unit="step", decay="poly", power=1.0)
    trainer = _trainer(
        tmp_path, [cb, LRRecorder(out)], strategy="ddp_fork", devices=2, accumulate_grad_batches=4,
        max_epochs=1, limit_train_batches=16,
    )
    trainer.fit(TinyModel(batch_size=2, lr=0.05))
    got = json.loads(out.read_text())
    assert got["world_size"] == 2
    assert got["global_batch"] == 16 and got["layout"] == {"per_device": 2, "world_size": 2, "accumulate": 4}
    assert (got["max_iter"], got["warmup_iters"]) == (4, 2)  # 16 batches per rank / 4 accumulated
    peak = 0.05 * 16 / 4
    expected = [0.05, (0.05 + peak) / 2, peak, peak * 0.5]
    assert [got["steps"][str(i)] for i in range(4)] == pytest.approx(expected)
    assert "global batch 16 = 2 per device x 2 devices x 4 accumulation" in got["summary"]
