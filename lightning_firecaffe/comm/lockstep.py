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
from typing import Any, NamedTuple

import torch

from ..transport import Transport
from .compression import round_for_wire
from .schedules import Message, Op, Schedule, chunk_offsets, message_tag
from .scratch import Scratch


@dataclass
class _Pending:
    """A posted batch's Work and the messages it may carry (NCCL may coalesce a batch into one Work)."""

    work: Any
    description: str
    peers: tuple[int, ...]


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


class LockstepRunner:
    """Runs schedules round by round for one rank (NCCL); owns its round plans."""

    def __init__(self, transport: Transport, scratch: Scratch, overlap_bytes: int) -> None:
        self.transport, self.scratch, self.overlap_bytes = transport, scratch, overlap_bytes
        self._plans: dict[tuple, tuple[Schedule, list[_RoundPlan]]] = {}  # (id(schedule), numel, itemsize) -> plans
        self._step = 0

    def run(
        self,
        buffer: torch.Tensor,
        schedule: Schedule,
        bucket: int,
        step: int,
        wire: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum ``buffer`` across ranks in place following ``schedule``, one batch per round."""
        self._step = step  # for errors while posting
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
            for round_index, messages in enumerate(schedule.messages_of(self.transport.rank)):
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
            rnd.scratch = self.scratch.get(buffer if wire is None else wire, plan.scratch_need, plan.arena)
        messages = []
        for index in self._to_post(rnd, only):
            entry = plan.entries[index]
            rnd.posted.add(index)
            target = self._target(rnd, entry, buffer, wire, residual)
            tag = message_tag(bucket, schedule, plan.round_index, entry.message.lo)
            messages.append((entry.message.op is Op.SEND, target, entry.message.peer, tag))
        works = self.transport.post_batch(messages, bucket=bucket, step=self._step)
        if len(works) == len(messages):  # one Work per message (gloo): each names its own peer
            rnd.pending += [_Pending(w, f"round {plan.round_index}", (m[2],)) for w, m in zip(works, messages)]
        else:  # coalesced (NCCL): the Work stands for every peer of the batch
            peers = tuple(sorted({m[2] for m in messages}))
            rnd.pending += [_Pending(w, f"round {plan.round_index} with ranks {list(peers)}", peers) for w in works]

    @staticmethod
    def _to_post(rnd: _Round, only: str | None) -> list[int]:
        """Indices of the round's entries to post now: all not yet posted, or just its scratch receives or
        its sends (posted early, while the previous round is still in flight)."""
        chosen = []
        for index, entry in enumerate(rnd.plan.entries):
            is_send = entry.message.op is Op.SEND
            if index in rnd.posted or (only == "receives" and (is_send or entry.scratch is None)):
                continue
            if only == "sends" and not is_send:
                continue
            chosen.append(index)
        return chosen

    @staticmethod
    def _target(rnd: _Round, entry: _PlannedMessage, buffer: torch.Tensor, wire: Any, residual: Any) -> torch.Tensor:
        """Where an entry's bytes come from or land: scratch, the buffer, or the 16-bit staging buffer (a
        send rounds its chunks into it first)."""
        if entry.scratch is not None:
            return rnd.scratch[entry.scratch[0] : entry.scratch[1]]
        if wire is None:
            return buffer[entry.lo : entry.hi]
        target = wire[entry.lo : entry.hi]
        if entry.message.op is Op.SEND:
            kept = None if residual is None else residual[entry.lo : entry.hi]
            round_for_wire(buffer[entry.lo : entry.hi], target, kept)
        return target

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
        """Wait for a round under one deadline; a failure names the peers of the Works still unfinished."""
        deadline = time.monotonic() + self.transport.stall_timeout
        for i, p in enumerate(pending):

            def unfinished(i: int = i, p: _Pending = p) -> list[int]:
                return sorted({peer for q in pending[i:] if not _done(q.work) for peer in q.peers} | set(p.peers))

            remaining = deadline - time.monotonic()
            self.transport.wait(p.work, unfinished, p.description, step=step, bucket=bucket, timeout_s=remaining)


def _done(work: Any) -> bool:
    try:
        return bool(work.is_completed())
    except Exception:  # noqa: BLE001 - a broken Work is not done
        return False
