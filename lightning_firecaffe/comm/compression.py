"""16-bit gradients on the wire: the formats, fp16's dynamic scale and error feedback (pure tensor logic).

On a bandwidth-bound network the ring is already at the physical limit, so only fewer bytes can be
faster. The contract every algorithm follows (the executor and the simulator implement it):

* a rank **rounds a chunk to the wire format when it sends it and keeps the rounded value itself**, so a
  forwarded partial sum is rounded once per hop, the owner of a finished chunk holds exactly the bits it
  broadcasts, and every rank ends with the same bits;
* a receive lands in 16-bit scratch and is added into (or copied to) the gradient's own dtype (fp32),
  so sums accumulate at full precision;
* the backend's own all-reduce (``native``) cannot do that: it reduces the 16-bit tensor itself (gloo
  rounds after every addition).

Each rounding of a partial sum ``s`` errs by at most ``u |s|`` (``u``: the format's unit roundoff), and
``|s| <= sum_i |x_i|``; so a result whose path holds ``k`` roundings is within ``((1+u)^k - 1) sum_i |x_i|``
of the exact sum (:func:`rounding_bound`). Every scheduled algorithm rounds ``p`` times on any element's
path (``p - 1`` sends feed the final sum, then the owner's final rounding); ``native`` on gloo ``2p - 1``.

fp16 has a narrow range, so gradients travel scaled by a power of two (:class:`DynamicScale`, exact to
apply and remove) chosen from the previous step's reduced result, which is identical on every rank, so
all ranks agree without communicating. An overflow (inf/NaN after the reduction) skips the optimizer step
with a warning naming the bucket (the strategy does that) and lowers the scale. Error feedback
(:class:`ErrorFeedback`) keeps what this rank's roundings lost and adds it to the next step's gradient, so
that over many steps the applied updates equal the full-precision ones to within one step's rounding.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class WireFormat:
    """A 16-bit format gradients travel in."""

    name: str
    dtype: torch.dtype
    unit_roundoff: float  # relative error of one rounding to nearest
    half_min_subnormal: float  # absolute error of one rounding near zero
    scaled: bool  # narrow range: travel scaled by a dynamic power of two

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


WIRE_FORMATS: dict[str, WireFormat] = {
    "bf16": WireFormat("bf16", torch.bfloat16, 2.0**-8, 2.0**-134, scaled=False),  # fp32's range, 8-bit mantissa
    "fp16": WireFormat("fp16", torch.float16, 2.0**-11, 2.0**-25, scaled=True),  # max 65504, 11-bit mantissa
}
CHOICES = ("None", *(repr(k) for k in WIRE_FORMATS))


def wire_format(compression: str | None) -> WireFormat | None:
    """The format called ``compression``; a ValueError naming the allowed values otherwise (the strategy
    words it as its option)."""
    if compression is None:
        return None
    if not isinstance(compression, str) or compression not in WIRE_FORMATS:
        raise ValueError(f"is not one of {', '.join(CHOICES)}")
    return WIRE_FORMATS[compression]


def wire_dtype_for(fmt: WireFormat | None, gradient_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a gradient of ``gradient_dtype`` travels in: ``None`` when it travels as it is (no
    compression, or already 16-bit); a ValueError for a gradient that is not floating point."""
    if fmt is None:
        return None
    if not gradient_dtype.is_floating_point:
        raise ValueError(
            f"compression={fmt.name!r} applies to floating-point gradients only, not {gradient_dtype} (allowed: "
            "float32, float64; 16-bit gradients travel as they are)"
        )
    if gradient_dtype.itemsize <= fmt.itemsize:
        return None
    return fmt.dtype


def round_for_wire(
    source: torch.Tensor, wire: torch.Tensor, residual: torch.Tensor | None = None, keep: bool = True
) -> None:
    """Round ``source`` into ``wire`` (the bytes to send); ``residual`` (same length as ``source``)
    accumulates what the rounding lost. ``keep``: the rank keeps the rounded value in ``source`` too (needed
    where the value is final, so every rank ends with the same bits; a partial sum that a later receive
    overwrites, or a buffer the backend's result replaces, can skip that pass)."""
    wire.copy_(source)
    if residual is not None:
        residual.add_(source).sub_(wire)
    if keep:
        source.copy_(wire)


