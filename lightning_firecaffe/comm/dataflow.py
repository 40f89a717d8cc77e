"""A schedule as a dependency graph of one rank's messages, so the executor runs it as dataflow.

Lock-step rounds make every message of round r wait for the slowest message of round r - 1. The
schedule's round semantics only require data hazards to be respected, per chunk of the buffer:

* a send of round r reads the value left by the receives of rounds < r (read after write);
* a receive of round r is applied after the previous write of the same chunks (write after write, in
  schedule order, so the order of additions - and hence the floating-point result - is deterministic)
  and after every send of rounds <= r of the same chunks has completed (write after read: those sends
  read the value as it was when their round began).

Pure: :func:`plan_dataflow` derives, once per (schedule, rank, buffer length), the events and their
dependencies; the executor posts and completes them. Nothing else waits, so a message moves the moment
its data is final. Receives that add go through scratch (arrival and application are separate); a copy
lands in place, posted once its hazards are clear, unless a send of the same round still reads those
chunks (then it goes through scratch too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .schedules import Message, Op, Schedule, chunk_offsets


class Event(NamedTuple):
    """One message of this rank, with what must be complete before it may go ahead.

    For a send, ``after`` gates posting. For a receive through ``scratch`` it gates applying the data
    (it may be posted and arrive earlier); for an in-place receive it gates posting.
    """

    index: int  # position in schedule order
    round_index: int
    message: Message
    lo: int  # element range of the buffer
    hi: int
    scratch: bool
    after: tuple[int, ...]
    description: str

    @property
    def is_send(self) -> bool:
        return self.message.op is Op.SEND

    @property
    def numel(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class DataflowPlan:
    """This rank's events in schedule order and, per event, the events that wait for it."""

    events: tuple[Event, ...]
    dependents: tuple[tuple[int, ...], ...]
    largest_round_scratch: int  # elements of scratch the busiest round needs (the executor's bound)


def plan_dataflow(schedule: Schedule, rank: int, numel: int) -> DataflowPlan:
    """The dependency graph of ``rank``'s part of ``schedule`` on a buffer of ``numel`` elements.

    Messages that carry no elements (short buffers) are dropped; hazards are tracked per chunk.
    """
    offsets = chunk_offsets(numel, schedule.num_chunks)
    last_write: dict[int, int] = {}  # chunk -> event that last wrote it
    reads_since_write: dict[int, list[int]] = {}  # chunk -> sends that read it since then
    events: list[Event] = []
    largest_round = 0
    for round_index, messages in enumerate(schedule.messages_of(rank)):
        live = [m for m in messages if offsets[m.hi] > offsets[m.lo]]
        sends = [m for m in live if m.op is Op.SEND]
        receives = [m for m in live if m.op is not Op.SEND]
        round_sends: list[tuple[int, Message]] = []
        for m in sends:  # sends read the value as it was when the round began: before this round's writes
            index = len(events)
            after = sorted({last_write[c] for c in range(m.lo, m.hi) if c in last_write})
            events.append(_event(index, round_index, m, offsets, False, after))
            round_sends.append((index, m))
            for c in range(m.lo, m.hi):
                reads_since_write.setdefault(c, []).append(index)
        round_scratch = 0
        for m in receives:
            index = len(events)
            chunks = range(m.lo, m.hi)
            after = {last_write[c] for c in chunks if c in last_write}
            after.update(r for c in chunks for r in reads_since_write.get(c, ()))
            same_round_reader = any(s.lo < m.hi and m.lo < s.hi for _, s in round_sends)
            scratch = m.op is Op.RECV_ADD or same_round_reader
            events.append(_event(index, round_index, m, offsets, scratch, sorted(after)))
            if scratch:
                round_scratch += offsets[m.hi] - offsets[m.lo]
            for c in chunks:
                last_write[c] = index
                reads_since_write[c] = []
        largest_round = max(largest_round, round_scratch)
    dependents: list[list[int]] = [[] for _ in events]
    for event in events:
        for before in event.after:
            dependents[before].append(event.index)
    return DataflowPlan(tuple(events), tuple(tuple(d) for d in dependents), largest_round)


def _event(index: int, round_index: int, m: Message, offsets: list[int], scratch: bool, after) -> Event:
    verb = "sending to" if m.op is Op.SEND else "receiving from"
    description = f"{verb} rank {m.peer} chunks [{m.lo}, {m.hi}) of round {round_index}"
    return Event(index, round_index, m, offsets[m.lo], offsets[m.hi], scratch, tuple(after), description)
