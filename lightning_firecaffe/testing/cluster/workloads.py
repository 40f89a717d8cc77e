"""Small workloads for :meth:`EmulatedCluster.run` (self-checks and link measurements).

Each runs on every rank after ``init_process_group`` and returns something picklable.  They import only
torch, so ranks start fast (see :mod:`lightning_firecaffe.testing.cluster.worker`).
"""

from __future__ import annotations

import os
import socket
import time


def identity() -> dict:
    """Who and where this rank is (rank, world size, host, address, hostname of the namespace)."""
    import torch.distributed as dist

    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "host": int(os.environ["FIRECAFFE_CLUSTER_HOST"]),
        "addr": os.environ["FIRECAFFE_CLUSTER_HOST_ADDR"],
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }


def all_reduce_check(numel: int = 1000) -> dict:
    """``dist.all_reduce`` (sum) of ``[rank + 1] * numel``; returns the result's distinct values and identity."""
    import torch
    import torch.distributed as dist

    t = torch.full((int(numel),), float(dist.get_rank() + 1))
    dist.all_reduce(t)
    return {**identity(), "values": sorted(set(t.tolist()))}


def all_reduce_time(nbytes: float = 25e6, repeats: int = 5, warmup: int = 1) -> dict:
    """Seconds per ``dist.all_reduce`` of a float32 buffer of ``nbytes`` (every repetition, after warm-up)."""
    import torch
    import torch.distributed as dist

    t = torch.ones(int(nbytes) // 4)
    times = []
    for i in range(int(warmup) + int(repeats)):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    expected = float(dist.get_world_size()) ** (int(warmup) + int(repeats))
    ok = bool(torch.all(t == expected)) if expected < 2**24 else True
    return {"rank": dist.get_rank(), "nbytes": int(nbytes), "times": times, "correct": ok}


def p2p_time(nbytes: float = 20e6, src: int = 0, dst: int = 1) -> dict:
    """Seconds to send ``nbytes`` from rank ``src`` to rank ``dst`` (after a small warm-up exchange)."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    small = torch.zeros(16)
    if rank == src:
        dist.send(small, dst)
    elif rank == dst:
        dist.recv(small, src)
    t = torch.ones(int(nbytes) // 4) if rank == src else torch.zeros(int(nbytes) // 4)
    dist.barrier()
    start = time.perf_counter()
    if rank == src:
        dist.send(t, dst)
        dist.recv(small, dst)  # acknowledgement: the time covers delivery
    elif rank == dst:
        dist.recv(t, src)
        dist.send(small, src)
    elapsed = time.perf_counter() - start
    return {"rank": rank, "nbytes": int(nbytes), "seconds": elapsed, "correct": bool(t[-1] == 1)}


def fail(message: str = "workload failed on purpose", rank: int | None = None) -> None:
    """Raise ``ValueError(message)`` on ``rank`` (all ranks when None); the others wait in a barrier."""
    import torch.distributed as dist

    if rank is None or dist.get_rank() == rank:
        raise ValueError(message)
    dist.barrier()
