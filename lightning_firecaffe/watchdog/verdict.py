"""The verdict: is the job stalled, which ranks hold it up, and are they dead or alive but stuck?

Pure logic on beat records and one observer's clock, so every rule is unit-tested without processes.

Each rank publishes a :class:`Beat` about once a second: ``heartbeat`` grows with every publish (the
process and its watchdog thread run), ``progress`` grows with every phase beat of its training (the
training moves). An observer keeps, per rank, when it last saw each of them change (:class:`Observer`,
its own monotonic clock: no clock synchronisation between hosts is needed). A rank is

* **dead** when its heartbeats stopped for ``stall_timeout`` (process gone, frozen, or host unreachable), or
  at once when its process has *exited* (seen by an observer on the same machine, see ``Beat.process``);
* **finished** when it said goodbye (its training ended) - a rank still waiting for it is stuck;
* **waiting** when its training thread is blocked in a collective, i.e. waits for the others;
* **busy** otherwise: running its own code (a validation step, a DataLoader, a checkpoint write). It is
  **overdue** once its phase has not moved for that phase kind's allowance.

The job is stalled when a rank has been waiting for ``stall_timeout`` and none of the ranks it may be
waiting for can still come: every rank that is not waiting is dead, finished or overdue. Those are the
culprits. If nobody is seen waiting (a wait the stack sampler does not recognise), the job is stalled
when no live rank has moved for its allowance. A rank that cannot reach the rendezvous store (hosted by
rank 0) for ``stall_timeout`` while its own training does not move blames rank 0's host.

A beat is as old as its rank's last publish: the observer calls a rank alive only once it has seen its
heartbeat advance; a rank it has heard once is described by what it said (its age unknown), never as alive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .progress import KINDS

#: Default allowance (seconds without progress) per phase kind, on top of ``stall_timeout``: each kind
#: may stay still for max(stall_timeout, its allowance).
DEFAULT_ALLOWANCES = {"setup": 300.0, "warmup": 300.0, "checkpoint": 600.0, "normal": 0.0}
NEVER_HEARD = "unknown (never heard from)"


@dataclass(frozen=True)
class Beat:
    """One rank's published state."""

    rank: int
    heartbeat: int
    progress: int
    phase: str
    kind: str = "normal"
    step: int = 0
    blocked_in: str | None = None  # the collective its training thread waits in
    at: str | None = None  # innermost user/Lightning frame while it does not move
    finished: bool = False
    error: str | None = None  # why it left, when it left with an exception
    step_seconds: float | None = None  # mean compute + data seconds per training step
    process: str | None = None  # lightning_firecaffe.processes.identity(): observers on its machine check it

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> Beat:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Policy:
    stall_timeout: float
    allowances: dict = field(default_factory=lambda: dict(DEFAULT_ALLOWANCES))

    def allowance(self, kind: str) -> float:
        return max(self.stall_timeout, float(self.allowances.get(kind, 0.0)))


def merge_allowances(overrides: dict | None) -> dict:
    """Defaults with the user's overrides (unknown kinds are the caller's to reject)."""
    return {**DEFAULT_ALLOWANCES, **{str(k): float(v) for k, v in (overrides or {}).items()}}


def bad_allowances(overrides: object) -> str | None:
    """Why ``overrides`` is not a valid ``{kind: seconds}`` mapping, or None."""
    if overrides is None:
        return None
    if not isinstance(overrides, Mapping):
        return "must be a dict {phase kind: seconds}"
    for kind, seconds in overrides.items():
        if kind not in KINDS:
            return f"has unknown phase kind {kind!r} (kinds: {', '.join(KINDS)})"
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            return f"has {kind}={seconds!r}: must be a finite number of seconds >= 0"
    return None


@dataclass
class _Clock:
    beat: Beat
    heard_at: float  # observer time when the heartbeat last changed (or was first seen)
    moved_at: float  # observer time when the progress last changed
    advanced: bool = False  # the heartbeat was seen to change: the rank ran while watched


