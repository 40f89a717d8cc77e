"""``ip`` and ``tc`` (iproute2), as the emulated cluster and its SLURM nodes call them: always with a deadline.

A netlink call can block (a namespace being torn down, a kernel busy deleting veths); a harness that waits
forever for one hangs the test run with it. So every call has a timeout, and a failure says which command
failed and what it printed.
"""

from __future__ import annotations

import subprocess

TIMEOUT_S = 20.0
TIMED_OUT = 124  # the return code reported for a call that ran past its timeout (as timeout(1) does)


def run(tool: str, *args: str, check: bool = True, timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``tool args...`` with its output captured as text.

    ``check``: a non-zero exit or a timeout raises ``RuntimeError`` naming the command and its stderr.
    Without it nothing raises: a timeout comes back as return code :data:`TIMED_OUT` (teardown paths go on
    with what they can do).
    """
    argv = [tool, *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(argv, TIMED_OUT, "", f"did not finish within {timeout_s:g} s")
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ip(*args: str, check: bool = True, timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``ip args...`` (see :func:`run`)."""
    return run("ip", *args, check=check, timeout_s=timeout_s)


def tc(*args: str, check: bool = True, timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``tc args...`` (see :func:`run`)."""
    return run("tc", *args, check=check, timeout_s=timeout_s)
