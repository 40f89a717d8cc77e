"""Measure the network the cost model should assume: ping-pong latency and one-way bandwidth.

Used by ``FireCaffeStrategy(link="measure")`` (so ``auto`` picks algorithms for the links it really
has) and by the communication benchmark (to put a prediction beside each measurement). A collective:
every rank of ``group`` calls it and gets the same ``LinkModel``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from ..transport import Transport
from .cost_model import LinkModel

_SMALL_REPS, _LARGE_ELEMENTS, _LARGE_REPS = 20, 2 * 1024 * 1024, 3
_TAG = 7


def measure_link(
    rank: int,
    world_size: int,
    ranks_per_node: int = 1,
    group: Any = None,
    device: Any = "cpu",
    stall_timeout: float = 60.0,
) -> LinkModel:
    """Rank 0 and the first rank on another node (rank ``ranks_per_node``) exchange 4-byte messages
    (latency = half the round trip) and 8 MB messages (bandwidth); the figures are shared with all. Every
    wait has the stall deadline: a peer that is gone fails start-up with its name."""
    if world_size < 2:
        return LinkModel(ranks_per_node=ranks_per_node)
    transport = Transport(rank, world_size, group, stall_timeout=stall_timeout)
    figures = torch.zeros(2, dtype=torch.float64, device=device)
    peer = min(ranks_per_node, world_size - 1)
    if rank in (0, peer):
        other = peer if rank == 0 else 0
        for numel, reps, slot in ((1, _SMALL_REPS, 0), (_LARGE_ELEMENTS, _LARGE_REPS, 1)):
            buf = torch.zeros(numel, device=device)
            _exchange(transport, other, buf)  # warm the connection up
            started = time.perf_counter()
            for _ in range(reps):
                _exchange(transport, other, buf)
            figures[slot] = (time.perf_counter() - started) / reps / 2  # one way
    work = transport.all_reduce(figures, op=dist.ReduceOp.MAX)
    transport.wait(work, [], "sharing the measured link figures", step=0, what="link measurement")
    latency = float(figures[0])
    bandwidth = _LARGE_ELEMENTS * 4 / max(float(figures[1]) - latency, 1e-9)
    return LinkModel(latency_s=latency, bandwidth_Bps=bandwidth, ranks_per_node=ranks_per_node)


def _exchange(transport: Transport, other: int, buf: torch.Tensor) -> None:
    """One round trip, rank 0 first (a fixed tag: the measurement is the group's only traffic then)."""
    order = (True, False) if transport.rank == 0 else (False, True)
    for is_send in order:
        doing = f"{'sending to' if is_send else 'receiving from'} rank {other} (link measurement)"
        work = transport.post(is_send, buf, other, tag=_TAG)
        transport.wait(work, [other], doing, step=0, what="link measurement")
