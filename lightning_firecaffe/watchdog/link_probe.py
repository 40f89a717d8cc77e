"""Time every rank's links at the end of fit, for the straggler report (a collective: every rank calls it).

Compute time cannot show a slow NIC or cable: a rank behind a slow link computes as fast as the others
and all of them wait in the all-reduce. So each rank sends ``nbytes`` to the ranks 1, 2 and 3 places
ahead of it (all ranks at once, one offset at a time, twice; the faster try counts) and the receivers
time the arrival; :func:`~.stragglers.slowest_links` then names the rank with no fast transfer.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import first_line
from ..transport import wait_within

log = logging.getLogger(__name__)

PROBE_BYTES = 1 << 20
OFFSETS = 3  # peers probed per rank in each direction (every pair up to 4 ranks)
TRIES = 2


def probe_links(
    rank: int, world_size: int, timeout_s: float, device: Any = "cpu", nbytes: int = PROBE_BYTES
) -> dict[tuple[int, int], float] | None:
    """``{(sender, receiver): seconds}`` for this job's probed links (the same on every rank), or None when a
    peer does not answer within ``timeout_s`` (the report then goes without links; nothing hangs)."""
    offsets = range(1, min(OFFSETS, world_size - 1) + 1)
    mine = torch.full((len(offsets),), float("inf"), dtype=torch.float64, device=device)
    payload = torch.zeros(nbytes // 4, device=device)
    inbox = torch.empty_like(payload)
    deadline = timedelta(seconds=timeout_s)
    try:
        for i, offset in enumerate(offsets):
            for _ in range(TRIES):
                _wait(dist.barrier(async_op=True), deadline)
                started = time.perf_counter()
                send = dist.isend(payload, (rank + offset) % world_size)
                _wait(dist.irecv(inbox, (rank - offset) % world_size), deadline)
                mine[i] = min(float(mine[i]), time.perf_counter() - started)
                _wait(send, deadline)
        every = [torch.empty_like(mine) for _ in range(world_size)]
        _wait(dist.all_gather(every, mine, async_op=True), deadline)
    except Exception as exc:  # a dead or unreachable peer: no link figures, and the run ends as it would
        log.warning("FireCaffe: the link probe for the straggler report failed (%s)", first_line(exc))
        return None
    return {
        ((receiver - offset) % world_size, receiver): float(every[receiver][i])
        for receiver in range(world_size)
        for i, offset in enumerate(offsets)
    }


def _wait(work: Any, timeout: timedelta) -> None:
    """The transport's deadline-wait; a failure ends the probe (the report then goes without links)."""
    failure = wait_within(work, timeout.total_seconds())
    if failure is not None:
        raise failure
