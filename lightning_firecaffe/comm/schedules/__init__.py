"""All-reduce algorithms as pure schedules: which rank sends which chunk to whom, round by round.

Importing this package registers the built-in algorithms (``trees``, ``baselines``) in
:mod:`.registry`, the one list every consumer of algorithm names reads.
"""

from __future__ import annotations

from . import baselines, trees  # noqa: F401  (registers them; each declares its ``order``)
from .core import (
    Message,
    Op,
    Schedule,
    ScheduleError,
    Transfer,
    build,
    chunk_offsets,
    describe,
    message_tag,
    validate,
)
from .registry import (
    Algorithm,
    algorithm_names,
    algorithms,
    auto_candidates,
    get_algorithm,
    markdown_table,
    on_register,
    paired_pieces,
    pieces,
    register_algorithm,
    unregister_algorithm,
    whole_buffer,
)


def schedule_for_bytes(
    algorithm: str, nbytes: int, world_size: int, *, chunk_bytes: int, arity: int = 2, ranks_per_node: int = 1
) -> Schedule:
    """The (cached) schedule of a named algorithm for a buffer of ``nbytes``."""
    return get_algorithm(algorithm).schedule_for_bytes(
        nbytes, world_size, chunk_bytes=chunk_bytes, arity=arity, ranks_per_node=ranks_per_node
    )


__all__ = [
    "Algorithm",
    "Message",
    "Op",
    "Schedule",
    "ScheduleError",
    "Transfer",
    "algorithm_names",
    "algorithms",
    "auto_candidates",
    "build",
    "chunk_offsets",
    "describe",
    "get_algorithm",
    "markdown_table",
    "message_tag",
    "on_register",
    "paired_pieces",
    "pieces",
    "register_algorithm",
    "schedule_for_bytes",
    "unregister_algorithm",
    "validate",
    "whole_buffer",
]