def rounding_bound(fmt: WireFormat, roundings: int, abs_sum: torch.Tensor, additions: int = 0) -> torch.Tensor:
    """Largest error of a sum whose path holds ``roundings`` roundings to ``fmt`` and ``additions``
    additions in fp32, for inputs with ``sum_i |x_i| = abs_sum`` (elementwise)."""
    u = fmt.unit_roundoff
    relative = (1 + u) ** roundings - 1 + additions * 2.0**-24
    return relative * abs_sum + roundings * fmt.half_min_subnormal


@dataclass
class DynamicScale:
    """fp16's power-of-two scale, one for the whole run (so a result does not depend on how DDP happens
    to bucket the parameters, and resume is exact).

    After a step the largest reduced magnitude ``m`` (scaled) is known on every rank alike; the next scale
    puts the largest gradient at ``2 ** (15 - headroom_bits)``: below fp16's maximum (65504 < 2**16) by a
    margin for partial sums that exceed the result (gradients that cancel across ranks), and far above
    the subnormal range. An overflow widens the margin by ``headroom_step`` bits.
    """

    scale: float = 1.0
    headroom_bits: int = 4
    headroom_step: int = 4
    max_headroom_bits: int = 28

    def next_scale(self, scaled_max: float) -> float:
        if scaled_max <= 0 or not math.isfinite(scaled_max):
            return self.scale
        unscaled = scaled_max / self.scale
        exponent = math.floor(math.log2(2.0 ** (15 - self.headroom_bits) / unscaled))
        return 2.0 ** max(-100, min(100, exponent))

    def update(self, scaled_max: float, overflowed: bool) -> None:
        if overflowed:
            self.headroom_bits = min(self.max_headroom_bits, self.headroom_bits + self.headroom_step)
            self.scale = max(2.0**-100, self.scale / 2.0**self.headroom_step)
        else:
            self.scale = self.next_scale(scaled_max)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "headroom_bits": self.headroom_bits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.headroom_bits = float(state["scale"]), int(state["headroom_bits"])


BucketLayout = tuple[tuple[str, int], ...]
"""A bucket's parameters in buffer order: (name, number of elements)."""


class ErrorFeedback:
    """This rank's rounding residuals, one flat buffer per bucket layout, addressed per parameter.

    The residual of a step is added to the next step's gradient before it is sent, so what rounding
    dropped is sent later instead of lost. Keyed by parameter name, not bucket index: DDP rebuilds its
    buckets after the first step (and again after a resume), and a parameter's residual must follow it.
    Memory: one gradient-sized fp32 buffer per rank.
    """

    def __init__(self) -> None:
        self._flat: dict[BucketLayout, torch.Tensor] = {}
        self._where: dict[str, tuple[BucketLayout, int, int]] = {}  # name -> (layout, offset, numel)

    def accumulator(self, layout: BucketLayout, like: torch.Tensor) -> torch.Tensor:
        """The flat residual of this bucket layout (built from the parameters' residuals wherever they
        were kept before), to be added to the gradient and then reused to collect this step's residual."""
        flat = self._flat.get(layout)
        if flat is None:
            flat = self._gathered(layout, like)
            self._adopt(layout, flat)
        return flat

    def state_dict(self, model_layout: BucketLayout) -> torch.Tensor | None:
        """All residuals as one flat tensor over ``model_layout`` (every parameter, in a fixed order; zeros
        where none is kept yet), or None when nothing is kept."""
        if not self._flat:
            return None
        return self._gathered(model_layout, next(iter(self._flat.values())))

    def load_state_dict(self, flat: torch.Tensor, layout: BucketLayout) -> None:
        """Restore from :meth:`state_dict`'s tensor; ``layout`` names its parameters in order."""
        if flat.numel() != sum(n for _, n in layout):
            raise ValueError(f"error-feedback state has {flat.numel()} elements, the model {sum(n for _, n in layout)}")
        self._flat.clear()
        self._where.clear()
        self._adopt(layout, flat.detach().clone())

    def _gathered(self, layout: BucketLayout, like: torch.Tensor) -> torch.Tensor:
        """A new flat tensor over ``layout`` holding each parameter's residual (zeros where none is kept)."""
        flat = torch.zeros(sum(n for _, n in layout), dtype=like.dtype, device=like.device)
        offset = 0
        for name, numel in layout:
            where = self._where.get(name)
            if where is not None and where[2] == numel:
                kept, at = self._flat[where[0]], where[1]
                flat[offset : offset + numel].copy_(kept[at : at + numel])
            offset += numel
        return flat

    def _adopt(self, layout: BucketLayout, flat: torch.Tensor) -> None:
        """``flat`` now holds the residuals of ``layout``'s parameters; layouts nobody points to go."""
        offset = 0
        for name, numel in layout:
            self._where[name] = (layout, offset, numel)
            offset += numel
        self._flat[layout] = flat
        live = {where[0] for where in self._where.values()}
        for stale in [k for k in self._flat if k not in live]:
            del self._flat[stale]