class Observer:
    """One rank's view of every rank, on its own monotonic clock."""

    def __init__(self, world_size: int, me: int, now: float) -> None:
        self.world_size, self.me, self.started_at = world_size, me, now
        self.clocks: dict[int, _Clock] = {}
        self.store_failing_since: float | None = None
        self.exited: dict[int, bool] = {}  # rank -> its process has exited (only ranks whose process we can see)

    def update(self, beats: dict[int, Beat], now: float) -> None:
        """Record fresh beats (this rank's own beat is recorded every round, even when the store fails)."""
        for rank, beat in beats.items():
            clock = self.clocks.get(rank)
            if clock is None:
                self.clocks[rank] = _Clock(beat, now, now, advanced=rank == self.me)
                continue
            if beat.heartbeat != clock.beat.heartbeat or rank == self.me:
                clock.heard_at, clock.advanced = now, True
            if beat.progress != clock.beat.progress:
                clock.moved_at = now
            clock.beat = beat

    def processes_seen(self, exited: dict[int, bool]) -> None:
        """Record which ranks' processes have exited, for those this observer can see (same machine)."""
        self.exited = {r: bool(gone) for r, gone in exited.items() if r != self.me}

    def store_answered(self, ok: bool, now: float) -> None:
        if ok:
            self.store_failing_since = None
        elif self.store_failing_since is None:
            self.store_failing_since = now

    def states(self, now: float, policy: Policy) -> list[RankState]:
        out = []
        for rank in range(self.world_size):
            clock = self.clocks.get(rank)
            if clock is None:  # never heard of: silent since we started watching
                out.append(
                    RankState(
                        rank,
                        "dead" if now - self.started_at >= policy.stall_timeout else "busy",
                        NEVER_HEARD,
                        "normal",
                        0,
                        now - self.started_at,
                        now - self.started_at,
                        None,
                        None,
                        False,
                        heard=False,
                    )
                )
                continue
            b = clock.beat
            silent, still = now - clock.heard_at, now - clock.moved_at
            exited = self.exited.get(rank)
            if b.finished:
                status = "finished"
            elif (exited or silent >= policy.stall_timeout) and rank != self.me:
                status = "dead"
            elif b.blocked_in:
                status = "waiting"
            else:
                status = "busy"
            overdue = still >= (policy.stall_timeout if status == "waiting" else policy.allowance(b.kind))
            out.append(
                RankState(
                    rank,
                    status,
                    b.phase,
                    b.kind,
                    b.step,
                    silent,
                    still,
                    b.blocked_in,
                    b.at,
                    overdue,
                    b.error,
                    heard=clock.advanced,
                    exited=exited,
                )
            )
        return out


@dataclass(frozen=True)
class RankState:
    rank: int
    status: str  # dead | finished | waiting | busy
    phase: str
    kind: str
    step: int
    silent_s: float  # since its last heartbeat
    still_s: float  # since its progress last moved
    blocked_in: str | None
    at: str | None
    overdue: bool
    error: str | None = None
    heard: bool = True  # its heartbeat was seen to advance (False: one beat seen, its data of unknown age)
    exited: bool | None = None  # its process has exited (True), still runs (False), or cannot be seen (None)

    @property
    def last_beat(self) -> str:
        """Its last beat and how old it is, where the observer knows (a beat seen once may be from its start)."""
        where = f"'{self.phase}' at global step {self.step}"
        if not self.heard:
            return f"the only beat seen from it (of unknown age) was in {where}"
        return f"its last beat, {self.silent_s:.0f} s ago, was in {where}"

    def describe(self) -> str:
        where = f"last in '{self.phase}' at global step {self.step}"
        if self.exited and self.status != "finished":
            return f"rank {self.rank} has exited (its process is gone) without leaving the training; {self.last_beat}"
        if self.status == "dead":
            return (
                f"rank {self.rank} is not responding: no heartbeat for {self.silent_s:.0f} s (its process died, "
                f"is frozen, or its host is unreachable); {where}"
            )
        if self.status == "finished" and self.error:
            return f"rank {self.rank} has left the training with an error ({self.error}); {where}"
        if self.status == "finished":
            return f"rank {self.rank} has finished its training and left; {where}"
        if self.phase == NEVER_HEARD:
            return f"rank {self.rank} has not been heard from in the {self.silent_s:.0f} s this rank has watched"
        if not self.heard:  # one beat, maybe from long ago: no evidence that it runs
            return f"rank {self.rank} has sent no heartbeat since the first one (it may have exited); {self.last_beat}"
        if self.status == "waiting":
            return f"rank {self.rank} is blocked in {self.blocked_in} for {self.still_s:.0f} s, in '{self.phase}' at global step {self.step}"
        at = f", at {self.at}" if self.at else ""
        return (
            f"rank {self.rank} is alive but has not progressed for {self.still_s:.0f} s: stuck in "
            f"'{self.phase}' at global step {self.step}{at}"
        )


