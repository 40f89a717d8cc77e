"""FireCaffe's options as data: one frozen object that checks itself, shared by every front door.

Like torch's ``PowerSGDState`` keeps PowerSGD's knobs, :class:`FireCaffeOptions` keeps the strategy's, so
the strategy's constructor reads like ``DDPStrategy``'s and any other entry point (the Hydra app, a
Fabric strategy) gets the same meaning and the same checks. A bad value raises :class:`InvalidOption`
naming the option and what it allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .comm.compression import CHOICES, WireFormat, wire_format
from .comm.cost_model import LinkModel
from .comm.low_rank import LowRankConfig
from .comm.schedules import algorithm_names, get_algorithm
from .options import InvalidOption, is_int, is_number, require, require_choice
from .watchdog import ACTIONS
from .watchdog.verdict import bad_allowances, merge_allowances

OWNER = "FireCaffeStrategy"
LOW_RANK = "powersgd"
#: the ``powersgd_*`` options -> the LowRankConfig field each sets (None: not a LowRankConfig field)
LOW_RANK_OPTIONS = {
    "powersgd_rank": "rank",
    "powersgd_start_step": "start_step",
    "powersgd_min_compression_rate": "min_compression_rate",
    "powersgd_wire": None,
}
TRAINER_ONLY = ("model_averaging_period", "averaging_start_step", "averaging_wire")  # local SGD: see fabric.py


def _require_bf16_wire(option: str, wire: str | None, why_not_fp16: str) -> None:
    """A wire for values with no scale of their own (PowerSGD's factors, local SGD's deltas): None or bf16."""
    require(wire != "fp16", OWNER, option, wire, why_not_fp16)
    require(wire in (None, "bf16"), OWNER, option, wire, "must be None or 'bf16'")


@dataclass(frozen=True)
class FireCaffeOptions:
    """Every FireCaffe option of the strategy (see ``FireCaffeStrategy`` for their meaning)."""

    algorithm: str = "auto"
    arity: int = 2
    chunk_bytes: int = 1 << 20
    stall_timeout: float = 60.0
    link: LinkModel | str | None = None
    auto_repetitions: int = 2
    compression: str | None = None
    compression_error_feedback: bool = False
    powersgd_rank: int | None = None
    powersgd_start_step: int | None = None
    powersgd_min_compression_rate: float | None = None
    powersgd_wire: str | None = None
    watchdog: bool = True
    stall_action: str = "fail"
    stall_grace: float | None = None
    stall_allowance: dict[str, float] | None = None
    model_averaging_period: int | None = None  # local SGD: None = off (DDPStrategy's own positional argument)
    averaging_start_step: int = 8
    averaging_wire: str | None = None

    def __post_init__(self) -> None:
        self._check_algorithm()
        self._check_compression()
        self._check_watchdog()
        self._check_local_sgd()

    def _check_algorithm(self) -> None:
        require_choice(OWNER, "algorithm", self.algorithm, ("auto", *algorithm_names()))
        require(
            is_int(self.arity) and self.arity >= 2,
            OWNER,
            "arity",
            self.arity,
            "must be an integer >= 2 (2 = binary tree)",
        )
        positive = is_int(self.chunk_bytes) and self.chunk_bytes > 0
        require(positive, OWNER, "chunk_bytes", self.chunk_bytes, "must be a positive integer number of bytes")
        link_ok = self.link is None or self.link == "measure" or isinstance(self.link, LinkModel)
        require(link_ok, OWNER, "link", self.link, "must be a LinkModel, 'measure' or None")
        repetitions_ok = is_int(self.auto_repetitions) and self.auto_repetitions >= 1
        require(repetitions_ok, OWNER, "auto_repetitions", self.auto_repetitions, "must be an integer >= 1")

    def _check_compression(self) -> None:
        if self.compression != LOW_RANK:
            try:
                wire_format(self.compression)
            except ValueError:
                allowed = ", ".join((*CHOICES, repr(LOW_RANK)))
                raise InvalidOption(OWNER, "compression", self.compression, f"is not one of {allowed}") from None
        feedback = self.compression_error_feedback
        require(isinstance(feedback, bool), OWNER, "compression_error_feedback", feedback, "must be True or False")
        require(
            not (feedback and self.compression == LOW_RANK),
            OWNER,
            "compression_error_feedback",
            feedback,
            "is for the 16-bit formats: PowerSGD always feeds its approximation error back",
        )
        self._check_low_rank()
        require(
            not (feedback and self.compression is None),
            OWNER,
            "compression_error_feedback",
            feedback,
            "needs compression set to one of 'bf16', 'fp16'",
        )
        collective = self.algorithm != "auto" and get_algorithm(self.algorithm).collective
        require(
            not (feedback and collective),
            OWNER,
            "compression_error_feedback",
            feedback,
            f"cannot be exact with algorithm={self.algorithm!r}: the backend's all-reduce adds in 16 bits, out of "
            "the feedback's reach (pick a scheduled algorithm, or auto, which then skips it)",
        )

    def _check_low_rank(self) -> None:
        for option in LOW_RANK_OPTIONS:
            value, why = getattr(self, option), "applies only with compression='powersgd'"
            require(value is None or self.compression == LOW_RANK, OWNER, option, value, why)
        rank, start, rate = self.powersgd_rank, self.powersgd_start_step, self.powersgd_min_compression_rate
        require(rank is None or (is_int(rank) and rank >= 1), OWNER, "powersgd_rank", rank, "must be an integer >= 1")
        start_ok = start is None or (is_int(start) and start >= 0)
        require(start_ok, OWNER, "powersgd_start_step", start, "must be an integer number of optimizer steps >= 0")
        rate_ok = rate is None or (is_number(rate) and rate > 0)
        require(rate_ok, OWNER, "powersgd_min_compression_rate", rate, "must be a positive, finite number")
        _require_bf16_wire(
            "powersgd_wire",
            self.powersgd_wire,
            "cannot be 'fp16': its narrow range needs a dynamic scale, which the P and Q factors (Q's entries are "
            "unbounded) do not carry; use 'bf16' (fp32's range)",
        )

    def _check_watchdog(self) -> None:
        timeout = self.stall_timeout
        require(
            is_number(timeout) and timeout > 0,
            OWNER,
            "stall_timeout",
            timeout,
            "must be a positive, finite number of seconds",
        )
        require(isinstance(self.watchdog, bool), OWNER, "watchdog", self.watchdog, "must be True or False")
        require_choice(OWNER, "stall_action", self.stall_action, ACTIONS)
        grace_ok = self.stall_grace is None or (is_number(self.stall_grace) and self.stall_grace >= 0)
        require(grace_ok, OWNER, "stall_grace", self.stall_grace, "must be None or a finite number of seconds >= 0")
        problem = bad_allowances(self.stall_allowance)
        require(problem is None, OWNER, "stall_allowance", self.stall_allowance, problem or "")

    def _check_local_sgd(self) -> None:
        period, start, wire = self.model_averaging_period, self.averaging_start_step, self.averaging_wire
        period_ok = period is None or (is_int(period) and period >= 1)
        require(period_ok, OWNER, "model_averaging_period", period, "must be None (local SGD off) or an integer >= 1")
        require(
            is_int(start) and start >= 1,
            OWNER,
            "averaging_start_step",
            start,
            "must be an integer >= 1 (DDP rebuilds its buckets after the first step, which must synchronise)",
        )
        _require_bf16_wire(
            "averaging_wire",
            wire,
            "is not supported: a parameter average sends the (small) change since the last average, which fp16's "
            "5-bit exponent flushes towards zero; use 'bf16' (fp32's range) or None",
        )
        require(
            wire is None or period is not None,
            OWNER,
            "averaging_wire",
            wire,
            "has no effect without model_averaging_period (local SGD off)",
        )
        if period is None:
            return
        require(
            self.compression is None,
            OWNER,
            "compression",
            self.compression,
            "cannot be combined with model_averaging_period: local SGD stops sending gradients after "
            "averaging_start_step (set averaging_wire='bf16' to halve the averages' bytes instead)",
        )
        pinned = self.algorithm != "auto" and not get_algorithm(self.algorithm).identical_results
        require(
            not pinned,
            OWNER,
            "algorithm",
            self.algorithm,
            "cannot average parameters (local SGD, model_averaging_period): it does not leave every rank with the "
            "same bits, so the replicas would drift apart after an average",
        )

    @property
    def local_sgd(self) -> bool:
        """Post-local SGD is on (``model_averaging_period`` given)."""
        return self.model_averaging_period is not None

    @property
    def wire_format(self) -> WireFormat | None:
        """The 16-bit format whole gradient buckets travel in (None with PowerSGD: see ``low_rank``)."""
        return None if self.compression == LOW_RANK else wire_format(self.compression)

    @property
    def low_rank(self) -> LowRankConfig | None:
        """PowerSGD's knobs with ``compression="powersgd"`` (unset ones at their defaults), else None."""
        if self.compression != LOW_RANK:
            return None
        given = {field: getattr(self, option) for option, field in LOW_RANK_OPTIONS.items() if field is not None}
        return LowRankConfig(**{k: v for k, v in given.items() if v is not None})

    @property
    def low_rank_wire(self) -> WireFormat | None:
        return wire_format(self.powersgd_wire)

    @property
    def averaging_wire_format(self) -> WireFormat | None:
        return wire_format(self.averaging_wire)

    @property
    def tunes(self) -> bool:
        """``auto`` measures the candidates on the real buckets (no link model given)."""
        return self.algorithm == "auto" and self.link is None

    @property
    def grace_s(self) -> float:
        return float(self.stall_timeout) / 2 if self.stall_grace is None else float(self.stall_grace)

    @property
    def allowances(self) -> dict[str, float]:
        return merge_allowances(self.stall_allowance)
