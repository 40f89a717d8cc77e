"""Run one benchmark row's ranks under a deadline: a row that fails or hangs is reported, never fatal.

Some rows are expected to break (torch's ``powerSGD_hook`` on gloo aborts at rank 4 and hangs at rank 1,
per issue 18). The ranks run as separate processes; rank 0 writes its completed steps to a progress file
(:class:`.train_worker.Progress`). A row whose steps stop advancing for ``stall_s`` is 'hung'; one whose
rank exits with an error is 'failed' with the first line of that error; either way its process trees are
stopped (:func:`lightning_firecaffe.processes.stop`) and the benchmark goes on with the next row.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import processes

_EXCEPTION = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|NotMet)|AssertionError)\b:?(.*)$")
_NOT_CAUSES = ("ChildFailedError",)  # launchers' summaries of a rank's failure, not the failure


@dataclass
class Outcome:
    status: str  # "ok", "failed", "hung", "unavailable"
    result: dict[str, Any] | None = None
    detail: str = ""

    def describe(self) -> str:
        return {"failed": "failed: ", "hung": "hung: ", "unavailable": "not available in this build: "}.get(
            self.status, ""
        ) + self.detail


def error_line(text: str, returncode: int | None = None) -> str:
    """The first line of the error in a rank's stderr: a C++ abort's ``what():``, else the last Python
    exception line, else the last line mentioning an error, else how the process ended."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "what():" in ln:
            return ln.split("what():", 1)[1].strip()
    for ln in reversed(lines):
        if _EXCEPTION.match(ln) and not any(n in ln for n in _NOT_CAUSES):
            return ln
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode}"
    return lines[-1] if lines else f"exit code {returncode}"


def _steps(progress: Path) -> int:
    try:
        return int(progress.read_text() or 0)
    except (OSError, ValueError):
        return 0


def watch(
    procs: Sequence[subprocess.Popen],
    stderr_paths: Sequence[Path],
    out: Path,
    progress: Path,
    *,
    stall_s: float,
    deadline_s: float,
    fail_grace_s: float = 5.0,
    poll_s: float = 0.2,
) -> Outcome:
    """Wait for a row's rank processes (rank order); ``out`` is rank 0's result file."""
    started = last_change = time.monotonic()
    steps, first_exit = 0, None
    failed_order: list[int] = []
    verdict: Outcome | None = None
    while True:
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if p.poll() not in (None, 0) and rank not in failed_order:
                failed_order.append(rank)
                first_exit = first_exit or now
        if all(p.poll() is not None for p in procs):
            break
        seen = _steps(progress)
        if seen != steps:
            steps, last_change = seen, now
        if first_exit is not None and now - first_exit > fail_grace_s:
            break  # the others sit in a collective with a dead peer
        if now - last_change > stall_s:
            after = f" after step {steps}" if steps else ""
            verdict = Outcome("hung", detail=f"no step in {stall_s:g} s{after}")
            break
        if now - started > deadline_s:
            verdict = Outcome("hung", detail=f"not done in {deadline_s:g} s (at step {steps})")
            break
        time.sleep(poll_s)
    running = [p.pid for p in procs if p.poll() is None]
    if running:
        processes.stop(running, grace_s=2.0)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - stop() SIGKILLs; reaping is a formality
            pass
    if verdict is not None:
        return verdict
    if failed_order:
        rank = failed_order[0]
        text = Path(stderr_paths[rank]).read_text(errors="replace") if Path(stderr_paths[rank]).exists() else ""
        return Outcome("failed", detail=f"rank {rank}: {error_line(text, procs[rank].returncode)}")
    if not out.exists():
        return Outcome("failed", detail="no result written")
    return Outcome("ok", result=json.loads(out.read_text()))
