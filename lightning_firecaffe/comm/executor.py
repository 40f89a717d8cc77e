"""Run an all-reduce schedule on a torch.distributed process group, with a deadline on every wait.

The executor is the only layer that talks to the network. On gloo it runs a schedule as dataflow
(:mod:`.dataflow`): every send is posted the moment the chunks it carries are final, receives are posted
ahead, each arrival is added while other messages are still on the wire, and nothing waits for an
unrelated message. gloo's p2p Works have no futures and ``is_completed()`` stays False until ``wait()``,
so one daemon thread per (peer, direction) blocks in ``wait()`` (which releases the GIL) on that link's
Works in posting order and reports completions to the executor's thread. On NCCL it runs lock-step
rounds of ``batch_isend_irecv`` (:mod:`.lockstep`). Algorithms registered as ``collective`` call the
backend's own ``all_reduce``.

Scratch memory is bounded and reused across steps: receives that add (or that a send of the same
round still reads) land in one of three arenas: a bucket-sized one for rounds whose receives exceed
``overlap_bytes`` (such a round starts only when the previous one has completed) and two of at most
``overlap_bytes`` that alternate between the other rounds, so at most two rounds' receives are
outstanding. A silent peer becomes a ``PeerStallError`` that names the peer, the bucket and the
training step instead of a hang until the process group's 30-minute timeout.

With a 16-bit ``wire`` dtype (:mod:`.compression`) every algorithm sends 16-bit bytes: a send rounds its
chunks into a bucket-sized 16-bit staging buffer (and the rank keeps the rounded value), receives land
in 16-bit scratch (or the staging buffer) and are added into the gradient's own dtype; ``native`` reduces
the staging buffer itself. Extra memory: half a bucket for the staging buffer.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..errors import PeerStallError, peer_error
from .compression import round_for_wire
from .dataflow import DataflowPlan, Event, plan_dataflow
from .lockstep import LockstepRounds, message_tag
from .schedules import Op, Schedule, get_algorithm


@dataclass
class TransferCounters:
    """Bytes this rank moved; the executor only ever adds to them."""

    bytes_sent: int = 0
    bytes_received: int = 0


class _LinkWaiter:
    """A daemon thread that waits, in posting order, on the Works of one (peer, direction).

    Messages between two ranks travel in schedule order on both sides, so waiting in posting order
    never waits behind a message that cannot arrive yet. Completions (or the exception a wait raised:
    timeout, closed connection) go to the executor's queue.
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
            try:
                ok = work.wait(timeout=timedelta(seconds=timeout_s))
                outcome = None if ok is not False else TimeoutError("timed out")
            except BaseException as exc:  # gloo raises on timeout and on a closed connection
                outcome = exc
            work = None  # drop the Work before reporting: the run may end, and the group go, right after
            self._completions.put((token, outcome))


class _Layout(NamedTuple):
    """What a dataflow call needs beyond the plan, derived once per (schedule, buffer length, dtype size)."""

    plan: DataflowPlan
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


