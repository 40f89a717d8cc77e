"""``LargeBatchScaling``: FireCaffe's third pillar as a Lightning callback.

It finds the global batch itself (per-device batch x world size x gradient accumulation), scales the
optimizer's LR from a reference batch, warms up and decays it every optimizer step, optionally applies
LARS, logs the LR and checkpoints its state so a resumed run continues the LR plan exactly. All the
arithmetic lives in :mod:`lightning_firecaffe.large_batch`; this module only wires it into the Trainer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from ..large_batch import (
    DECAYS,
    SCALING_RULES,
    DivergenceRule,
    LossHistory,
    LRPlan,
    TrainingDiverged,
    apply_lars,
    check_choice,
    check_decay_params,
    check_lr,
    check_warmup,
    check_warmup_fits,
    clip_threshold,
    get_preset,
    lr_owner,
    warmup_for_batch,
)
from ..options import is_int, is_number, require

# lr_owner lived here before models stopped importing callbacks; re-exported for code that imports it from here.
__all__ = ["DEFAULTS", "LargeBatchScaling", "lr_owner", "resolve_settings"]

# The one owner of the defaults: used where neither the constructor nor a preset says otherwise (the
# Hydra config sets only what a run changes, so a preset applies without nulls).
DEFAULTS: dict[str, Any] = {
    "base_lr": None,  # None: each param group keeps the LR configure_optimizers gave it
    "reference_batch": 256,  # Goyal et al.'s convention: "LR x for batch 256"
    "rule": "linear",
    "warmup": 0.0,
    "unit": "epoch",
    "decay": "poly",
    "power": 0.5,
    "step_size": None,
    "gamma": 0.1,
    "momentum": None,  # None: leave the optimizer's value
    "weight_decay": None,
    "lars": False,
    "lars_eta": 0.001,  # You et al.'s trust coefficient
    "warmup_per_multiple": 0.0,  # warm-up grows by this many `unit`s per batch multiple above reference_batch
    "clip_factor": None,  # clip the global gradient norm at this x its median over the last 20 steps
    "decay_biases": True,  # False: param groups of biases / norm parameters (<= 1-d) get no weight decay
    "guard": True,  # stop a diverging run (non-finite loss, or guard_factor x its recent median)
    "guard_factor": 5.0,
    "log_name": "lr",
    "verbose": True,
}


def resolve_settings(preset: str | None, explicit: dict[str, Any], owner: str = "LargeBatchScaling") -> dict[str, Any]:
    """The one merge rule: :data:`DEFAULTS`, then the preset's settings, then every explicit non-``None`` value."""
    settings = dict(DEFAULTS)
    if preset is not None:
        settings.update(get_preset(preset, owner).callback_settings())
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return settings


