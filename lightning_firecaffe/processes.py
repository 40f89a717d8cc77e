"""Process trees: find, check and stop them (psutil), for the watchdog, the strategy and the test harnesses.

A rank that fails must not leave processes behind (DataLoader workers, ranks it launched, job steps), and
a harness that tears a cluster down must not wait for a process that has already exited. Two rules hold
everywhere: a zombie (exited, not yet reaped by its parent) counts as dead, and this process never
signals itself. Nothing here reaps: a child's exit status stays for its ``Popen`` to collect.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterable, Sequence

import psutil

_POLL_S = 0.05


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a stopped process runs too); False once it has exited, zombie or reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, owned by someone else
        return True


@functools.cache
def _machine() -> str:
    """This boot of this machine and this pid namespace: where a pid means the same process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def identity(pid: int | None = None) -> str | None:
    """A token naming one process (default: this one) for :func:`running`, or None where it cannot.

    Machine, pid namespace, pid and start time: another machine, container or a reused pid never match."""
    machine = _machine()
    try:
        started = psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None
    return f"{machine}/{pid or os.getpid()}/{started!r}" if machine else None


def running(token: str | None) -> bool | None:
    """Whether the process named by :func:`identity`'s ``token`` still runs: True or False where this process
    can see it (same machine and pid namespace), None where it cannot tell (another machine, no token)."""
    if not token:
        return None
    machine, pid, started = token.rsplit("/", 2)
    if machine != _machine():
        return None
    try:
        proc = psutil.Process(int(pid))
        return repr(proc.create_time()) == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def descendants(pid: int) -> list[int]:
    """Children of ``pid``, their children, and so on (empty if ``pid`` is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _trees(pids: Iterable[int]) -> list[int]:
    """``pids`` and all their descendants, each once, without this process."""
    me, found = os.getpid(), {}
    for pid in pids:
        for p in (pid, *descendants(pid)):
            if p != me:
                found.setdefault(p, None)
    return list(found)


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """Wait up to ``timeout_s`` for ``pids`` to exit; the ones still alive."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        left = [p for p in left if alive(p)]
    return left


def stop(pids: Iterable[int], grace_s: float, *, terminate: bool = True, kill_wait_s: float = 5.0) -> list[int]:
    """Stop the process trees rooted at ``pids``; returns the pids it had to SIGKILL.

    SIGTERM every process of the trees (``terminate=False``: no signal, they are expected to exit by
    themselves, e.g. ranks that reach their own verdict), wait up to ``grace_s`` for them to exit, SIGKILL
    whatever is left (the trees walked again: children started meanwhile die too) and wait up to
    ``kill_wait_s`` for that. The trees are walked before any signal: an orphan cannot be found later.
    """
    members = _trees(pids)
    if terminate:
        _signal(members, signal.SIGTERM)
    left = _wait_gone(members, grace_s)
    if not left:
        return []
    killed = [p for p in _trees(left) if alive(p)]
    _signal(killed, signal.SIGKILL)
    _wait_gone(killed, kill_wait_s)
    return killed


def stop_descendants(launched: Sequence[int] = (), grace_s: float = 10.0) -> list[int]:
    """Stop every descendant of this process; returns the pids it had to SIGKILL.

    The trees of ``launched`` (ranks this process started, which reach their own verdict and should say
    so themselves) get ``grace_s`` to exit on their own; everything else (DataLoader workers, helpers)
    is SIGKILLed at once. Neither gets SIGTERM: a rank would take it for a preemption.
    """
    spared = set(_trees(launched))
    others = [p for p in descendants(os.getpid()) if p not in spared]
    killed = stop(others, 0.0, terminate=False)
    return killed + stop(launched, grace_s, terminate=False)
