"""What each communication-reducing option would save, priced by the cost model: pure arithmetic.

Neither low-rank gradients nor local SGD is turned on by ``auto`` (both change convergence); the end-of-fit
summary and ``firecaffe-bench plan`` use these prices so that the user knows when to reach for them.

Per step, every message takes the best registered algorithm's predicted time for its size
(:func:`.cost_model.rank_algorithms`). The options:

* a bf16 wire: every bucket at half the bytes;
* low-rank gradients (PowerSGD) at rank r: per DDP bucket a P message (with the uncompressed tensors) then
  a Q message (:mod:`.low_rank_sizes`), plus the compression's own arithmetic (:class:`ComputeModel`);
* local SGD with period H: no gradient all-reduce, and one full-precision parameter average (as many bytes
  as the gradients) every H steps, which nothing overlaps, amortised over the H steps.

Against a measured run (:func:`price_options`) the model is scaled to what was measured: ``busy_s`` (the
gradient all-reduce's time per step) over its prediction calibrates the link, and the part of ``busy_s``
that was hidden behind backward (``busy_s - exposed_s``) stays hidden; an option's exposed time is what
of its own communication (scaled) plus compression compute exceeds that window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .cost_model import LinkModel, rank_algorithms
from .low_rank_sizes import DEFAULT_BUCKET_CAP_BYTES, Shape, bucket_bytes, compressed_rank, matrix_shape, message_sizes


@dataclass(frozen=True)
class ComputeModel:
    """Compression arithmetic: ``6 n m r + 4 n r^2`` flops per compressed ``n x m`` matrix (P = M Q, Q = M^T P,
    M ~ P Q^T, Gram-Schmidt on P) at ``flops_per_s``, plus four fp32 passes over it (read twice, residual and
    result written) at ``memory_Bps``. Thin matrix products reach a fraction of a device's peak: the defaults
    below are effective rates, not peaks."""

    flops_per_s: float
    memory_Bps: float


CPU_CORE = ComputeModel(flops_per_s=1e10, memory_Bps=5e9)  # one core (the project's ranks run one thread)
GPU = ComputeModel(flops_per_s=5e12, memory_Bps=1e12)


def all_reduce_s(nbytes: int, world_size: int, link: LinkModel, itemsize: int = 4) -> float:
    """Predicted seconds of one all-reduce of ``nbytes`` by the fastest candidate (0 for nothing to send)."""
    if nbytes <= 0 or world_size < 2:
        return 0.0
    return rank_algorithms(int(nbytes), world_size, link)[0][1]


def gradient_sync_s(buckets: Sequence[int], world_size: int, link: LinkModel, wire_itemsize: int = 4) -> float:
    """All buckets (fp32 bytes each) at full precision (``wire_itemsize`` 4) or on a 16-bit wire (2)."""
    return sum(all_reduce_s(b * wire_itemsize // 4, world_size, link) for b in buckets)


def low_rank_sync_s(messages: Sequence[tuple[int, int]], world_size: int, link: LinkModel) -> float:
    """P then Q of every bucket (:func:`.low_rank_sizes.message_sizes`), one after the other."""
    return sum(all_reduce_s(p, world_size, link) + all_reduce_s(q, world_size, link) for p, q in messages)


def low_rank_compute_s(shapes: Sequence[Shape], rank: int, min_rate: float, compute: ComputeModel) -> float:
    seconds = 0.0
    for shape in shapes:
        r = compressed_rank(shape, rank, min_rate)
        if r:
            n, m = matrix_shape(shape)
            seconds += (6 * n * m * r + 4 * n * r * r) / compute.flops_per_s + 4 * 4 * n * m / compute.memory_Bps
    return seconds


def local_sgd_s(buckets: Sequence[int], world_size: int, link: LinkModel, period: int) -> float:
    """A full-precision parameter average every ``period`` steps, per step."""
    return gradient_sync_s(buckets, world_size, link) / period


@dataclass(frozen=True)
class Saving:
    option: str
    exposed_s: float  # the option's predicted exposed communication (and compression) per step
    saved_s: float  # measured exposed minus that (negative: it would cost more)


def price_options(
    *,
    exposed_s: float,
    busy_s: float,
    shapes: Sequence[Shape],
    world_size: int,
    link: LinkModel,
    wire_itemsize: int = 4,
    rank: int = 4,
    min_rate: float = 2.0,
    period: int = 8,
    compute: ComputeModel = CPU_CORE,
    bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
) -> list[Saving]:
    """bf16 wire (unless already on), low-rank at ``rank``, local SGD with ``period``, against a measured step
    whose gradient all-reduce took ``busy_s`` of which ``exposed_s`` was not hidden (see the module doc)."""
    buckets = bucket_bytes(shapes, bucket_cap_bytes)
    predicted = gradient_sync_s(buckets, world_size, link, wire_itemsize)
    scale = busy_s / predicted if predicted > 0 and busy_s > 0 else 1.0
    hidden = max(0.0, busy_s - exposed_s)

    def exposed(comm_s: float, overlappable: bool = True, extra_s: float = 0.0) -> float:
        cost = scale * comm_s + extra_s
        return max(0.0, cost - hidden) if overlappable else cost

    options = []
    if wire_itemsize > 2:
        options.append(("bf16 wire", exposed(gradient_sync_s(buckets, world_size, link, 2))))
    messages = message_sizes(shapes, rank, min_rate, bucket_cap_bytes)
    compression = low_rank_compute_s(shapes, rank, min_rate, compute)
    options.append((f"powersgd rank {rank}", exposed(low_rank_sync_s(messages, world_size, link), extra_s=compression)))
    average = local_sgd_s(buckets, world_size, link, period)  # fp32 parameters, after the optimizer step
    options.append((f"local SGD H={period}", exposed(average, overlappable=False)))
    return [Saving(name, x, exposed_s - x) for name, x in options]


def format_savings(step_s: float | None, exposed_s: float, savings: Sequence[Saving]) -> str:
    """e.g. ``Exposed communication 41.0 ms/step (62 % of a 66.1 ms step). Priced by the cost model, not turned
    on: bf16 wire: -18.2 ms/step; powersgd rank 4: -39.5 ms/step; local SGD H=8: -35.9 ms/step.``; without
    ``savings`` (nothing priced) only the first sentence."""
    share = f" ({100 * exposed_s / step_s:.0f} % of a {1e3 * step_s:.1f} ms step)" if step_s and step_s > 0 else ""
    head = f"Exposed communication {1e3 * exposed_s:.1f} ms/step{share}."
    if not savings:
        return head
    priced = "; ".join(f"{s.option}: {-1e3 * s.saved_s:+.1f} ms/step" for s in savings)
    return f"{head} Priced by the cost model, not turned on: {priced}."
