"""All-reduce algorithms as pure schedules: which rank sends which chunk to whom, round by round."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

from .baselines import parameter_server, ring
from .core import Op, Schedule, ScheduleError, Step, Transfer, chunk_offsets, describe, validate
from .trees import double_tree, pipelined_tree, tree, two_level

GENERATORS: dict[str, Callable[..., Schedule]] = {
    "tree": tree,
    "pipelined_tree": pipelined_tree,
    "double_tree": double_tree,
    "two_level": two_level,
    "ring": ring,
    "parameter_server": parameter_server,
}
ALGORITHMS: tuple[str, ...] = tuple(GENERATORS)


def num_chunks_for(algorithm: str, nbytes: int, world_size: int, chunk_bytes: int) -> int:
    """How many chunks an algorithm cuts a buffer into: pipelined ones stream ``chunk_bytes`` pieces."""
    if algorithm in ("tree", "parameter_server"):
        return 1
    if algorithm == "ring":  # two directions x p segments x k >= 2 pieces (overlap) of at most 2 chunks
        return 2 * world_size * max(2, math.ceil(nbytes / (2 * world_size) / (2 * chunk_bytes)))
    pieces = max(1, math.ceil(nbytes / chunk_bytes))
    if algorithm == "double_tree":
        return 2 * max(1, math.ceil(pieces / 2))
    return pieces


@lru_cache(maxsize=256)
def build_schedule(
    algorithm: str, world_size: int, num_chunks: int = 1, arity: int = 2, ranks_per_node: int = 1
) -> Schedule:
    """Build (and cache) the schedule of a named algorithm."""
    if algorithm not in GENERATORS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return GENERATORS[algorithm](
        world_size=world_size, num_chunks=num_chunks, arity=arity, ranks_per_node=ranks_per_node
    )


def schedule_for_bytes(
    algorithm: str, nbytes: int, world_size: int, *, chunk_bytes: int, arity: int = 2, ranks_per_node: int = 1
) -> Schedule:
    return build_schedule(
        algorithm, world_size, num_chunks_for(algorithm, nbytes, world_size, chunk_bytes), arity, ranks_per_node
    )


__all__ = [
    "ALGORITHMS",
    "GENERATORS",
    "Op",
    "Schedule",
    "ScheduleError",
    "Step",
    "Transfer",
    "build_schedule",
    "chunk_offsets",
    "describe",
    "num_chunks_for",
    "schedule_for_bytes",
    "validate",
]
