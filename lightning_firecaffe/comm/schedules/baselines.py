"""The baselines FireCaffe compares against: a parameter server, the bandwidth-optimal ring, and the
backend's own all-reduce (``native``)."""

from __future__ import annotations

import dataclasses
import math

from .core import Schedule, Transfer, build, reversed_as_broadcast
from .registry import register_algorithm, whole_buffer


def ring_pieces(nbytes: int, world_size: int, chunk_bytes: int) -> int:
    """Two directions x p segments x k >= 2 pieces (so one is added while the next travels), each piece at
    most two ``chunk_bytes``."""
    return 2 * world_size * max(2, math.ceil(nbytes / (2 * world_size) / (2 * chunk_bytes)))


@register_algorithm(
    "ring",
    order=50,
    chunking=ring_pieces,
    summary="reduce-scatter + all-gather, both directions at once (bandwidth-optimal baseline)",
    cost="2 (p-1)/p N/B",
)
def ring(world_size: int, num_chunks: int | None = None, **_: object) -> Schedule:
    """Reduce-scatter then all-gather around the ring, in both directions at once.

    The buffer has two halves, one travelling 0 -> 1 -> ... -> p-1 -> 0 and one the other way round
    (as gloo's chunked ring does): per link the bytes are those of one ring, but two connections keep
    each link busy while the other waits for its next piece. Each half has p segments of k pieces
    (``num_chunks`` = 2 p k; an odd count falls back to one direction). A piece received in round t is
    forwarded in round t + k, so with k >= 2 the executor adds one piece while the next is on the wire.
    """
    p = world_size
    total = num_chunks or p
    directions = 2 if total % (2 * p) == 0 else 1
    k = max(1, total // (directions * p))
    transfers = []
    for direction in range(directions):
        step, base = (1, 0) if direction == 0 else (-1, p * k)
        for phase, reduce in ((0, True), (1, False)):
            for s in range(p - 1):
                for j in range(k):
                    rnd = (phase * (p - 1) + s) * k + j
                    for r in range(p):
                        position = (r * step) % p  # where r sits along this direction's ring
                        segment = (position - s) % p if reduce else (position + 1 - s) % p
                        c = base + segment * k + j
                        transfers.append(Transfer(rnd, r, (r + step) % p, c, c + 1, reduce))
    return build("ring", world_size, directions * p * k, transfers)


@register_algorithm(
    "parameter_server",
    order=60,
    chunking=whole_buffer,
    auto=False,
    summary="everyone to rank 0 and back (the baseline FireCaffe beats)",
    cost="2 (p-1) N/B",
)
def parameter_server(world_size: int, num_chunks: int = 1, **_: object) -> Schedule:
    """Every rank sends its whole buffer to rank 0 (the server), which sends the sum back to each in turn.

    The server's link carries 2 (p - 1) buffers: with p workers and a dedicated server, the paper's 2pN/B.
    """
    up = [Transfer(i - 1, i, 0, 0, num_chunks) for i in range(1, world_size)]
    down = reversed_as_broadcast(up, first_round=len(up))
    return build("parameter_server", world_size, num_chunks, up + down)


@register_algorithm(
    "native",
    order=70,
    chunking=ring_pieces,
    collective=True,
    summary="the backend's own `all_reduce` on the strategy's group (gloo: its C++ ring; NCCL: its kernels)",
    cost="2 (p-1)/p N/B (modelled as the ring)",
)
def native(world_size: int, num_chunks: int | None = None, **_: object) -> Schedule:
    """Not a schedule we execute: the executor calls ``dist.all_reduce``. Modelled (priced, simulated and
    byte-counted) as the ring, which is what gloo runs."""
    return dataclasses.replace(ring(world_size, num_chunks), algorithm="native")
