"""What this process is doing right now: the phase beats that the watchdog publishes.

Lightning hooks and the comm hook call :func:`beat` on the training thread; the watchdog thread reads
:data:`PROGRESS` about once a second. A beat is one tuple assignment (atomic under the GIL), so the cost
per training step is a few attribute writes. One training runs per process, hence one module-level
instance, like a logger.
"""

from __future__ import annotations

import time
from typing import NamedTuple

#: Phase kinds; each selects an allowance (see :class:`~.verdict.Policy`): ``setup`` (process groups,
#: DDP wrapping, restore), ``warmup`` (the first training step, the first batch of every DataLoader pass,
#: the sanity check), ``checkpoint`` (saving / loading) and ``normal`` (everything else).
KINDS = ("setup", "warmup", "checkpoint", "normal")


class Phase(NamedTuple):
    seq: int  # grows with every beat: "progress has moved"
    phase: str  # e.g. "train batch 3 (backward)"
    kind: str  # one of KINDS
    step: int  # the trainer's global step
    since: float  # time.monotonic() of the beat


class Progress:
    """The current phase of this process's training, written by the training thread."""

    def __init__(self) -> None:
        self.current = Phase(0, "starting", "setup", 0, time.monotonic())
        self.step_seconds: float | None = None  # mean compute + data seconds per training step (stragglers)

    def beat(self, phase: str, kind: str = "normal", step: int | None = None) -> None:
        cur = self.current
        self.current = Phase(cur.seq + 1, phase, kind, cur.step if step is None else step, time.monotonic())

    def reset(self) -> None:
        self.__init__()


PROGRESS = Progress()


def beat(phase: str, kind: str = "normal", step: int | None = None) -> None:
    """Record that this process's training has moved on to ``phase``."""
    PROGRESS.beat(phase, kind, step)


def bucket_beat(index: int) -> None:
    """From the comm hook: a gradient bucket was handed over (backward is moving)."""
    cur = PROGRESS.current
    base = cur.phase.split(": gradient all-reduce", 1)[0]
    PROGRESS.beat(f"{base}: gradient all-reduce of bucket {index}", cur.kind)
