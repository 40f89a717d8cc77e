"""Execute any schedule inside one process, on a list of tensors (one per rank), to prove it correct.

Semantics match the executor: sends read the buffer as it was when the round began; received data is
applied when the round ends (adds in step order, copies overwrite). With a ``wire`` dtype, a sender rounds
what it sends and keeps the rounded value (see :mod:`.compression`). Pricing lives in ``cost_model``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .schedules import Schedule, ScheduleError, chunk_offsets, validate


def simulate(
    schedule: Schedule, buffers: Sequence[torch.Tensor], wire: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Run ``schedule`` on copies of ``buffers`` (1-D, equal length) and return every rank's result;
    messages travel in ``wire`` (a 16-bit dtype) when given."""
    if len(buffers) != schedule.world_size:
        raise ScheduleError(f"{schedule.algorithm}: {len(buffers)} buffers for world size {schedule.world_size}")
    validate(schedule)
    state = [b.detach().clone().reshape(-1) for b in buffers]
    numel = state[0].numel() if state else 0
    offsets = chunk_offsets(numel, schedule.num_chunks)
    by_round: dict[int, list] = {}
    for t in schedule.transfers:
        by_round.setdefault(t.round, []).append(t)
    for rnd in range(schedule.num_rounds):
        msgs = by_round.get(rnd, [])
        # sends read the state as it was when the round began ...
        payloads = [_sent(state[t.src][offsets[t.lo] : offsets[t.hi]], wire) for t in msgs]
        # ... and receives apply when it ends: adds in transfer order, copies overwrite
        for t, payload in zip(msgs, payloads):
            view = state[t.dst][offsets[t.lo] : offsets[t.hi]]
            view.add_(payload) if t.reduce else view.copy_(payload)
    return state


def _sent(chunk: torch.Tensor, wire: torch.dtype | None) -> torch.Tensor:
    if wire is None:
        return chunk.clone()
    payload = chunk.to(wire)
    chunk.copy_(payload)  # the sender keeps the rounded value
    return payload
