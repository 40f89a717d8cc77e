"""Lock-step rounds: the NCCL path, where each round is one ``batch_isend_irecv``.

NCCL wants a batch per step (plain isend/irecv would create a communicator per pair) and its Works have
futures, so rounds posted together are cheap there. Rounds run in order, software-pipelined where the
data allow it: while round r's messages are on the wire, round r-1's received data is added into the
buffer (unless round r sends or overwrites it) and round r+1's receives are already posted. Only "small"
rounds (receive buffers within ``overlap_bytes``) take part; a whole-bucket round runs alone in one
bucket-sized buffer. On gloo the executor runs schedules as dataflow instead (:mod:`.dataflow`).
With a 16-bit ``wire`` staging buffer (:mod:`.compression`) sends round into it and in-place receives land
in it, to be copied into the buffer once their round has arrived.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .compression import round_for_wire
from .schedules import Message, Op, Schedule, chunk_offsets

_TAG_SPACE = 1 << 30


def message_tag(bucket: int, schedule: Schedule, round_index: int, first_chunk: int) -> int:
    """The tag of one message: unique per (bucket, round, first chunk) between a pair of ranks."""
    tag = ((bucket % 1024) * (schedule.num_rounds + 1) + round_index) * (schedule.num_chunks + 1) + first_chunk
    return tag % _TAG_SPACE


@dataclass
class _Pending:
    """A posted message whose Work has not been waited for yet."""

    work: Any
    description: str
    peer: int  # -1: a batched round (NCCL), whose peers are listed in the description


def _overlap(a: tuple, b: tuple) -> bool:
    """True if any element range of ``a`` intersects one of ``b``."""
    return any(lo < d and c < hi for lo, hi in a for c, d in b)


class _PlannedMessage(NamedTuple):
    """One message of a planned round: element range ``[lo, hi)`` of the buffer, and where it lands."""

    message: Message
    lo: int
    hi: int
    scratch: tuple[int, int] | None  # element span of the round's receive buffer; None: in place
    description: str  # for error messages, e.g. "receiving from rank 2 chunks [0, 1) of round 3"


@dataclass(frozen=True)
class _RoundPlan:
    """What one round of this rank does, derived once per (schedule, buffer length, dtype size)."""

    round_index: int  # the schedule's round number
    entries: tuple[_PlannedMessage, ...]
    scratch_need: int
    arena: int  # 0: the bucket-sized receive buffer; 1 or 2: the two small ones, alternating
    small: bool
    received: tuple  # element ranges this round writes
    received_via_scratch: tuple  # ... of which applied from scratch after the round
    sent: tuple  # element ranges this round sends
    sent_or_written_in_place: tuple


@dataclass
class _Round:
    """One round in flight: its plan, receive buffer, posted messages and their Works."""

    plan: _RoundPlan
    scratch: Any = None
    pending: list = field(default_factory=list)
    posted: set = field(default_factory=set)


class LockstepRounds:
    """Mixed into :class:`~.executor.ScheduleExecutor`: runs a schedule round by round (NCCL)."""

    def _run_rounds(
        self, buffer: torch.Tensor, schedule: Schedule, bucket: int, step: int, wire: Any = None, residual: Any = None
    ) -> torch.Tensor:
        on_wire = buffer if wire is None else wire
        rounds = [_Round(plan) for plan in self._plans_for(schedule, buffer.numel(), on_wire.element_size())]
        unapplied: _Round | None = None
        for i, current in enumerate(rounds):
            if unapplied is not None and not self._can_overlap(unapplied, current):
                self._apply_round(unapplied, buffer)
                unapplied = None
            self._post_round(current, buffer, schedule, bucket, only=None, wire=wire, residual=residual)
            if unapplied is not None:
                self._apply_round(unapplied, buffer)  # while this round's messages travel
                unapplied = None
            upcoming = rounds[i + 1] if i + 1 < len(rounds) else None
            if upcoming is not None and upcoming.plan.small and current.plan.small:
                self._post_round(upcoming, buffer, schedule, bucket, only="receives", wire=wire)
                if not _overlap(current.plan.received, upcoming.plan.sent):  # its data is already final
                    self._post_round(upcoming, buffer, schedule, bucket, only="sends", wire=wire, residual=residual)
            self._wait_all(current.pending, bucket, step)
            if wire is not None:  # in-place receives landed in the staging buffer
                for entry in current.plan.entries:
                    if entry.scratch is None and entry.message.op is not Op.SEND:
                        buffer[entry.lo : entry.hi].copy_(wire[entry.lo : entry.hi])
            unapplied = current
        if unapplied is not None:
            self._apply_round(unapplied, buffer)
        return buffer

    def _plans_for(self, schedule: Schedule, numel: int, itemsize: int) -> list[_RoundPlan]:
        """This rank's non-empty rounds, planned once per (schedule, buffer length, dtype size)."""
        key = (id(schedule), numel, itemsize)
        cached = self._plans.get(key)
        if cached is None or cached[0] is not schedule:  # ``is``: an id may be reused after collection
            offsets = chunk_offsets(numel, schedule.num_chunks)
            plans = []
            for round_index, messages in enumerate(schedule.messages_of(self.rank)):
                live = [m for m in messages if offsets[m.hi] > offsets[m.lo]]
                if live:
                    plans.append(self._plan(live, offsets, round_index, len(plans), itemsize))
            cached = self._plans[key] = (schedule, plans)
        return cached[1]

    def _plan(
        self, live: list[Message], offsets: list[int], round_index: int, position: int, itemsize: int
    ) -> _RoundPlan:
        sent = tuple((offsets[m.lo], offsets[m.hi]) for m in live if m.op is Op.SEND)
        entries, need = [], 0
        for m in live:
            lo, hi = offsets[m.lo], offsets[m.hi]
            verb = "sending to" if m.op is Op.SEND else "receiving from"
            description = f"{verb} rank {m.peer} chunks [{m.lo}, {m.hi}) of round {round_index}"
            if m.op is Op.RECV_ADD or (m.op is Op.RECV_COPY and _overlap(((lo, hi),), sent)):
                entries.append(_PlannedMessage(m, lo, hi, (need, need + hi - lo), description))
                need += hi - lo
            else:
                entries.append(_PlannedMessage(m, lo, hi, None, description))
        small = need * itemsize <= self.overlap_bytes
        return _RoundPlan(
            round_index,
            tuple(entries),
            need,
            arena=(1 + position % 2) if small else 0,
            small=small,
            received=tuple((e.lo, e.hi) for e in entries if e.message.op is not Op.SEND),
            received_via_scratch=tuple((e.lo, e.hi) for e in entries if e.scratch is not None),
            sent=sent,
            sent_or_written_in_place=tuple((e.lo, e.hi) for e in entries if e.scratch is None),
        )

    @staticmethod
    def _can_overlap(before: _Round, after: _Round) -> bool:
        """True if ``after`` may start before ``before``'s received data is written into the buffer."""
        b, a = before.plan, after.plan
        return b.small and a.small and not _overlap(b.received_via_scratch, a.sent_or_written_in_place)

    def _post_round(
        self,
        rnd: _Round,
        buffer: torch.Tensor,
        schedule: Schedule,
        bucket: int,
        only: str | None,
        wire: Any = None,
        residual: Any = None,
    ) -> None:
        """Post this round's messages not yet posted; ``only`` = "receives" (into scratch) or "sends" posts
        just those, early, while the previous round is still in flight."""
        plan = rnd.plan
        if rnd.scratch is None and plan.scratch_need:
            rnd.scratch = self._scratch_for(buffer if wire is None else wire, plan.scratch_need, plan.arena)
        reverse = self.group if self.group_reverse is None else self.group_reverse
        ops = []
        for index, entry in enumerate(plan.entries):
            m, span = entry.message, entry.scratch
            if index in rnd.posted:
                continue
            if only == "receives" and (m.op is Op.SEND or span is None):
                continue
            if only == "sends" and m.op is not Op.SEND:
                continue
            rnd.posted.add(index)
            if span is not None:
                target = rnd.scratch[span[0] : span[1]]
            elif wire is None:
                target = buffer[entry.lo : entry.hi]
            else:
                target = wire[entry.lo : entry.hi]
                if m.op is Op.SEND:
                    kept = None if residual is None else residual[entry.lo : entry.hi]
                    round_for_wire(buffer[entry.lo : entry.hi], target, kept)
            low, high = (self.rank, m.peer) if m.op is Op.SEND else (m.peer, self.rank)
            group = self.group if low < high else reverse
            tag = message_tag(bucket, schedule, plan.round_index, m.lo)
            nbytes = target.numel() * target.element_size()
            if m.op is Op.SEND:
                self.counters.bytes_sent += nbytes
            else:
                self.counters.bytes_received += nbytes
            if self.batched:
                ops.append(dist.P2POp(dist.isend if m.op is Op.SEND else dist.irecv, target, m.peer, group, tag))
            elif m.op is Op.SEND:
                work = dist.isend(target, dst=m.peer, group=group, tag=tag)
                rnd.pending.append(_Pending(work, entry.description, m.peer))
            else:
                work = dist.irecv(target, src=m.peer, group=group, tag=tag)
                rnd.pending.append(_Pending(work, entry.description, m.peer))
        if ops:
            peers = sorted({e.message.peer for e in plan.entries})
            description = f"round {plan.round_index} with ranks {peers}"
            rnd.pending += [_Pending(w, description, -1) for w in dist.batch_isend_irecv(ops)]

    @staticmethod
    def _apply_round(rnd: _Round, buffer: torch.Tensor) -> None:
        for entry in rnd.plan.entries:
            if entry.scratch is None:
                continue
            received = rnd.scratch[entry.scratch[0] : entry.scratch[1]]
            if entry.message.op is Op.RECV_ADD:
                buffer[entry.lo : entry.hi].add_(received)
            else:
                buffer[entry.lo : entry.hi].copy_(received)

    def _wait_all(self, pending: list[_Pending], bucket: int, step: int) -> None:
        deadline = time.monotonic() + self.stall_timeout
        for i, p in enumerate(pending):
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                ok = p.work.wait(timeout=timedelta(seconds=remaining))
            except Exception as exc:  # gloo raises on timeout and on a closed connection
                raise self._silent_peers_error(pending[i:], p, bucket, step, exc) from exc
            if ok is False:
                raise self._silent_peers_error(pending[i:], p, bucket, step, None)

    def _silent_peers_error(self, unfinished, first, bucket, step, exc):
        silent = sorted({p.peer for p in unfinished if p.peer >= 0 and not _done(p.work)} | {first.peer} - {-1})
        return self._peer_error(silent, first.description, bucket, step, exc)


def _done(work: Any) -> bool:
    try:
        return bool(work.is_completed())
    except Exception:
        return False
