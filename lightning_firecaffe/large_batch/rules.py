"""Learning-rate rules for large-batch SGD as pure functions of the iteration number.

Why pure: the Lightning callback, the tests and any offline plotting compute the same numbers, and a
resumed run recomputes the exact LR of any step from the iteration count alone.

Shape of the LR plan (iterations are optimizer steps, not micro-batches):

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

from ..options import InvalidOption, is_int, is_number, require, require_choice

SCALING_RULES: tuple[str, ...] = ("linear", "sqrt", "none")
DECAYS: tuple[str, ...] = ("poly", "step", "cosine", "constant")
UNITS: tuple[str, ...] = ("epoch", "step")


def check_choice(option: str, value: Any, allowed: tuple[str, ...], owner: str = "large_batch") -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise :class:`InvalidOption` naming the choices."""
    return require_choice(owner, option, value, allowed)


def scale_factor(rule: str, global_batch: int, reference_batch: int) -> float:
    """How much a batch of ``global_batch`` multiplies the LR tuned for ``reference_batch``."""
    check_choice("rule", rule, SCALING_RULES)
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batch sizes must be >= 1 (global batch {global_batch}, reference_batch {reference_batch})")
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
class LRPlan:
    """A fully resolved LR plan, every quantity in iterations (optimizer steps); validated on creation.
    ("Schedule" is reserved for all-reduce schedules.)"""

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
        owner = type(self).__name__
        check_choice("rule", self.rule, SCALING_RULES, owner)
        check_choice("decay", self.decay, DECAYS, owner)
        check_lr("base_lr", self.base_lr, owner)
        if self.max_iter < 1:
            raise ValueError(f"training must last at least one iteration (max_iter={self.max_iter})")
        if self.warmup_iters < 0:
            raise ValueError(f"warm-up must be >= 0 iterations (got {self.warmup_iters})")
        if self.warmup_iters >= self.max_iter:
            raise ValueError(
                f"warm-up of {self.warmup_iters} iterations is not shorter than training ({self.max_iter} "
                "iterations): lower `warmup` or train longer (max_epochs/max_steps)"
            )
        check_decay_params(self.decay, self.power, self.step_size, self.gamma, owner)
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
    def from_dict(cls, state: dict[str, Any]) -> LRPlan:
        return cls(**state)


def warmup_for_batch(warmup: float, per_multiple: float, global_batch: int, reference_batch: int) -> float:
    """Warm-up length (in the warm-up's unit) that grows with the batch multiple ``k = B / B_ref``:
    ``warmup + per_multiple x (k - 1)`` (no growth at or below the reference batch).

    Why: Goyal et al.'s 5 epochs are thousands of iterations on ImageNet but 30 at 8x on the demo set (6
    steps per epoch); a warm-up fixed in epochs shrinks in iterations as the batch grows, exactly where the
    peak LR it leads to grows.
    """
    k = global_batch / reference_batch
    return warmup + per_multiple * max(k - 1.0, 0.0)


def check_lr(option: str, value: float | None, owner: str = "large_batch") -> None:
    """Reject a negative, zero or non-finite learning rate (``None`` means "take it from the optimizer")."""
    if value is not None:
        require(is_number(value) and value > 0, owner, option, value, "must be a positive, finite learning rate")


def check_decay_params(decay: str, power: Any, step_size: Any, gamma: Any, owner: str = "large_batch") -> None:
    """Check the parameters that the chosen decay actually uses."""
    if decay == "poly":
        require(is_number(power) and power > 0, owner, "power", power, "must be a number > 0 for decay='poly'")
    if decay == "step":
        require(
            is_number(step_size) and step_size > 0,
            owner,
            "step_size",
            step_size,
            "must be a number > 0 for decay='step'",
        )
        require(is_number(gamma) and 0 < gamma <= 1, owner, "gamma", gamma, "must be in (0, 1] for decay='step'")


def check_warmup(warmup: Any, unit: str, owner: str = "large_batch") -> None:
    """The warm-up's own checks: a known unit and a length >= 0 (whether it fits in training is separate)."""
    check_choice("unit", unit, UNITS, owner)
    require(is_number(warmup) and warmup >= 0, owner, "warmup", warmup, f"must be a number of {unit}s >= 0")


def warmup_limit(
    warmup: float, unit: str, *, max_epochs: int | None = None, max_steps: int | None = None
) -> tuple[str, int] | None:
    """The training limit ``(name, value)`` that a warm-up (``warmup`` in ``unit``) is not shorter than, if any.

    ``max_epochs``/``max_steps`` follow the Trainer (``None`` or -1 means unset). Only the limit in the
    warm-up's own unit can be compared before the epoch length is known; the callback re-checks at run time.
    """
    name, limit = ("max_epochs", max_epochs) if unit == "epoch" else ("max_steps", max_steps)
    if is_int(limit) and limit >= 0 and warmup > 0 and warmup >= limit:
        return name, limit
    return None


def check_warmup_fits(
    warmup: float,
    unit: str,
    *,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    owner: str = "large_batch",
) -> None:
    """Pre-launch check (no data needed): refuse a warm-up that is not shorter than the training budget."""
    check_warmup(warmup, unit, owner)
    exceeded = warmup_limit(warmup, unit, max_epochs=max_epochs, max_steps=max_steps)
    if exceeded is not None:
        name, limit = exceeded
        raise InvalidOption(owner, "warmup", warmup, f"({unit}s) is not shorter than training ({name}={limit})")
