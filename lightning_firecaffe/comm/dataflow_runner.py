"""The gloo path: run one rank's part of a schedule as dataflow (see :mod:`.dataflow` for the plan).

Every send is posted the moment the chunks it carries are final, receives are posted ahead, each arrival is
added while other messages are still on the wire, and nothing waits for an unrelated message. gloo's p2p
Works have no futures and ``is_completed()`` stays False until ``wait()``, so one daemon thread per (peer,
direction) blocks in the transport's deadline-wait on that link's Works in posting order and reports
completions to the calling thread.

Scratch: receives that add (or that a send of the same round still reads) land in one of three arenas: a
bucket-sized one for rounds whose receives exceed ``overlap_bytes`` (such a round starts only when the
previous one has completed) and two of at most ``overlap_bytes`` that alternate between the other rounds.
With a 16-bit ``wire`` staging buffer (:mod:`.compression`) a send rounds its chunks into it (and keeps the
rounded value where it is final) and in-place receives land in it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..errors import PeerStallError, peer_error
from ..transport import Transport, wait_within
from .compression import round_for_wire
from .dataflow import Event, plan_dataflow
from .schedules import Op, Schedule, message_tag
from .scratch import Scratch


class _LinkWaiter:
    """A daemon thread that waits, in posting order, on the Works of one (peer, direction).

    Messages between two ranks travel in schedule order on both sides, so waiting in posting order
    never waits behind a message that cannot arrive yet. Completions (or the exception a wait raised:
    timeout, closed connection) go to the runner's queue.
    """

    def __init__(self, name: str, completions: queue.SimpleQueue) -> None:
        self._works: queue.SimpleQueue = queue.SimpleQueue()
        self._completions = completions
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Any, token: tuple, timeout_s: float) -> None:
        self._works.put((work, token, timeout_s))

    def stop(self, timeout: float = 5.0) -> None:
        """Finish and join: the thread must hold no Work when its process group is destroyed (a gloo Work
        released after its group aborts the process at exit: "terminate called without an active
        exception", seen on the emulated cluster)."""
        self._works.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (item := self._works.get()) is not None:
            work, token, timeout_s = item
            item = None
            outcome = wait_within(work, timeout_s)  # gloo raises on a timeout and on a closed connection
            work = None  # drop the Work before reporting: the run may end, and the group go, right after
            self._completions.put((token, outcome))


class _Layout(NamedTuple):
    """What a dataflow call needs beyond the plan, derived once per (schedule, buffer length, dtype size)."""

    plan: Any  # DataflowPlan
    links: tuple  # ((peer, is_send), event indices in schedule order) per link direction
    events_per_round: tuple[int, ...]
    scratch_spans: dict  # receive event -> (arena, lo, hi) of its scratch
    arena_sizes: dict  # arena -> elements
    big_rounds: frozenset  # rounds whose receives use the bucket-sized arena 0
    final_sends: frozenset  # sends of chunks no later receive overwrites: on a 16-bit wire they keep the rounding


@dataclass
class _Run:
    """The state of one dataflow all-reduce: what is posted, arrived, complete."""

    layout: _Layout
    buffer: torch.Tensor
    schedule: Schedule
    bucket: int
    call: int
    arenas: dict  # arena -> this call's reusable receive buffer
    wire: Any  # 16-bit staging buffer of the whole bucket (compression), or None
    residual: Any  # accumulates the rounding error of this rank's sends (error feedback), or None
    missing: list[int]  # per event: dependencies not yet complete
    complete: list[bool]
    arrived: list[bool]
    posted: list[bool]
    round_left: list[int]  # per round: events not yet complete
    heads: list[int]  # per link direction: position of the next event to post
    sending: dict = field(default_factory=dict)  # send event in flight -> (round, bytes)
    lowest_round: int = 0
    done: int = 0
    step: int = 0

    @classmethod
    def start(cls, layout: _Layout, buffer, schedule, bucket: int, call: int, wire, residual, arenas) -> _Run:
        n = len(layout.plan.events)
        run = cls(
            layout,
            buffer,
            schedule,
            bucket,
            call,
            arenas,
            wire,
            residual,
            missing=[len(e.after) for e in layout.plan.events],
            complete=[False] * n,
            arrived=[False] * n,
            posted=[False] * n,
            round_left=list(layout.events_per_round),
            heads=[0] * len(layout.links),
        )
        run.lowest_round = layout.plan.events[0].round_index  # rounds without live messages count as done
        return run


class DataflowRunner:
    """Runs schedules as dataflow for one rank (gloo); owns its layouts, link waiters and completion queue."""

    def __init__(self, transport: Transport, scratch: Scratch, overlap_bytes: int) -> None:
        self.transport, self.scratch, self.overlap_bytes = transport, scratch, overlap_bytes
        self._layouts: dict[tuple, tuple[Schedule, _Layout]] = {}  # (id(schedule), numel, itemsize) -> layout
        self._waiters: dict[tuple[int, bool], _LinkWaiter] = {}
        self._completions: queue.SimpleQueue = queue.SimpleQueue()
        self._calls = 0

    def close(self) -> None:
        """Stop and join the waiter threads, before the groups are destroyed (they are daemons: a waiter
        stuck on a dead peer never blocks exit)."""
        for waiter in self._waiters.values():
            waiter.stop()
        self._waiters.clear()

    def layout(self, schedule: Schedule, numel: int, itemsize: int) -> _Layout:
        """The plan, its per-link posting order, round sizes and scratch placement (cached): a bucket-sized
        arena 0 for rounds whose receives exceed ``overlap_bytes``, arenas 1 and 2 alternating between the
        others."""
        key = (id(schedule), numel, itemsize)
        cached = self._layouts.get(key)
        if cached is not None and cached[0] is schedule:  # ``is``: an id may be reused after collection
            return cached[1]
        layout = _derive_layout(plan_dataflow(schedule, self.transport.rank, numel), itemsize, self.overlap_bytes)
        self._layouts[key] = (schedule, layout)
        return layout

    def run(
        self,
        buffer: torch.Tensor,
        schedule: Schedule,
        bucket: int,
        step: int,
        wire: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum ``buffer`` across ranks in place following ``schedule`` (see :meth:`.ScheduleExecutor.all_reduce_`)."""
        on_wire = buffer if wire is None else wire  # what messages are made of
        layout = self.layout(schedule, buffer.numel(), on_wire.element_size())
        if not layout.plan.events:
            return buffer
        self._calls += 1
        run = _Run.start(layout, buffer, schedule, bucket, self._calls, wire, residual, self._arenas(layout, on_wire))
        run.step = step
        self._post_ready(run)
        while run.done < len(layout.plan.events):
            self._complete(run, *self._next_completion(run, step), step)
            self._post_ready(run)
        return buffer

    def _arenas(self, layout: _Layout, like: torch.Tensor) -> dict:
        return {a: self.scratch.get(like, size, a) for a, size in layout.arena_sizes.items()}

    def _next_completion(self, run: _Run, step: int) -> tuple[int, BaseException | None]:
        """The next of this call's Works to complete (left-overs of an earlier failed call are dropped)."""
        while True:
            try:
                (call, index), failure = self._completions.get(timeout=self.transport.stall_timeout + 30)
            except queue.Empty:  # the waiters' own deadlines should have fired first
                raise self._peer_error(self._awaited_peers(run), "waiting for any message", run, step, None) from None
            if call == run.call:
                return index, failure

    def _complete(self, run: _Run, index: int, failure: BaseException | None, step: int) -> None:
        event = run.layout.plan.events[index]
        if failure is not None:
            peers = sorted({event.message.peer, *self._awaited_peers(run)})
            raise self._peer_error(peers, event.description, run, step, failure) from failure
        if event.is_send or not event.scratch:
            run.sending.pop(index, None)
            if run.wire is not None and not event.is_send:  # landed in the staging buffer
                run.buffer[event.lo : event.hi].copy_(run.wire[event.lo : event.hi])
            self._finish(run, index)
        else:
            run.arrived[index] = True
            if run.missing[index] == 0:
                self._apply_received(run, event)
                self._finish(run, index)

    def _peer_error(
        self, peers: list[int], doing: str, run: _Run, step: int, failure: BaseException | None
    ) -> PeerStallError:
        t = self.transport
        return peer_error(t.rank, peers, doing, bucket=run.bucket, step=step, timeout_s=t.stall_timeout, exc=failure)

    @staticmethod
    def _scratch_view(run: _Run, index: int) -> torch.Tensor:
        arena, lo, hi = run.layout.scratch_spans[index]
        return run.arenas[arena][lo:hi]

    def _may_post_round(self, run: _Run, round_index: int) -> bool:
        """Receives of a round may be posted ahead while at most one earlier round is unfinished (so two
        rounds' receives are outstanding at most), and a big round only once all earlier ones are done."""
        if round_index in run.layout.big_rounds:
            return round_index <= run.lowest_round
        return round_index <= run.lowest_round + 1

    def _may_send(self, run: _Run, event: Event) -> bool:
        """A send starts while sends of earlier rounds are still in flight only if all of them together stay
        within ``overlap_bytes``: small pieces stream, but a big message of round r must not share this
        rank's link with round r-1's (it would delay the earlier message, which is on the critical path)."""
        if not run.sending:
            return True
        oldest = min(r for r, _ in run.sending.values())
        if oldest >= event.round_index:
            return True
        nbytes = event.numel * (run.buffer if run.wire is None else run.wire).element_size()
        return sum(b for _, b in run.sending.values()) + nbytes <= self.overlap_bytes

    def _post_ready(self, run: _Run) -> None:
        """Post, per (peer, direction) and in schedule order, every message whose turn has come."""
        events = run.layout.plan.events
        for link, (_, order) in enumerate(run.layout.links):
            head = run.heads[link]
            while head < len(order):
                event = events[order[head]]
                if event.is_send or not event.scratch:
                    ready = run.missing[event.index] == 0
                else:
                    ready = True
                if not (ready and self._may_post_round(run, event.round_index)):
                    break
                if event.is_send and not self._may_send(run, event):
                    break
                self._post(run, event)
                head += 1
            run.heads[link] = head

    def _post(self, run: _Run, event: Event) -> None:
        m = event.message
        if event.scratch:
            target = self._scratch_view(run, event.index)
        elif run.wire is None:
            target = run.buffer[event.lo : event.hi]
        else:  # 16-bit on the wire: a send rounds its chunks (and keeps them rounded); a copy lands in staging
            target = run.wire[event.lo : event.hi]
            if event.is_send:
                residual = None if run.residual is None else run.residual[event.lo : event.hi]
                keep = event.index in run.layout.final_sends
                round_for_wire(run.buffer[event.lo : event.hi], target, residual, keep)
        tag = message_tag(run.bucket, run.schedule, event.round_index, m.lo)
        work = self.transport.post(event.is_send, target, m.peer, tag, bucket=run.bucket, step=run.step)
        nbytes = target.numel() * target.element_size()
        run.posted[event.index] = True
        if event.is_send:
            run.sending[event.index] = (event.round_index, nbytes)
        self._waiter(m.peer, event.is_send).submit(work, (run.call, event.index), self.transport.stall_timeout)

    def _waiter(self, peer: int, is_send: bool) -> _LinkWaiter:
        key = (peer, is_send)
        if key not in self._waiters:
            name = f"firecaffe-{'send' if is_send else 'recv'}-{peer}"
            self._waiters[key] = _LinkWaiter(name, self._completions)
        return self._waiters[key]

    @classmethod
    def _apply_received(cls, run: _Run, event: Event) -> None:
        received = cls._scratch_view(run, event.index)
        target = run.buffer[event.lo : event.hi]
        target.add_(received) if event.message.op is Op.RECV_ADD else target.copy_(received)

    def _finish(self, run: _Run, index: int) -> None:
        """Mark an event complete and apply every receive that was only waiting for it."""
        stack = [index]
        while stack:
            i = stack.pop()
            run.complete[i] = True
            run.done += 1
            event = run.layout.plan.events[i]
            run.round_left[event.round_index] -= 1
            while run.lowest_round < len(run.round_left) and run.round_left[run.lowest_round] == 0:
                run.lowest_round += 1
            for d in run.layout.plan.dependents[i]:
                run.missing[d] -= 1
                dependent = run.layout.plan.events[d]
                if run.missing[d] == 0 and dependent.scratch and not dependent.is_send and run.arrived[d]:
                    self._apply_received(run, dependent)
                    stack.append(d)

    @staticmethod
    def _awaited_peers(run: _Run) -> list[int]:
        events = run.layout.plan.events
        return sorted(
            {
                e.message.peer
                for e in events
                if run.posted[e.index] and not run.complete[e.index] and not run.arrived[e.index]
            }
        )

    # ------------------------------------------------------------------ errors


def _derive_layout(plan: Any, itemsize: int, overlap_bytes: int) -> _Layout:
    """Pure: per-link posting order, events per round, scratch spans and the sends whose rounding is kept."""
    links: dict = {}
    events_per_round = [0] * (plan.events[-1].round_index + 1 if plan.events else 0)
    need: dict[int, int] = {}
    for e in plan.events:
        links.setdefault((e.message.peer, e.is_send), []).append(e.index)
        events_per_round[e.round_index] += 1
        if e.scratch:
            need[e.round_index] = need.get(e.round_index, 0) + e.numel
    arena_of, small_rounds = {}, 0
    for rnd in sorted(need):
        small = need[rnd] * itemsize <= overlap_bytes
        arena_of[rnd] = 1 + small_rounds % 2 if small else 0
        small_rounds += small
    arena_sizes: dict[int, int] = {}
    for rnd, arena in arena_of.items():
        arena_sizes[arena] = max(arena_sizes.get(arena, 0), need[rnd])
    spans, used = {}, dict.fromkeys(need, 0)
    for e in plan.events:
        if e.scratch:
            lo = used[e.round_index]
            spans[e.index] = (arena_of[e.round_index], lo, lo + e.numel)
            used[e.round_index] = lo + e.numel
    big = frozenset(rnd for rnd, arena in arena_of.items() if arena == 0)
    links_in_order = tuple((k, tuple(v)) for k, v in links.items())
    final, written_later = set(), []  # element ranges received after the current event
    for e in reversed(plan.events):
        if e.is_send and not any(lo < e.hi and e.lo < hi for lo, hi in written_later):
            final.add(e.index)
        elif not e.is_send:
            written_later.append((e.lo, e.hi))
    layout = _Layout(plan, links_in_order, tuple(events_per_round), spans, arena_sizes, big, frozenset(final))
    return layout