@dataclass(frozen=True)
class Stall:
    culprits: tuple  # RankState of the ranks the others wait for
    waiters: tuple  # RankState of the ranks blocked in a collective
    reason: str

    @property
    def culprit_ranks(self) -> list[int]:
        return [c.rank for c in self.culprits]

    def message(self, me: int) -> str:
        lines = [f"FireCaffe watchdog on rank {me}: the job is stalled: {self.reason}."]
        lines += [f"  {c.describe()}" for c in self.culprits]
        if self.waiters:
            lines.append("  waiting for them:")
            lines += [f"    {w.describe()}" for w in self.waiters]
        if self.culprits:
            names = ", ".join(str(r) for r in self.culprit_ranks)
            lines.append(
                f"  Look at the log of rank {names}" + (" (this rank)" if me in self.culprit_ranks else "") + "."
            )
        return "\n".join(lines)


def judge(observer: Observer, now: float, policy: Policy) -> Stall | None:
    """The stall this observer sees now, or None while the job may still move."""
    if observer.store_failing_since is not None and now - observer.store_failing_since >= policy.stall_timeout:
        me = observer.clocks.get(observer.me)
        if me is None or now - me.moved_at >= policy.stall_timeout:
            host = RankState(
                0,
                "dead",
                "unknown (its rendezvous store does not answer)",
                "normal",
                0,
                now - observer.store_failing_since,
                now - observer.store_failing_since,
                None,
                None,
                True,
            )
            own = [
                s for s in observer.states(now, policy) if s.rank == observer.me and s.status == "busy" and s.overdue
            ]
            return Stall(
                (host, *own),
                (),
                f"rank {observer.me} cannot reach the rendezvous store on rank 0's host for "
                f"{now - observer.store_failing_since:.0f} s: rank 0 died or this host lost its network",
            )
        return None
    if observer.store_failing_since is not None:
        return None  # no fresh view of the others yet
    states = observer.states(now, policy)
    waiters = tuple(s for s in states if s.status == "waiting")
    others = [s for s in states if s.status != "waiting"]
    gone = tuple(s for s in others if s.status in ("dead", "finished"))
    overdue_busy = tuple(s for s in others if s.status == "busy" and s.overdue)
    if any(w.overdue for w in waiters):
        if not all(s.status in ("dead", "finished") or s.overdue for s in others):
            return None  # someone is still working within its allowance
        culprits = gone + overdue_busy
        if not culprits:
            return Stall(
                (),
                waiters,
                "every rank is blocked in a collective (mismatched collective calls, or a hang inside the backend)",
            )
        return Stall(culprits, waiters, _reason(culprits))
    live_busy = [s for s in others if s.status == "busy"]
    if not waiters and live_busy and all(s.overdue for s in live_busy):
        culprits = tuple(s for s in gone if s.status == "dead") + overdue_busy
        return Stall(culprits, (), "no rank has progressed within its allowance")
    return None


def describe_peer(state: RankState, *, closed: bool, silent_after_s: float) -> str:
    """What the watchdog adds about a peer that the gradient path names in its error.

    ``closed``: the peer closed its connection. That is evidence the peer's process or host went away, unless
    the watchdog knows better (the rank left the training, or its process visibly still runs): never "alive".
    A peer silent for ``silent_after_s`` (a few beats) is "not responding" even before ``stall_timeout``.
    """
    if state.status == "finished" or state.exited:
        return state.describe()
    if closed and state.exited is False:
        return (
            f"rank {state.rank} closed its connection but its process still runs (its training failed, or the "
            f"link between the two ranks broke); {state.last_beat}"
        )
    if closed:
        return f"rank {state.rank} closed its connection: its process exited or its host went away; {state.last_beat}"
    if state.status in ("busy", "waiting") and state.heard and state.silent_s >= silent_after_s:
        return (
            f"rank {state.rank} is not responding: no heartbeat for {state.silent_s:.0f} s; last in "
            f"'{state.phase}' at global step {state.step}"
        )
    return state.describe()


def _reason(culprits: tuple) -> str:
    kinds = {c.status for c in culprits}
    names = ", ".join(f"rank {c.rank}" for c in culprits)
    if kinds == {"dead"} and all(c.exited for c in culprits):
        return f"{names} exited"
    if kinds == {"dead"}:
        return f"{names} stopped responding"
    if kinds == {"busy"}:
        return f"{names} stopped progressing while the others wait for it"
    return f"{names} cannot join the collective the others wait in"
