"""The alpha-beta cost model: one implementation for the simulator, ``auto``, benchmarks and the planner.

A message of n bytes costs ``latency + n / bandwidth``. Rounds are lock-step: all messages of a round
travel at once, a link is full duplex, and a round lasts as long as its busiest link. With several ranks
per node, ranks on one node talk over a fast intra-node link, while all their traffic to other nodes
shares the node's single network link (so the two-level tree has something to win).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schedules import Schedule, auto_candidates, chunk_offsets, schedule_for_bytes


@dataclass(frozen=True)
class LinkModel:
    """Links of a cluster. Defaults: 10 Gbit/s Ethernet between nodes, PCIe-class links inside a node."""

    latency_s: float = 30e-6
    bandwidth_Bps: float = 1.25e9
    ranks_per_node: int = 1
    intra_latency_s: float = 5e-6
    intra_bandwidth_Bps: float = 20e9

    def __post_init__(self) -> None:
        for name in ("bandwidth_Bps", "intra_bandwidth_Bps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LinkModel.{name} must be > 0, got {getattr(self, name)}")
        for name in ("latency_s", "intra_latency_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"LinkModel.{name} must be >= 0, got {getattr(self, name)}")
        if self.ranks_per_node < 1:
            raise ValueError(f"LinkModel.ranks_per_node must be >= 1, got {self.ranks_per_node}")

    @classmethod
    def from_gbit(cls, gbit_per_s: float, latency_us: float = 30.0, ranks_per_node: int = 1) -> LinkModel:
        return cls(latency_s=latency_us * 1e-6, bandwidth_Bps=gbit_per_s * 1e9 / 8, ranks_per_node=ranks_per_node)


def round_times(schedule: Schedule, nbytes: int, link: LinkModel, itemsize: int = 4) -> list[float]:
    """Seconds of each round of ``schedule`` on a buffer of ``nbytes`` (vectorised over transfers)."""
    if not schedule.transfers:
        return []
    a = schedule.arrays
    offsets = np.asarray(chunk_offsets(nbytes // itemsize, schedule.num_chunks), dtype=np.int64)
    size = ((offsets[a["hi"]] - offsets[a["lo"]]) * itemsize).astype(np.float64)
    live = size > 0
    rnd, src, dst, size = a["round"][live], a["src"][live], a["dst"][live], size[live]
    rounds, p = schedule.num_rounds, schedule.world_size
    src_node, dst_node = src // link.ranks_per_node, dst // link.ranks_per_node
    local = src_node == dst_node
    nodes = (p + link.ranks_per_node - 1) // link.ranks_per_node

    def busiest(index_out, index_in, width, mask, bandwidth):
        load = np.zeros((rounds, 2 * width))
        np.add.at(load, (rnd[mask], index_out[mask]), size[mask])
        np.add.at(load, (rnd[mask], width + index_in[mask]), size[mask])
        return load.max(axis=1) / bandwidth

    intra = busiest(src, dst, p, local, link.intra_bandwidth_Bps)
    inter = busiest(src_node, dst_node, nodes, ~local, link.bandwidth_Bps)
    latency = np.zeros(rounds)
    np.maximum.at(latency, rnd[local], link.intra_latency_s)
    np.maximum.at(latency, rnd[~local], link.latency_s)
    return (latency + np.maximum(intra, inter)).tolist()


def schedule_time(schedule: Schedule, nbytes: int, link: LinkModel, itemsize: int = 4) -> float:
    """Predicted seconds for one all-reduce of ``nbytes`` with ``schedule``."""
    return sum(round_times(schedule, nbytes, link, itemsize))


def predict(
    algorithm: str,
    nbytes: int,
    world_size: int,
    link: LinkModel,
    *,
    arity: int = 2,
    chunk_bytes: int = 1 << 20,
    itemsize: int = 4,
) -> float:
    """Predicted seconds for a named algorithm (schedules are built and cached on demand)."""
    if world_size == 1:
        return 0.0
    schedule = schedule_for_bytes(
        algorithm, nbytes, world_size, chunk_bytes=chunk_bytes, arity=arity, ranks_per_node=link.ranks_per_node
    )
    return schedule_time(schedule, nbytes, link, itemsize)


def rank_algorithms(
    nbytes: int,
    world_size: int,
    link: LinkModel,
    *,
    arity: int = 2,
    chunk_bytes: int = 1 << 20,
    candidates: Iterable[str] | None = None,
) -> list[tuple[str, float]]:
    """``(algorithm, predicted seconds)`` fastest first (stable: ties keep registry order).

    ``candidates`` defaults to the registry's ``auto`` candidates for this world size and node layout.
    """
    names = auto_candidates(world_size, link.ranks_per_node) if candidates is None else tuple(candidates)
    priced = [(a, predict(a, nbytes, world_size, link, arity=arity, chunk_bytes=chunk_bytes)) for a in names]
    return sorted(priced, key=lambda item: item[1])


def best_algorithm(nbytes: int, world_size: int, link: LinkModel, **options: Any) -> str:
    """The candidate with the lowest predicted time (ties go to the earlier candidate); ``options`` are
    :func:`rank_algorithms`'s."""
    ranking = rank_algorithms(nbytes, world_size, link, **options)
    if not ranking:
        raise ValueError(f"no all-reduce algorithm is eligible for {world_size} ranks")
    return ranking[0][0]


# Closed forms (bandwidth and latency terms) of the textbook algorithms, for checks and quick estimates.
def parameter_server_time(workers: int, nbytes: float, link: LinkModel) -> float:
    """One server and ``workers`` clients: the server's link carries 2 * workers buffers."""
    return 2 * workers * (link.latency_s + nbytes / link.bandwidth_Bps)


def tree_time(world_size: int, nbytes: float, link: LinkModel, arity: int = 2) -> float:
    """k-nomial reduce + broadcast of the whole buffer: 2 (k-1) ceil(log_k p) messages in sequence."""
    levels = math.ceil(math.log(world_size, arity) - 1e-12) if world_size > 1 else 0
    return 2 * (arity - 1) * levels * (link.latency_s + nbytes / link.bandwidth_Bps)


def ring_time(world_size: int, nbytes: float, link: LinkModel) -> float:
    """Reduce-scatter + all-gather: 2 (p-1) messages of N/p bytes (the bandwidth lower bound)."""
    p = world_size
    return 2 * (p - 1) * (link.latency_s + nbytes / p / link.bandwidth_Bps)
