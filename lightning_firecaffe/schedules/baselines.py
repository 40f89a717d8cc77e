"""The baselines FireCaffe compares against: a parameter server and the bandwidth-optimal ring."""

from __future__ import annotations

from .core import Schedule, Transfer, build, reversed_as_broadcast


def parameter_server(world_size: int, num_chunks: int = 1, **_: object) -> Schedule:
    """Every rank sends its whole buffer to rank 0 (the server), which sends the sum back to each in turn.

    The server's link carries 2 (p - 1) buffers: with p workers and a dedicated server, the paper's 2pN/B.
    """
    up = [Transfer(i - 1, i, 0, 0, num_chunks) for i in range(1, world_size)]
    down = reversed_as_broadcast(up, first_round=len(up))
    return build("parameter_server", world_size, num_chunks, up + down)


def ring(world_size: int, num_chunks: int | None = None, **_: object) -> Schedule:
    """Reduce-scatter then all-gather around the ring 0 -> 1 -> ... -> p-1 -> 0, one chunk per rank."""
    p = world_size
    transfers = []
    for s in range(p - 1):
        for r in range(p):
            c = (r - s) % p
            transfers.append(Transfer(s, r, (r + 1) % p, c, c + 1))
    for s in range(p - 1):
        for r in range(p):
            c = (r + 1 - s) % p
            transfers.append(Transfer(p - 1 + s, r, (r + 1) % p, c, c + 1, reduce=False))
    return build("ring", world_size, p, transfers)
