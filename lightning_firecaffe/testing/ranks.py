"""Start N local ranks, always with a deadline: nothing here can hang.

* :func:`run_ranks` forks ranks with a gloo process group and runs a function in each (the executor and
  comm benchmark on loopback, the tests); a rank that neither reports nor exits in time is killed.
* :func:`run_launcher_script` runs a script whose ``Trainer`` starts its own ranks (``ddp`` and
  ``firecaffe`` re-run the command line in each child), in a clean environment.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the one port helper of the project)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as exc:  # report, never hang the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        queue.close()
        queue.join_thread()  # flush the report before leaving without atexit handlers
        os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0) -> dict[int, tuple]:
    """Fork ``world_size`` ranks running ``fn(rank, world_size, *args)``; returns {rank: (status, value)}.

    status is "ok" (value = return value), "error" (value = traceback text), "died" (value = exit code)
    or "timeout".
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world_size and time.monotonic() < deadline:
        try:
            rank, status, value = queue.get(timeout=0.2)
            results[rank] = (status, value)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs):
                break
    while True:  # whatever was reported after the loop ended
        try:
            rank, status, value = queue.get(timeout=0.05)
            results[rank] = (status, value)
        except queue_mod.Empty:
            break
    for rank, p in enumerate(procs):
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            results.setdefault(rank, ("timeout", None))
        results.setdefault(rank, ("died", p.exitcode))
    return results


def first_result(results: dict[int, tuple]) -> Any:
    """Rank 0's value, or a RuntimeError that shows what went wrong on every failed rank."""
    failed = {r: v for r, v in results.items() if v[0] != "ok"}
    if failed:
        detail = "\n".join(f"rank {r}: {status}: {value}" for r, (status, value) in sorted(failed.items()))
        raise RuntimeError(f"benchmark ranks failed:\n{detail}")
    return results[0][1]


def child_environment(env: dict[str, str] | None = None, *, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a script that launches its own ranks: rank variables inherited from a surrounding
    job dropped (the child would think it was launched externally and wait for peers that never come), and
    ``drop`` too; one intra-op thread per process, unbuffered output, no warnings."""
    environment = dict(os.environ if env is None else env)
    for key in (*_RANK_VARIABLES, *drop):
        environment.pop(key, None)
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return environment


def run_launcher_script(
    argv: list[str], *, timeout: float, cwd: Any = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python argv...`` whose Trainer launches its own ranks; output is captured, ``timeout`` enforced."""
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        env=child_environment(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_session(command: list[str], *, timeout: float, drop: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ``command`` (which launches its own ranks) in a session of its own: returns its exit status and
    its stdout and stderr interleaved, once every process holding its output is gone. If it is not done
    within ``timeout`` the whole session is killed (ranks included, so a failing test leaves nothing behind)
    and :class:`subprocess.TimeoutExpired` carries what it printed."""
    proc = subprocess.Popen(
        [str(c) for c in command],
        env=child_environment(drop=drop),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, output=output) from None
    return proc.returncode, output