class GradientCompression:
    """Per rank: the wire format, fp16's scale and the error-feedback residuals, around each bucket.

    Thread-safe: buckets are reduced on the comm worker thread and on the backend's threads (``native``),
    the step ends on the training thread. Usage per bucket: :meth:`begin` (adds last step's residual,
    scales), the all-reduce with ``wire_dtype`` and ``residual``, :meth:`finish` (checks fp16 for
    overflow, unscales, keeps the residual); per optimizer step: :meth:`end_step`.
    """

    def __init__(self, fmt: WireFormat, error_feedback: bool = False) -> None:
        self.format = fmt
        self.error_feedback = ErrorFeedback() if error_feedback else None
        self.scale = DynamicScale() if fmt.scaled else None
        self._lock = threading.Lock()
        self._step_max = 0.0
        self._overflowed: list[int] = []

    def begin(self, buffer: torch.Tensor, layout: BucketLayout | None) -> BucketCompression:
        """Prepare an averaged gradient bucket for the wire; returns what :meth:`finish` needs."""
        wire_dtype = wire_dtype_for(self.format, buffer.dtype)
        residual = None
        if wire_dtype is not None and self.error_feedback is not None and layout is not None:
            with self._lock:
                residual = self.error_feedback.accumulator(layout, buffer)
            buffer.add_(residual)
            residual.zero_()  # now collects this step's residual
        with self._lock:
            scale = self.scale.scale if (self.scale is not None and wire_dtype is not None) else 1.0
        if scale != 1.0:
            buffer.mul_(scale)
        return BucketCompression(wire_dtype, residual, scale)

    def finish(self, buffer: torch.Tensor, work: BucketCompression, bucket: int) -> bool:
        """After the all-reduce: False when fp16 overflowed (the bucket is zeroed and its residual dropped;
        the strategy skips the optimizer step)."""
        if work.wire_dtype is None:
            return True
        overflow = False
        if self.scale is not None:
            largest = float(buffer.abs().amax()) if buffer.numel() else 0.0
            overflow = not math.isfinite(largest)
            with self._lock:
                if overflow:
                    self._overflowed.append(bucket)
                else:
                    self._step_max = max(self._step_max, largest)
        if overflow:
            buffer.zero_()
            if work.residual is not None:
                work.residual.zero_()
            return False
        if work.scale != 1.0:
            buffer.div_(work.scale)
            if work.residual is not None:
                work.residual.div_(work.scale)
        return True

    def end_step(self) -> list[int]:
        """Close an optimizer step (every rank alike): returns the buckets that overflowed (the step must
        be skipped) and sets the next step's fp16 scale."""
        with self._lock:
            overflowed, self._overflowed = sorted(set(self._overflowed)), []
            largest, self._step_max = self._step_max, 0.0
            if self.scale is not None and (overflowed or largest > 0):
                self.scale.update(largest, bool(overflowed))
        return overflowed

    def state_dict(self) -> dict[str, Any]:
        return {"format": self.format.name, "scale": self.scale.state_dict() if self.scale else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scale is not None and state.get("scale") is not None and state.get("format") == self.format.name:
            self.scale.load_state_dict(state["scale"])


@dataclass
class BucketCompression:
    """What one bucket's reduction carries from :meth:`GradientCompression.begin` to ``finish``."""

    wire_dtype: torch.dtype | None
    residual: torch.Tensor | None
    scale: float
