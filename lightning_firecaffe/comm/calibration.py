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

from .cost_model import LinkModel

_SMALL_REPS, _LARGE_ELEMENTS, _LARGE_REPS = 20, 2 * 1024 * 1024, 3


def measure_link(
    rank: int, world_size: int, ranks_per_node: int = 1, group: Any = None, device: Any = "cpu"
) -> LinkModel:
    """Rank 0 and the first rank on another node (rank ``ranks_per_node``) exchange 4-byte messages
    (latency = half the round trip) and 8 MB messages (bandwidth); the figures are shared with all."""
    figures = torch.zeros(2, dtype=torch.float64, device=device)
    if world_size < 2:
        return LinkModel(ranks_per_node=ranks_per_node)
    peer = min(ranks_per_node, world_size - 1)
    dist.barrier(group=group)
    if rank in (0, peer):
        other = peer if rank == 0 else 0
        for numel, reps, slot in ((1, _SMALL_REPS, 0), (_LARGE_ELEMENTS, _LARGE_REPS, 1)):
            buf = torch.zeros(numel, device=device)
            _exchange(rank, other, buf, group)  # warm the connection up
            started = time.perf_counter()
            for _ in range(reps):
                _exchange(rank, other, buf, group)
            figures[slot] = (time.perf_counter() - started) / reps / 2  # one way
    dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=group)
    latency = float(figures[0])
    bandwidth = _LARGE_ELEMENTS * 4 / max(float(figures[1]) - latency, 1e-9)
    return LinkModel(latency_s=latency, bandwidth_Bps=bandwidth, ranks_per_node=ranks_per_node)


def _exchange(rank: int, other: int, buf: torch.Tensor, group: Any) -> None:
    if rank == 0:
        dist.send(buf, other, group=group)
        dist.recv(buf, other, group=group)
    else:
        dist.recv(buf, other, group=group)
        dist.send(buf, other, group=group)
