"""Benchmarks on the emulated cluster: one rank per host (network namespace), links shaped with tc."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any


def _comm_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """Rank entry point (process group already initialised by the cluster's worker)."""
    import torch.distributed as dist

    from .comm import CommSpec, measure

    return measure(dist.get_rank(), dist.get_world_size(), CommSpec(**spec))


def measure_on_cluster(spec, world_size: int, rate: str, ranks_per_host: int, timeout: float) -> dict[str, Any]:
    from ..testing.cluster import EmulatedCluster, require_root

    require_root()
    hosts = math.ceil(world_size / ranks_per_host)
    with EmulatedCluster(hosts=hosts, rate=rate, ranks_per_host=ranks_per_host) as cluster:
        results = cluster.run(
            "lightning_firecaffe.bench.cluster_runs:_comm_rank",
            args=(asdict(spec),),
            world_size=world_size,
            timeout=timeout,
        )
    return results[0].value


def train_cluster(hosts: int, rate: str):
    """A fresh emulated cluster for one training row (a row that hung leaves nothing for the next)."""
    from ..testing.cluster import EmulatedCluster, require_root

    require_root()
    return EmulatedCluster(hosts=hosts, rate=rate)


def launch_on_cluster(
    cluster, argv: list[str], lightning: bool, tmp: Path
) -> tuple[list[subprocess.Popen], list[Path]]:
    """One rank per host (Lightning sees num_nodes=hosts, devices=1); stderr of rank r in ``tmp/stderr{r}``."""
    world = cluster.world_size
    argv = [sys.executable, *argv] + (["--devices", "1", "--num-nodes", str(world)] if lightning else [])
    port = cluster.next_master_port()
    procs, errs = [], []
    for rank in range(world):
        errs.append(tmp / f"stderr{rank}")
        with open(errs[-1], "wb") as err, open(tmp / f"stdout{rank}", "wb") as out:
            env = {**os.environ, **cluster.rank_env(rank, world, port)}
            procs.append(
                cluster.popen(cluster.host_of(rank), argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            )
    return procs, errs
