"""The message sizes of low-rank gradients (PowerSGD), from parameter shapes alone: no tensors, no torch.

The benchmarks (``firecaffe-bench comm --sizes powersgd:nin:4``), the planner and the end-of-fit pricing
need the bytes a model's P and Q all-reduces carry without running PowerSGD; the implementation can use
the same functions to size its buffers. Conventions are torch's ``powerSGD_hook``: a tensor is the matrix
``shape[0] x prod(shape[1:])`` (a conv: out x in*kh*kw), compressed at rank ``min(n, m, rank)`` only where
``n m > min_rate * (n + m) * rank``; 1-D and too-small tensors travel uncompressed, in the same message as
the P factors. Buckets follow DDP after its rebuild (from step 2 on): parameters in reverse registration
order (about the order backward produces them), a first bucket of 1 MiB, then ``bucket_cap_bytes``; a
bucket closes once it reaches its cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Shape = Sequence[int]

DEFAULT_FIRST_BUCKET_BYTES = 1 << 20  # torch's dist._DEFAULT_FIRST_BUCKET_BYTES
DEFAULT_BUCKET_CAP_BYTES = 25 * (1 << 20)  # DDP's bucket_cap_mb=25


def numel(shape: Shape) -> int:
    return math.prod(int(s) for s in shape)


def matrix_shape(shape: Shape) -> tuple[int, int]:
    """The matrix a tensor is compressed as: first dimension by the rest (a conv: out x in*kh*kw)."""
    if not len(shape):
        return 1, 1
    return int(shape[0]), numel(shape[1:])


def compressed_rank(shape: Shape, rank: int, min_rate: float = 2.0) -> int:
    """The rank a tensor travels at, 0 where it travels uncompressed (1-D, or ``n m <= min_rate (n+m) r``)."""
    if len(shape) < 2:
        return 0
    n, m = matrix_shape(shape)
    r = min(n, m, rank)
    return r if n * m > min_rate * (n + m) * r else 0


def ddp_buckets(
    shapes: Sequence[Shape],
    bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
    *,
    first_bucket_bytes: int | None = DEFAULT_FIRST_BUCKET_BYTES,
    itemsize: int = 4,
) -> list[list[int]]:
    """Indices (into ``shapes``, registration order) of each DDP bucket after the rebuild, first bucket first.

    ``first_bucket_bytes=None`` gives every bucket ``bucket_cap_bytes`` (DDP with a user-set cap list)."""
    limits = [first_bucket_bytes if first_bucket_bytes else bucket_cap_bytes]
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index in reversed(range(len(shapes))):
        current.append(index)
        size += numel(shapes[index]) * itemsize
        if size >= limits[min(len(buckets), len(limits) - 1)]:
            buckets.append(current)
            current, size = [], 0
            limits.append(bucket_cap_bytes)
    if current:
        buckets.append(current)
    return buckets


def bucket_message_numels(shapes: Sequence[Shape], rank: int, min_rate: float = 2.0) -> tuple[int, int]:
    """Elements of one bucket's two messages: (uncompressed tensors + P factors, Q factors)."""
    first = second = 0
    for shape in shapes:
        r = compressed_rank(shape, rank, min_rate)
        if r:
            n, m = matrix_shape(shape)
            first, second = first + n * r, second + m * r
        else:
            first += numel(shape)
    return first, second


def message_sizes(
    shapes: Sequence[Shape],
    rank: int,
    min_rate: float = 2.0,
    bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
    *,
    first_bucket_bytes: int | None = DEFAULT_FIRST_BUCKET_BYTES,
    itemsize: int = 4,
) -> list[tuple[int, int]]:
    """Per DDP bucket (first first): ``(p_bytes, q_bytes)``, P including the uncompressed tensors; q_bytes
    is 0 for a bucket with nothing to compress (it then sends one message)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    out = []
    for bucket in ddp_buckets(shapes, bucket_cap_bytes, first_bucket_bytes=first_bucket_bytes, itemsize=itemsize):
        p, q = bucket_message_numels([shapes[i] for i in bucket], rank, min_rate)
        out.append((p * itemsize, q * itemsize))
    return out


def bucket_bytes(
    shapes: Sequence[Shape],
    bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
    *,
    first_bucket_bytes: int | None = DEFAULT_FIRST_BUCKET_BYTES,
    itemsize: int = 4,
) -> list[int]:
    """The full-precision bytes of each DDP bucket (what the ordinary all-reduce sends)."""
    buckets = ddp_buckets(shapes, bucket_cap_bytes, first_bucket_bytes=first_bucket_bytes, itemsize=itemsize)
    return [sum(numel(shapes[i]) for i in b) * itemsize for b in buckets]
