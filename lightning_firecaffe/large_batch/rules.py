"""Learning-rate rules for large-batch SGD as pure functions of the iteration number.

Why pure: the Lightning callback, the tests and any offline plotting compute the same numbers, and a
resumed run recomputes the exact LR of any step from the iteration count alone.

Shape of the schedule (iterations are optimizer steps, not micro-batches):

* scaling: ``peak = base_lr x factor`` with ``factor = B / B_ref`` (``linear``, Goyal et al. 2017),
  ``sqrt(B / B_ref)`` (``sqrt``, Krizhevsky 2014) or ``1`` (``none``);
* warm-up: linear ramp from ``base_lr`` at iteration 0 to ``peak`` at iteration ``warmup_iters``
  (Goyal et al.'s gradual warm-up);
* decay over the remaining ``max_iter - warmup_iters`` iterations, clock ``t`` starting at 0 when warm-up
  ends: ``poly`` (Caffe: ``peak x (1 - t/T)^power``), ``step`` (Caffe: ``peak x gamma^floor(t/step_size)``),
  ``cosine`` (``peak x (1 + cos(pi t/T)) / 2``) or ``constant``. Without warm-up this is Caffe's exact
  formula.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

SCALING_RULES: tuple[str, ...] = ("linear", "sqrt", "none")
DECAYS: tuple[str, ...] = ("poly", "step", "cosine", "constant")
UNITS: tuple[str, ...] = ("epoch", "step")


def check_choice(option: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise naming the option and the choices."""
    if value not in allowed:
        raise ValueError(f"unknown {option}={value!r}; allowed values: {', '.join(allowed)}")
    return value


def scale_factor(rule: str, global_batch: int, reference_batch: int) -> float:
    """How much a batch of ``global_batch`` multiplies the LR tuned for ``reference_batch``."""
    check_choice("rule", rule, SCALING_RULES)
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(
            f"batch sizes must be >= 1 (global batch {global_batch}, reference_batch {reference_batch})"
        )
    ratio = global_batch / reference_batch
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    return 1.0


def decay_factor(
    decay: str, t: float, total: float, *, power: float = 0.5, step_size: int | None = None, gamma: float = 0.1
) -> float:
    """Multiplier of the peak LR after ``t`` of ``total`` decay iterations (``t`` is clamped to ``[0, total]``)."""
    check_choice("decay", decay, DECAYS)
    t = min(max(t, 0.0), float(total))
    if decay == "constant":
        return 1.0
    if decay == "poly":
        return (1.0 - t / total) ** power
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / total))
    if not step_size or step_size < 1:
        raise ValueError("decay='step' needs step_size >= 1")
    return gamma ** math.floor(t / step_size)


@dataclass(frozen=True)
class LRSchedule:
    """A fully resolved schedule: every quantity in iterations (optimizer steps). Validated on creation."""

    base_lr: float
    global_batch: int
    reference_batch: int
    max_iter: int
    rule: str = "linear"
    warmup_iters: int = 0
    decay: str = "poly"
    power: float = 0.5
    step_size: int | None = None
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check_choice("rule", self.rule, SCALING_RULES)
        check_choice("decay", self.decay, DECAYS)
        check_lr("base_lr", self.base_lr)
        if self.max_iter < 1:
            raise ValueError(f"training must last at least one iteration (max_iter={self.max_iter})")
        if self.warmup_iters < 0:
            raise ValueError(f"warm-up must be >= 0 iterations (got {self.warmup_iters})")
        if self.warmup_iters >= self.max_iter:
            raise ValueError(
                f"warm-up of {self.warmup_iters} iterations is not shorter than training ({self.max_iter} "
                "iterations): lower `warmup` or train longer (max_epochs/max_steps)"
            )
        check_decay_params(self.decay, self.power, self.step_size, self.gamma)
        scale_factor(self.rule, self.global_batch, self.reference_batch)  # validates the batch sizes

    @property
    def scale(self) -> float:
        return scale_factor(self.rule, self.global_batch, self.reference_batch)

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.scale

    def factor_at(self, iteration: int) -> float:
        """LR at ``iteration`` divided by ``base_lr``: apply to each param group's own base LR."""
        it = max(int(iteration), 0)
        if it < self.warmup_iters:
            return 1.0 + (self.scale - 1.0) * it / self.warmup_iters
        decay_total = self.max_iter - self.warmup_iters
        t = it - self.warmup_iters
        return self.scale * decay_factor(
            self.decay, t, decay_total, power=self.power, step_size=self.step_size, gamma=self.gamma
        )

    def lr_at(self, iteration: int) -> float:
        return self.base_lr * self.factor_at(iteration)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "LRSchedule":
        return cls(**state)


def check_lr(option: str, value: float | None) -> None:
    """Reject a negative, zero or non-finite learning rate (``None`` means "take it from the optimizer")."""
    if value is None:
        return
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{option} must be a positive learning rate (got {value!r})")


def check_decay_params(decay: str, power: float, step_size: float | None, gamma: float) -> None:
    """Check the parameters that the chosen decay actually uses."""
    if decay == "poly" and not power > 0:
        raise ValueError(f"power must be > 0 for decay='poly' (got {power!r})")
    if decay == "step":
        if step_size is None or not step_size > 0:
            raise ValueError(f"decay='step' needs step_size > 0 (got {step_size!r})")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1] for decay='step' (got {gamma!r})")


def check_warmup_fits(
    warmup: float, unit: str, *, max_epochs: int | None = None, max_steps: int | None = None
) -> None:
    """Pre-launch check (no data needed): refuse a warm-up that is not shorter than the training budget.

    ``max_epochs``/``max_steps`` follow the Trainer (``None`` or -1 means unset). Only the limit in the
    warm-up's own unit can be checked before the epoch length is known; the callback re-checks at run time.
    """
    check_choice("unit", unit, UNITS)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 (got {warmup!r})")
    limit = max_epochs if unit == "epoch" else max_steps
    if limit is not None and limit >= 0 and warmup > 0 and warmup >= limit:
        name = "max_epochs" if unit == "epoch" else "max_steps"
        raise ValueError(f"warmup={warmup:g} {unit}s is not shorter than training ({name}={limit})")
