"""The watchdog thread: publish this rank's beat, read the others', act on the verdict.

"fail" cannot raise into the training thread: it is blocked inside a C++ collective that only the
process group's timeout (30 minutes) would end. So the thread logs the verdict, flushes, kills this
rank's child processes (DataLoader workers at once; ranks this process launched after a short wait,
since they are reaching the same verdict and should say so themselves) and leaves with ``os._exit``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from ..errors import first_line
from ..processes import identity, running, stop_descendants
from .progress import PROGRESS, Progress
from .stacks import Whereabouts, classify, stack_of
from .verdict import Beat, Observer, Policy, Stall, describe_peer, judge

log = logging.getLogger(__name__)

#: Exit status of a rank that the watchdog stops (EX_SOFTWARE).
STALL_EXIT_CODE = 70
ACTIONS = ("fail", "warn")


class Watchdog:
    """Runs on every rank of one training, in the process that trains (threads do not survive fork)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        transport,  # StoreBeats or any object with publish(beat) -> bool and read() -> dict | None
        policy: Policy,
        *,
        action: str = "fail",
        grace_s: float = 5.0,
        interval_s: float = 1.0,
        progress: Progress = PROGRESS,
        launched_ranks: Callable[[], list[int]] = list,
        exit: Callable[[int], None] = os._exit,
        clock: Callable[[], float] = time.monotonic,
        whereabouts: Callable[[], Whereabouts] | None = None,
        kill: Callable[[list[int], float], None] | None = None,
    ) -> None:
        self.rank, self.world_size, self.transport, self.policy = rank, world_size, transport, policy
        self.action, self.grace_s, self.interval_s = action, grace_s, interval_s
        self.progress, self.launched_ranks, self._exit, self._clock = progress, launched_ranks, exit, clock
        self.observer = Observer(world_size, rank, clock())
        self._whereabouts = whereabouts or (lambda: classify(stack_of(self._train_thread)))
        self.stall: Stall | None = None
        self.stalled_since: float | None = None
        self._heartbeat = 0
        self._process = identity()  # lets watchdogs on this machine tell that this rank's process has exited
        self._kill = kill or stop_descendants
        self.failed = False
        self.cpu_s = 0.0  # CPU time the thread has used (its cost, see benchmarks/watchdog_overhead.py)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the transport is used by the thread and, at the end, by stop()
        self._train_thread = threading.get_ident()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Watchdog:
        """Start watching; call from the training thread."""
        self._train_thread = threading.get_ident()
        self._thread = threading.Thread(target=self._loop, name="firecaffe-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, error: BaseException | None = None) -> None:
        """Say goodbye (and why, if training failed here) and end the thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 10)
        with self._lock:
            why = None if error is None else type(error).__name__
            if error is not None and str(error).strip():
                why += f": {first_line(error)[:300]}"
            self.transport.publish(dataclasses.replace(self._beat(finished=True), error=why))

    # ------------------------------------------------------------------ one round
    def _beat(self, finished: bool = False) -> Beat:  # (the training thread's whereabouts only once it stands still)
        cur = self.progress.current
        blocked = at = None
        if not finished and time.monotonic() - cur.since >= min(self.interval_s, 1.0):  # still: where is it?
            blocked, at = self._whereabouts()
        self._heartbeat += 1
        return Beat(
            self.rank,
            self._heartbeat,
            cur.seq,
            cur.phase,
            cur.kind,
            cur.step,
            blocked_in=blocked,
            at=at,
            finished=finished,
            step_seconds=self.progress.step_seconds,
            process=self._process,
        )

    def check(self) -> Stall | None:
        """Publish, read, judge and act once (the thread's loop body; tests call it directly)."""
        cpu0 = time.thread_time()
        with self._lock:  # the transport and the observer are shared with describe() on the training thread
            mine = self._beat()
            published = self.transport.publish(mine)
            beats = self.transport.read() if published else None
            now = self._clock()
            self.observer.update(
                {self.rank: mine, **({k: v for k, v in beats.items() if k != self.rank} if beats else {})}, now
            )
            self.observer.store_answered(beats is not None, now)
            self._see_processes()
            stall = judge(self.observer, now, self.policy)
        self._act(stall, now)
        self.cpu_s += time.thread_time() - cpu0
        return stall

    def _loop(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # never let the watchdog itself take training down
                log.exception("FireCaffe watchdog on rank %d: internal error", self.rank)
            if self._stop.wait(self.interval_s):
                return

    def _act(self, stall: Stall | None, now: float) -> None:
        if self.failed:
            return
        if stall is None:
            if self.stall is not None:
                log.warning("FireCaffe watchdog on rank %d: the job moves again", self.rank)
            self.stall = self.stalled_since = None
            return
        first = self.stall is None
        self.stall = stall
        if first:
            self.stalled_since = now
            then = (
                f"every rank stops in {self.grace_s:.0f} s unless it moves (stall_action='fail')"
                if self.action == "fail"
                else "stall_action='warn': the job keeps waiting"
            )
            log.warning("%s\n  %s", stall.message(self.rank), then)
            return
        if self.action == "fail" and now - self.stalled_since >= self.grace_s:
            self._fail(stall)

    def _fail(self, stall: Stall) -> None:
        self.failed = True
        log.critical(
            "%s\n  FireCaffe watchdog: stopping rank %d (exit code %d): stalled for %.0f s after the warning.",
            stall.message(self.rank),
            self.rank,
            STALL_EXIT_CODE,
            self.grace_s,
        )
        for handler in logging.getLogger().handlers + [logging.lastResort]:
            try:
                handler.flush()
            except Exception:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        if self.rank in stall.culprit_ranks:
            time.sleep(2 * self.interval_s)  # let the waiting ranks say whom they wait for before this one goes
        self._kill(self.launched_ranks(), min(10.0, self.policy.stall_timeout))
        self._exit(STALL_EXIT_CODE)

    # ------------------------------------------------------------------ for reports and error messages
    def step_seconds(self) -> dict[int, float]:
        """Every rank's mean compute + data seconds per training step, as last published."""
        with self._lock:
            beats = self.transport.read() or {}
        figures = {r: b.step_seconds for r, b in beats.items() if b.step_seconds is not None}
        if self.progress.step_seconds is not None:
            figures[self.rank] = self.progress.step_seconds
        return figures

    def _see_processes(self) -> None:
        """Which ranks' processes have exited, for those on this machine (the others: unknown)."""
        seen = {r: running(c.beat.process) for r, c in self.observer.clocks.items() if r != self.rank}
        self.observer.processes_seen({r: not runs for r, runs in seen.items() if runs is not None})

    def _refresh(self) -> None:
        """Read the others' beats now (the thread's last read may be an interval old)."""
        with self._lock:
            beats = self.transport.read()
            if beats:
                self.observer.update({r: b for r, b in beats.items() if r != self.rank}, self._clock())
            self._see_processes()

    def describe(self, ranks: list[int], closed: bool = False) -> list[str]:
        """What this rank's watchdog knows about ``ranks`` now (for a PeerStallError's message).

        ``closed``: the gradient path saw ``ranks`` close their connection (``PeerStallError.closed``); the
        watchdog then says whether their processes exited, and never calls them alive."""
        self._refresh()
        with self._lock:
            states = {s.rank: s for s in self.observer.states(self._clock(), self.policy)}
        silent = [
            r
            for r, s in states.items()
            if r != self.rank and r not in ranks and s.status != "finished" and s.silent_s >= 3 * self.interval_s
        ]
        named = set(ranks)
        return [  # the peer it waited for may itself wait for a silent one: name that too
            describe_peer(states[r], closed=closed and r in named, silent_after_s=3 * self.interval_s)
            for r in [*ranks, *silent]
            if r in states
        ]


def start_watchdog(
    rank: int,
    world_size: int,
    policy: Policy,
    *,
    action: str,
    grace_s: float,
    launched_ranks: Callable[[], list[int]] = list,
) -> Watchdog | None:
    """Connect to the rendezvous store and start the thread; None (with a warning) if the store cannot be
    reached: training goes on unwatched rather than not at all."""
    from .transport import StoreBeats

    interval = min(2.0, max(0.2, policy.stall_timeout / 10))
    PROGRESS.reset()
    try:
        transport = StoreBeats.connect(world_size, timeout_s=max(1.0, min(5.0, policy.stall_timeout / 2)))
    except Exception as exc:
        log.warning("FireCaffe watchdog on rank %d is off: cannot reach the rendezvous store (%s)", rank, exc)
        return None
    return Watchdog(
        rank,
        world_size,
        transport,
        policy,
        action=action,
        grace_s=grace_s,
        interval_s=interval,
        launched_ranks=launched_ranks,
    ).start()