@dataclass
class ScheduleExecutor(LockstepRounds):
    """Executes schedules for one rank of ``group`` (a dedicated group whose ranks equal global ranks).

    Messages from a lower to a higher rank travel on ``group``, the other direction on ``group_reverse``:
    gloo keeps one TCP connection per pair and group, and a connection carrying both directions at once
    (a tree's reduction going up while the broadcast comes down) moves about half as fast on a
    bandwidth-limited link, measured on the emulated cluster. Two groups give each direction its own.

    ``batched=True`` runs lock-step rounds with ``batch_isend_irecv`` (needed by NCCL); otherwise
    dataflow with ``isend``/``irecv`` and tags derived from (bucket, round, chunk), matched per peer.
    """

    rank: int
    world_size: int
    group: Any = None
    group_reverse: Any = None
    stall_timeout: float = 60.0
    batched: bool = False
    counters: TransferCounters = field(default_factory=TransferCounters)
    overlap_bytes: int = 4 << 20  # receives of rounds up to this size may overlap the previous round's
    _scratch: dict = field(default_factory=dict, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)
    _waiters: dict = field(default_factory=dict, repr=False)
    _completions: Any = field(default_factory=queue.SimpleQueue, repr=False)
    _calls: int = 0

    @property
    def scratch_bytes(self) -> int:
        """Bytes held in reusable receive buffers (the executor's extra memory)."""
        return sum(t.numel() * t.element_size() for t in self._scratch.values())

    def _scratch_for(self, like: torch.Tensor, numel: int, arena: int | str) -> torch.Tensor:
        key = (like.dtype, like.device, arena)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._scratch[key] = buf
        return buf

    def close(self) -> None:
        """Stop and join the waiter threads, before the groups are destroyed (they are daemons: a waiter
        stuck on a dead peer never blocks exit)."""
        for waiter in self._waiters.values():
            waiter.stop()
        self._waiters.clear()

    def all_reduce_(
        self,
        buffer: torch.Tensor,
        schedule: Schedule,
        *,
        bucket: int = 0,
        step: int = 0,
        wire: torch.dtype | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum ``buffer`` (1-D, contiguous) across all ranks in place, following ``schedule``.

        Args:
            wire: a 16-bit dtype to send in (see :mod:`.compression`); None: the buffer's own.
            residual: with ``wire``, a tensor like ``buffer`` that accumulates what this rank's roundings
                lost (error feedback).
        """
        if schedule.world_size != self.world_size:
            raise ValueError(f"schedule is for {schedule.world_size} ranks, group has {self.world_size}")
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("all_reduce_ needs a flat contiguous buffer")
        if wire is not None and not buffer.dtype.is_floating_point:
            raise ValueError(f"compression applies to floating-point buffers only, not {buffer.dtype}")
        if wire == buffer.dtype:
            wire = None
        if self.world_size == 1 or buffer.numel() == 0:
            return buffer  # nothing travels, nothing is rounded
        staging = None if wire is None else self._scratch_for(buffer.new_empty(0, dtype=wire), buffer.numel(), "wire")
        staging = None if staging is None else staging[: buffer.numel()]
        if get_algorithm(schedule.algorithm).collective:
            return self._run_collective(buffer, schedule, bucket, step, staging, residual)
        if self.batched:
            return self._run_rounds(buffer, schedule, bucket, step, staging, residual)
        return self._run_dataflow(buffer, schedule, bucket, step, staging, residual)

    # ------------------------------------------------------------------ the backend's own all-reduce
    def _run_collective(
        self, buffer: torch.Tensor, schedule: Schedule, bucket: int, step: int, wire: Any = None, residual: Any = None
    ) -> torch.Tensor:
        """``dist.all_reduce`` on the dedicated group, under the stall deadline; the bytes counted are those
        of the schedule that models it (gloo's ring). With ``wire`` the backend reduces 16-bit values."""
        reduced = buffer
        if wire is not None:
            round_for_wire(buffer, wire, residual, keep=False)  # the result replaces the buffer
            reduced = wire
        work = dist.all_reduce(reduced, group=self.group, async_op=True)  # issued by this thread only
        try:
            ok = work.wait(timeout=timedelta(seconds=self.stall_timeout))
        except Exception as exc:
            raise self._peer_error([], "in the backend's all_reduce", bucket, step, exc) from exc
        if ok is False:
            raise self._peer_error([], "in the backend's all_reduce", bucket, step, None)
        if wire is not None:
            buffer.copy_(wire)
        self.modelled_bytes(schedule, reduced)
        return buffer

    def modelled_bytes(self, schedule: Schedule, buffer: torch.Tensor) -> tuple[int, int]:
        """Count (and return) the bytes the schedule that models a collective sends and receives here."""
        plan = self._dataflow_plan(schedule, buffer.numel())
        sent = buffer.element_size() * sum(e.numel for e in plan.events if e.is_send)
        received = buffer.element_size() * sum(e.numel for e in plan.events if not e.is_send)
        self.counters.bytes_sent += sent
        self.counters.bytes_received += received
        return sent, received

    # ------------------------------------------------------------------ dataflow (gloo)
    def _dataflow_plan(self, schedule: Schedule, numel: int) -> DataflowPlan:
        key = ("dataflow", id(schedule), numel)
        cached = self._plans.get(key)
        if cached is None or cached[0] is not schedule:  # ``is``: an id may be reused after collection
            cached = self._plans[key] = (schedule, plan_dataflow(schedule, self.rank, numel))
        return cached[1]

    def _layout(self, schedule: Schedule, numel: int, itemsize: int) -> _Layout:
        """The plan, its per-link posting order, round sizes and scratch placement (cached): a bucket-sized
        arena 0 for rounds whose receives exceed ``overlap_bytes``, arenas 1 and 2 alternating between the
        others."""
        key = ("layout", id(schedule), numel, itemsize)
        cached = self._plans.get(key)
        if cached is not None and cached[0] is schedule:
            return cached[1]
        plan = self._dataflow_plan(schedule, numel)
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
            small = need[rnd] * itemsize <= self.overlap_bytes
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
        self._plans[key] = (schedule, layout)
        return layout

    def _run_dataflow(
        self, buffer: torch.Tensor, schedule: Schedule, bucket: int, step: int, wire: Any = None, residual: Any = None
    ) -> torch.Tensor:
        on_wire = buffer if wire is None else wire  # what messages are made of
        layout = self._layout(schedule, buffer.numel(), on_wire.element_size())
        events = layout.plan.events
        if not events:
            return buffer
        self._calls += 1
        n = len(events)
        run = _Run(
            layout,
            buffer,
            schedule,
            bucket,
            self._calls,
            arenas={a: self._scratch_for(on_wire, size, a) for a, size in layout.arena_sizes.items()},
            wire=wire,
            residual=residual,
            missing=[len(e.after) for e in events],
            complete=[False] * n,
            arrived=[False] * n,
            posted=[False] * n,
            round_left=list(layout.events_per_round),
            heads=[0] * len(layout.links),
        )
        run.lowest_round = events[0].round_index  # rounds without live messages count as done
        self._post_ready(run)
        while run.done < n:
            try:
                (call, index), exc = self._completions.get(timeout=self.stall_timeout + 30)
            except queue.Empty:
                raise self._peer_error(
                    self._awaited_peers(run), "waiting for any message", bucket, step, None
                ) from None
            if call != run.call:
                continue  # left over from an earlier call that failed
            event = events[index]
            if exc is not None:
                raise self._peer_error(
                    sorted({event.message.peer, *self._awaited_peers(run)}), event.description, bucket, step, exc
                ) from exc
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
            self._post_ready(run)
        return buffer

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
        low, high = (self.rank, m.peer) if event.is_send else (m.peer, self.rank)
        group = self.group if low < high or self.group_reverse is None else self.group_reverse
        tag = message_tag(run.bucket, run.schedule, event.round_index, m.lo)
        nbytes = target.numel() * target.element_size()
        if event.is_send:
            self.counters.bytes_sent += nbytes
            work = dist.isend(target, dst=m.peer, group=group, tag=tag)
        else:
            self.counters.bytes_received += nbytes
            work = dist.irecv(target, src=m.peer, group=group, tag=tag)
        run.posted[event.index] = True
        if event.is_send:
            run.sending[event.index] = (event.round_index, nbytes)
        self._waiter(m.peer, event.is_send).submit(work, (run.call, event.index), self.stall_timeout)

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
    def _peer_error(
        self, peers: list[int], doing: str, bucket: int, step: int, exc: BaseException | None
    ) -> PeerStallError:
        return peer_error(self.rank, peers, doing, bucket=bucket, step=step, timeout_s=self.stall_timeout, exc=exc)
