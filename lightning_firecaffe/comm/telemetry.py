"""Per-optimizer-step communication figures: exposed wait, busy time and bytes, kept in one process.

``exposed_s`` is what training actually pays: the time from the last gradient bucket becoming ready
(backward has finished computing) until every bucket is reduced. Communication that overlaps backward
is counted in ``busy_s`` but not in ``exposed_s``. (One name everywhere: the logged metric is
``firecaffe/exposed_s``, the app's summary says ``exposed_s``, the train benchmark ``exposed_share``.)
``bytes_saved`` is what a 16-bit wire format saved against sending the gradients' own dtype.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class CommFigures:
    bytes_sent: int = 0
    bytes_received: int = 0
    busy_s: float = 0.0
    exposed_s: float = 0.0
    bytes_saved: int = 0


@dataclass
class StepComm(CommFigures):
    """One optimizer step."""

    step: int = 0
    buckets: int = 0
    last_ready_at: float = 0.0


@dataclass
class CommTotals(CommFigures):
    """Sums over all steps so far."""

    steps: int = 0


@dataclass
class AveragingTotals:
    """Local SGD's parameter averages so far (this rank's bytes and time; the wire format, if 16-bit)."""

    period: int
    start: int
    wire: str | None = None
    averages: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    busy_s: float = 0.0
    algorithms: dict[int, str] = field(default_factory=dict)  # flat parameter bytes on the wire -> algorithm

    def describe(self) -> str:
        head = f" Local SGD (average every {self.period} steps from step {self.start}"
        head += f", {self.wire} on the wire): " if self.wire else "): "
        if not self.averages:
            return head + "no parameter average ran."
        n = self.averages
        used = ", ".join(f"{b / 1e6:.2f} MB -> {a}" for b, a in sorted(self.algorithms.items()))
        return (
            head + f"{n} parameter average(s) [{used}], each {self.bytes_sent / n / 1e6:.2f} MB sent, "
            f"{self.bytes_received / n / 1e6:.2f} MB received, {1e3 * self.busy_s / n:.1f} ms by this rank."
        )


class CommStats:
    """Thread-safe accumulator: the backward thread marks buckets ready, the comm worker marks them done."""

    def __init__(self, keep: int = 1000):
        self._lock = threading.Lock()
        self._current = StepComm()
        self.history: deque[StepComm] = deque(maxlen=keep)
        self.totals = CommTotals()
        self.algorithms: dict[int, str] = {}  # bucket bytes -> algorithm used last
        self.tuning: list[dict] = []  # auto's measured choice per bucket size (comm.tuner.AutoTuner.report)
        self.fitted_link: dict | None = None  # latency and bandwidth fitted to the tuning measurements
        self.wire_format: str | None = None  # "bf16" / "fp16" with compression
        self.skipped_steps: list[tuple[int, list[int]]] = []  # fp16 overflow: (step, buckets) not applied
        self.averaging: AveragingTotals | None = None  # local SGD's parameter averages (when on)

    def __getstate__(self) -> dict:  # spawn pickles the strategy, and with it these stats
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def bucket_ready(self, is_last: bool) -> None:
        if is_last:
            with self._lock:
                self._current.last_ready_at = time.perf_counter()

    def bucket_done(self, sent: int, received: int, busy_s: float, is_last: bool, saved: int = 0) -> None:
        with self._lock:
            cur = self._current
            cur.buckets += 1
            cur.bytes_sent += sent
            cur.bytes_saved += saved
            cur.bytes_received += received
            cur.busy_s += busy_s
            if not is_last:
                return
            cur.exposed_s = max(0.0, time.perf_counter() - cur.last_ready_at) if cur.last_ready_at else cur.busy_s
            cur.step = self.totals.steps
            self.history.append(cur)
            t = self.totals
            t.steps += 1
            t.bytes_sent += cur.bytes_sent
            t.bytes_received += cur.bytes_received
            t.bytes_saved += cur.bytes_saved
            t.busy_s += cur.busy_s
            t.exposed_s += cur.exposed_s
            self._current = StepComm()

    def average_done(self, nbytes: int, algorithm: str, sent: int, received: int, busy_s: float) -> None:
        """One local SGD parameter average of ``nbytes`` on the wire (training thread, after a step)."""
        a = self.averaging
        if a is None:
            return
        with self._lock:
            a.averages += 1
            a.bytes_sent += sent
            a.bytes_received += received
            a.busy_s += busy_s
            a.algorithms[nbytes] = algorithm

    @property
    def completed_steps(self) -> int:
        return self.totals.steps

    def last(self) -> StepComm | None:
        with self._lock:
            return self.history[-1] if self.history else None

    def summary(self, algorithm: str) -> str:
        """Human-readable end-of-fit report."""
        t = self.totals
        local = self.averaging.describe() if self.averaging is not None else ""
        if not t.steps:
            return f"FireCaffe ({algorithm}): no gradient all-reduce ran." + local
        per_step = lambda x: x / t.steps  # noqa: E731
        used = ", ".join(f"{n / 1e6:.2f} MB -> {a}" for n, a in sorted(self.algorithms.items()))
        tuned = ""
        if self.tuning:
            tuned = " auto measured: " + "; ".join(describe_choice(r) for r in self.tuning) + "."
            if self.fitted_link:
                f = self.fitted_link
                tuned += (
                    f" Links fitted to it: {f['gbit_per_s']:.2f} Gbit/s, {f['latency_us']:.0f} us "
                    f"(rms error {100 * f['rms_error']:.0f} %)."
                )
        wire = ""
        if self.wire_format:
            wire = (
                f" Gradients travelled as {self.wire_format}: {per_step(t.bytes_saved) / 1e6:.2f} MB per step "
                "saved against full precision."
            )
            if self.skipped_steps:
                wire += (
                    f" {len(self.skipped_steps)} optimizer step(s) skipped for fp16 overflow (steps "
                    f"{', '.join(str(s) for s, _ in self.skipped_steps[:10])})."
                )
        return (
            f"FireCaffe ({algorithm}): {t.steps} steps, buckets on the wire [{used}]; per step this rank sent "
            f"{per_step(t.bytes_sent) / 1e6:.2f} MB and received {per_step(t.bytes_received) / 1e6:.2f} MB; "
            f"communication busy {1e3 * per_step(t.busy_s):.1f} ms, of which {1e3 * per_step(t.exposed_s):.1f} ms "
            f"not hidden behind backward." + wire + local + tuned
        )


def step_metrics(stats: CommStats) -> dict[str, float]:
    """The last optimizer step's figures as logger metrics (``log_dict``: the Trainer's and Fabric's)."""
    last = stats.last()
    if last is None:
        return {}
    metrics = {
        "firecaffe/exposed_s": float(last.exposed_s),
        "firecaffe/busy_s": float(last.busy_s),
        "firecaffe/bytes_sent": float(last.bytes_sent),
        "firecaffe/bytes_received": float(last.bytes_received),
    }
    if stats.wire_format:
        metrics["firecaffe/bytes_saved"] = float(last.bytes_saved)
    return metrics


def describe_choice(row: dict) -> str:
    """One bucket size's outcome, e.g. ``1.05 MB -> native 12.3 ms (runner-up ring 14.0 ms)``."""
    text = f"{row['bytes'] / 1e6:.2f} MB -> {row['algorithm']}"
    if row.get("measured_ms") is not None:
        text += f" {row['measured_ms']:.1f} ms"
    if row.get("runner_up"):
        text += f" (runner-up {row['runner_up']} {row['runner_up_ms']:.1f} ms)"
    return text
