"""Run a function on N forked gloo ranks and collect each rank's result or error (for tests only)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as exc:  # report, never hang the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        queue.close()
        queue.join_thread()  # flush the report before leaving without running atexit handlers
        os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0) -> dict[int, tuple]:
    """Fork ``world_size`` processes running ``fn(rank, world_size, *args)``; returns {rank: (status, value)}.

    Ranks that neither report nor exit within ``timeout`` are killed and reported as ("timeout", None);
    ranks that exit without reporting are ("died", exitcode).
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) < world_size and time.monotonic() < deadline:
        try:
            rank, status, value = queue.get(timeout=0.2)
            results[rank] = (status, value)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs):
                # drain what is left, then stop waiting
                while not queue.empty():
                    rank, status, value = queue.get()
                    results[rank] = (status, value)
                break
    for rank, p in enumerate(procs):
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            results.setdefault(rank, ("timeout", None))
        results.setdefault(rank, ("died", p.exitcode))
    return results
