"""Benchmarks on the emulated cluster: one rank per host (network namespace), links shaped with tc."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
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


def train_on_cluster(
    args: argparse.Namespace, strategy: str, algorithm: str, worker_args: Callable[..., list[str]]
) -> dict[str, Any]:
    """One training run with one rank per host: Lightning sees num_nodes=hosts, devices=1."""
    from ..testing.cluster import EmulatedCluster, require_root

    require_root()
    with tempfile.TemporaryDirectory() as tmp, EmulatedCluster(hosts=args.world_size, rate=args.hosts_rate) as cluster:
        out = os.path.join(tmp, "result.json")
        argv = [sys.executable, *worker_args(args, strategy, algorithm, out)]
        if "lightning_firecaffe.bench.train_worker" in argv:  # Lightning: one rank per host
            argv += ["--devices", "1", "--num-nodes", str(args.world_size)]
        cluster.run(argv, timeout=args.timeout, backend=None)
        return json.loads(Path(out).read_text())