class LargeBatchScaling(Callback):
    """Scale, warm up and decay the LR of every param group, per optimizer step, from the global batch.

    Every argument defaults to ``None``: the preset's value when ``preset`` is given, else :data:`DEFAULTS`.
    A bad argument raises :class:`~lightning_firecaffe.options.InvalidOption` naming it.

    Args:
        preset: a named recipe (``firecaffe``, ``bvlc_googlenet``); explicit arguments override it.
        rule: ``linear`` | ``sqrt`` | ``none``: how the LR grows with ``global batch / reference_batch``.
        reference_batch: the batch the base LR was tuned for (default 256).
        base_lr: LR at the reference batch; ``None`` keeps each param group's configured LR as its base.
        warmup: length of the ramp from base to peak LR, in ``unit`` (0: none).
        unit: ``epoch`` | ``step``: unit of ``warmup`` and ``step_size``.
        decay: ``poly`` | ``step`` | ``cosine`` | ``constant``, running from the end of warm-up to the end.
        power: exponent of ``poly`` (Caffe; FireCaffe used 0.5).
        step_size, gamma: ``step`` decay multiplies the LR by ``gamma`` every ``step_size`` ``unit``\\ s.
        momentum, weight_decay: if set, written into every param group at train start.
        lars: apply the LARS trust ratio to gradients before each optimizer step (SGD-style weight decay).
        lars_eta: LARS trust coefficient (You et al.: 0.001).
        log_name: metric name of the logged LR (first param group; ``name-i`` for optimizer ``i`` > 0).
        verbose: rank 0 logs one summary line when the LR plan is resolved.
        warmup_per_multiple: the warm-up grows by this many ``unit``\\ s per batch multiple above the
            reference (Goyal et al.'s fixed epochs shrink in iterations as the batch grows).
        clip_factor: clip the global gradient norm (after the all-reduce, so every rank clips alike) at this
            multiple of its median over the previous 20 steps; ``None``: no clipping.
        decay_biases: ``False`` sets weight decay 0 in every param group that holds only biases /
            normalisation parameters (<= 1-d), instead of writing ``weight_decay`` into them.
        guard: stop a diverging run: a non-finite loss, or a loss (averaged over ranks) above ``guard_factor``
            x its median over the previous 20 steps, raises :class:`~lightning_firecaffe.large_batch.TrainingDiverged`
            naming the step, the LR and the settings to change.
    """

    owns_learning_rate = True  # read by large_batch.lr_owner: a model must not schedule the LR beside it

    def __init__(
        self,
        preset: str | None = None,
        rule: str | None = None,
        reference_batch: int | None = None,
        base_lr: float | None = None,
        warmup: float | None = None,
        unit: str | None = None,
        decay: str | None = None,
        power: float | None = None,
        step_size: float | None = None,
        gamma: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        lars: bool | None = None,
        lars_eta: float | None = None,
        log_name: str | None = None,
        verbose: bool | None = None,
        warmup_per_multiple: float | None = None,
        clip_factor: float | None = None,
        decay_biases: bool | None = None,
        guard: bool | None = None,
        guard_factor: float | None = None,
    ) -> None:
        explicit = dict(
            rule=rule,
            reference_batch=reference_batch,
            base_lr=base_lr,
            warmup=warmup,
            unit=unit,
            decay=decay,
            power=power,
            step_size=step_size,
            gamma=gamma,
            momentum=momentum,
            weight_decay=weight_decay,
            lars=lars,
            lars_eta=lars_eta,
            log_name=log_name,
            verbose=verbose,
            warmup_per_multiple=warmup_per_multiple,
            clip_factor=clip_factor,
            decay_biases=decay_biases,
            guard=guard,
            guard_factor=guard_factor,
        )
        settings = _checked(resolve_settings(preset, explicit, type(self).__name__), type(self).__name__)
        self.preset = preset
        self.rule: str = settings["rule"]
        self.reference_batch: int = settings["reference_batch"]
        self.base_lr: float | None = settings["base_lr"]
        self.warmup: float = settings["warmup"]
        self.unit: str = settings["unit"]
        self.decay: str = settings["decay"]
        self.power, self.step_size, self.gamma = settings["power"], settings["step_size"], settings["gamma"]
        self.momentum, self.weight_decay = settings["momentum"], settings["weight_decay"]
        self.lars, self.lars_eta = settings["lars"], settings["lars_eta"]
        self.log_name, self.verbose = settings["log_name"], bool(settings["verbose"])
        self.warmup_per_multiple: float = settings["warmup_per_multiple"]
        self.clip_factor: float | None = settings["clip_factor"]
        self.decay_biases: bool = settings["decay_biases"]
        self.guard: bool = settings["guard"]
        self.guard_factor: float = settings["guard_factor"]
        self._grad_norms: deque[float] = deque(maxlen=20)
        self._losses = LossHistory(DivergenceRule(factor=self.guard_factor))
        self.clipped_steps = 0

        # Resolved at run time and checkpointed.
        self.lr_plan: LRPlan | None = None
        self.base_lrs: list[float] | None = None
        self.batch_layout: dict[str, int] | None = None  # per_device, world_size, accumulate
        self._max_iter: int | None = None
        self._steps_per_epoch: int | None = None
        self._checked_batch = False

    # ----------------------------------------------------------------- properties
    @property
    def global_batch(self) -> int | None:
        return self.lr_plan.global_batch if self.lr_plan else None

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Fail fast on a warm-up that cannot fit, before any data is loaded.
        check_warmup_fits(
            self.warmup,
            self.unit,
            max_epochs=trainer.max_epochs,
            max_steps=trainer.max_steps,
            owner=type(self).__name__,
        )
        # A new fit starts from scratch; a checkpoint (restored after this hook) brings the state back.
        self.lr_plan = self.base_lrs = self.batch_layout = None
        self._checked_batch = False
        self._grad_norms.clear()
        self._losses = LossHistory(DivergenceRule(factor=self.guard_factor))
        self.clipped_steps = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = _param_groups(trainer)
        for name, value in (("momentum", self.momentum), ("weight_decay", self.weight_decay)):
            if value is None:
                continue
            for g in groups:
                if name not in g:
                    rank_zero_warn(f"LargeBatchScaling: the optimizer has no {name!r}; {name}={value} ignored")
                    break
                g[name] = value
        if not self.decay_biases:
            for g in groups:
                if "weight_decay" in g and all(p.ndim <= 1 for p in g["params"]):
                    g["weight_decay"] = 0.0
        if trainer.lr_scheduler_configs:
            rank_zero_warn(
                "LargeBatchScaling sets the LR of every param group each step; the LR scheduler(s) returned by "
                "configure_optimizers will be overridden. Remove them."
            )
        if self.base_lrs is None:  # a fresh run: the configured LRs are the base
            self.base_lrs = [
                float(self.base_lr if self.base_lr is not None else g.get("initial_lr", g["lr"])) for g in groups
            ]
        elif len(self.base_lrs) != len(groups):
            raise ValueError(
                f"LargeBatchScaling: the checkpoint has {len(self.base_lrs)} param groups, the optimizer has "
                f"{len(groups)}"
            )
        if self.lr_plan is None:
            self._max_iter, self._steps_per_epoch = _training_length(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._checked_batch:
            self._checked_batch = True
            layout = {
                "per_device": int(extract_batch_size(batch)),
                "world_size": int(trainer.world_size),
                "accumulate": int(trainer.accumulate_grad_batches),
            }
            if self.lr_plan is None:
                self.batch_layout = layout
                self.lr_plan = self._build_lr_plan(math.prod(layout.values()))
                if self.verbose:
                    rank_zero_info(self.describe())
            elif layout != self.batch_layout:
                rank_zero_warn(
                    f"LargeBatchScaling: resumed with batch layout {layout}, the checkpoint used "
                    f"{self.batch_layout}; continuing the checkpointed LR plan unchanged"
                )
        self._set_lrs(trainer, trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.lr_plan is None:
            return
        if self.clip_factor is not None:
            self._clip(optimizer)
        if self.lars:
            apply_lars(optimizer.param_groups, eta=self.lars_eta)
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        name = self.log_name if index == 0 else f"{self.log_name}-{index}"
        pl_module.log(name, float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.guard or self.lr_plan is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        # averaged over ranks: every rank reaches the same verdict at the same step (no rank is left waiting)
        mean = float(trainer.strategy.reduce(loss.detach().float().clone(), reduce_op="mean"))
        verdict = self._losses.observe(mean)
        if verdict is not None:
            step = trainer.global_step - 1  # the optimizer step this loss was computed for
            raise TrainingDiverged(step, self.lr_at(max(step, 0))[0], mean, verdict, self._advice())

    def _advice(self) -> str:
        s = self.lr_plan
        assert s is not None
        hints = [
            f"lower the peak LR {s.peak_lr:.4g} (callbacks.large_batch.base_lr, or rule=sqrt)",
            f"lengthen the warm-up of {s.warmup_iters} iterations (callbacks.large_batch.warmup, warmup_per_multiple)",
        ]
        if self.clip_factor is None:
            hints.append("clip gradient spikes (callbacks.large_batch.clip_factor=2)")
        hints.append("or disable this check with callbacks.large_batch.guard=false")
        return "To change: " + "; ".join(hints) + "."

    @torch.no_grad()
    def _clip(self, optimizer: Any) -> None:
        """Clip the global gradient norm against its own recent history (identical on every rank: the
        gradients are already all-reduced when this hook runs)."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        limit = clip_threshold(norm, self._grad_norms, self.clip_factor)
        self._grad_norms.append(norm)
        if limit is not None:
            for g in grads:
                g.mul_(limit / norm)
            self.clipped_steps += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.lr_plan is None:
            return {}
        return {
            "lr_plan": self.lr_plan.to_dict(),
            "base_lrs": list(self.base_lrs or []),
            "batch_layout": dict(self.batch_layout or {}),
            # the histories clipping and the guard judge against: a resumed run clips exactly as an unbroken one
            "grad_norms": list(self._grad_norms),
            "losses": list(self._losses.losses),
            "first_losses": list(self._losses.first),
            "clipped_steps": self.clipped_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.lr_plan = LRPlan.from_dict(state_dict.get("lr_plan") or state_dict["schedule"])  # "schedule": <= 0.1
        self.base_lrs = [float(x) for x in state_dict["base_lrs"]]
        self.batch_layout = dict(state_dict["batch_layout"])
        self._checked_batch = False
        self._grad_norms.clear()
        self._grad_norms.extend(float(x) for x in state_dict.get("grad_norms", ()))  # absent in older checkpoints
        self._losses = LossHistory(DivergenceRule(factor=self.guard_factor))
        self._losses.losses.extend(float(x) for x in state_dict.get("losses", ()))
        self._losses.first.extend(float(x) for x in state_dict.get("first_losses", ()))
        self.clipped_steps = int(state_dict.get("clipped_steps", 0))

    # ----------------------------------------------------------------- helpers
    def lr_at(self, iteration: int) -> list[float]:
        """The LR of every param group (in optimizer order) at an optimizer step."""
        if self.lr_plan is None or self.base_lrs is None:
            raise RuntimeError("LargeBatchScaling: the LR plan is resolved at the first training batch")
        factor = self.lr_plan.factor_at(iteration)
        return [b * factor for b in self.base_lrs]

    def describe(self) -> str:
        s, lay = self.lr_plan, self.batch_layout or {}
        assert s is not None
        warm = f"warm-up {s.warmup_iters} iterations" if s.warmup_iters else "no warm-up"
        extras = f", gradient norm clipped at {self.clip_factor:g}x its recent median" if self.clip_factor else ""
        decay = {"poly": f"poly(power={s.power:g})", "step": f"step(every {s.step_size} it, gamma={s.gamma:g})"}
        return (
            f"LargeBatchScaling: global batch {s.global_batch} = {lay.get('per_device')} per device x "
            f"{lay.get('world_size')} devices x {lay.get('accumulate')} accumulation; rule {s.rule} from "
            f"reference batch {s.reference_batch}: LR {s.base_lr:g} -> peak LR {s.peak_lr:g}; {warm}; "
            f"decay {decay.get(s.decay, s.decay)}; {s.max_iter} iterations in total{extras}"
        )

    def _build_lr_plan(self, global_batch: int) -> LRPlan:
        assert self._max_iter is not None and self.base_lrs
        warmup = warmup_for_batch(self.warmup, self.warmup_per_multiple, global_batch, self.reference_batch)
        warmup_iters = self._to_iterations(warmup, "warmup") if warmup else 0
        step_size = None
        if self.decay == "step":
            step_size = max(1, self._to_iterations(self.step_size, "step_size"))
        try:
            return LRPlan(
                base_lr=self.base_lrs[0],
                global_batch=global_batch,
                reference_batch=self.reference_batch,
                max_iter=self._max_iter,
                rule=self.rule,
                warmup_iters=warmup_iters,
                decay=self.decay,
                power=self.power,
                step_size=step_size,
                gamma=self.gamma,
            )
        except ValueError as err:
            raise ValueError(f"LargeBatchScaling (warmup={self.warmup:g} {self.unit}s): {err}") from None

    def _to_iterations(self, amount: float, option: str) -> int:
        if self.unit == "step":
            return int(round(amount))
        if self._steps_per_epoch is None:
            raise ValueError(
                f"LargeBatchScaling: {option} is in epochs but the epoch length is unknown (iterable data "
                "without a length); use unit='step'"
            )
        return int(round(amount * self._steps_per_epoch))

    def _set_lrs(self, trainer: pl.Trainer, iteration: int) -> None:
        for group, lr in zip(_param_groups(trainer), self.lr_at(iteration)):
            group["lr"] = lr


def _checked(settings: dict[str, Any], owner: str) -> dict[str, Any]:
    """Raise :class:`~lightning_firecaffe.options.InvalidOption` for the first bad setting; return them."""
    check_choice("rule", settings["rule"], SCALING_RULES, owner)
    check_choice("decay", settings["decay"], DECAYS, owner)
    check_warmup(settings["warmup"], settings["unit"], owner)
    check_lr("base_lr", settings["base_lr"], owner)
    ref = settings["reference_batch"]
    require(is_int(ref) and ref >= 1, owner, "reference_batch", ref, "must be an integer >= 1")
    check_decay_params(settings["decay"], settings["power"], settings["step_size"], settings["gamma"], owner)
    _check_optional_range(owner, "momentum", settings["momentum"], lambda m: 0 <= m < 1, "must be in [0, 1)")
    _check_optional_range(owner, "weight_decay", settings["weight_decay"], lambda w: w >= 0, "must be >= 0")
    require(isinstance(settings["lars"], bool), owner, "lars", settings["lars"], "must be true or false")
    eta = settings["lars_eta"]
    require(is_number(eta) and eta > 0, owner, "lars_eta", eta, "must be a number > 0")
    per = settings["warmup_per_multiple"]
    require(is_number(per) and per >= 0, owner, "warmup_per_multiple", per, "must be a number >= 0")
    _check_optional_range(owner, "clip_factor", settings["clip_factor"], lambda c: c >= 1, "must be >= 1 (or null)")
    for flag in ("decay_biases", "guard"):
        require(isinstance(settings[flag], bool), owner, flag, settings[flag], "must be true or false")
    gf = settings["guard_factor"]
    require(is_number(gf) and gf > 1, owner, "guard_factor", gf, "must be a number > 1")
    name = settings["log_name"]
    require(isinstance(name, str) and bool(name), owner, "log_name", name, "must be a non-empty metric name")
    return settings


def _check_optional_range(
    owner: str, option: str, value: Any, within: Callable[[float], bool], requirement: str
) -> None:
    """``None`` (leave the optimizer's value) or a number ``within`` the allowed range."""
    if value is not None:
        require(is_number(value) and within(value), owner, option, value, requirement)


def _param_groups(trainer: pl.Trainer) -> list[dict]:
    return [g for opt in trainer.optimizers for g in opt.param_groups]


def _training_length(trainer: pl.Trainer) -> tuple[int, int | None]:
    """(total optimizer steps, optimizer steps per epoch or None when the epoch length is unknown)."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("LargeBatchScaling needs a finite training length: set max_epochs or max_steps")
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
    return int(total), per_epoch
