"""The data model of an all-reduce schedule: who sends which chunk range to whom, in which round.

A schedule is pure data, computed once per (algorithm, world size, chunk count) and shared by the
simulator, the cost model and the executor. Rounds are lock-step in the model: every message of a round is
posted at once, sends read the buffer as it was when the round began, and received data is applied when
the round ends. "Forwarding" a chunk is a RECV_COPY followed by a SEND of the same chunk in a later round.

The list of transfers is the source of truth (cheap even for 1024 ranks); each rank's ordered messages
are derived from it on demand.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np


class ScheduleError(ValueError):
    """A schedule is malformed: bad peer or chunk range, or a chunk written twice in one round."""


class Op(str, enum.Enum):
    SEND = "send"
    RECV_ADD = "recv_add"  # receive into scratch, then add into the buffer
    RECV_COPY = "recv_copy"  # receive and overwrite the buffer


class Message(NamedTuple):
    """One message as seen by one rank: ``op`` chunks ``[lo, hi)`` with ``peer``."""

    op: Op
    peer: int
    lo: int
    hi: int


class Transfer(NamedTuple):
    """One message as seen by the builder: ``src`` sends chunks ``[lo, hi)`` to ``dst`` in ``round``.
    (Each rank sees it as a :class:`Message`: a send at ``src``, a receive at ``dst``.)"""

    round: int
    src: int
    dst: int
    lo: int
    hi: int
    reduce: bool = True  # True: the receiver adds; False: it overwrites


@dataclass(frozen=True)
class Schedule:
    """One all-reduce: its transfers, sorted by round. ``messages_of(rank)[r]`` is a rank's messages in round r."""

    algorithm: str
    world_size: int
    num_chunks: int
    transfers: tuple[Transfer, ...]
    num_rounds: int
    _per_rank: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def messages_of(self, rank: int) -> tuple[tuple[Message, ...], ...]:
        """This rank's messages, round by round, in a deterministic order (cached)."""
        if rank not in self._per_rank:
            grid: list[list[Message]] = [[] for _ in range(self.num_rounds)]
            for t in self.transfers:
                if t.src == rank:
                    grid[t.round].append(Message(Op.SEND, t.dst, t.lo, t.hi))
                elif t.dst == rank:
                    grid[t.round].append(Message(Op.RECV_ADD if t.reduce else Op.RECV_COPY, t.src, t.lo, t.hi))
            self._per_rank[rank] = tuple(tuple(messages) for messages in grid)
        return self._per_rank[rank]

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """Columns (round, src, dst, lo, hi) as integer arrays, for vectorised pricing."""
        a = np.asarray([t[:5] for t in self.transfers], dtype=np.int64).reshape(-1, 5)
        return {"round": a[:, 0], "src": a[:, 1], "dst": a[:, 2], "lo": a[:, 3], "hi": a[:, 4]}


TAG_SPACE = 1 << 30  # message tags stay below this; the transport's own tags lie above


def message_tag(bucket: int, schedule: Schedule, round_index: int, first_chunk: int) -> int:
    """The tag of one message: unique per (bucket, round, first chunk) between a pair of ranks."""
    tag = ((bucket % 1024) * (schedule.num_rounds + 1) + round_index) * (schedule.num_chunks + 1) + first_chunk
    return tag % TAG_SPACE


def chunk_offsets(numel: int, num_chunks: int) -> list[int]:
    """Element offsets of ``num_chunks`` contiguous, nearly equal chunks (some empty if numel is small)."""
    return [(i * numel) // num_chunks for i in range(num_chunks + 1)]


def reversed_as_broadcast(transfers: Iterable[Transfer], first_round: int) -> list[Transfer]:
    """Time-reverse a reduction into a broadcast: every message flips direction and overwrites.

    In a reduction a node sends to its parent only after hearing from all its children, so in the mirror
    image it hears from its parent before sending to its children: a valid broadcast from the root.
    """
    transfers = list(transfers)
    if not transfers:
        return []
    last = max(t.round for t in transfers)
    return [Transfer(first_round + last - t.round, t.dst, t.src, t.lo, t.hi, False) for t in transfers]


def build(algorithm: str, world_size: int, num_chunks: int, transfers: Sequence[Transfer]) -> Schedule:
    """Sort transfers into rounds (dropping empty rounds) and check peers and chunk ranges."""
    if world_size < 1:
        raise ScheduleError(f"world_size must be >= 1, got {world_size}")
    used = sorted({t.round for t in transfers})
    if used != list(range(len(used))):
        index = {r: i for i, r in enumerate(used)}
        transfers = [t._replace(round=index[t.round]) for t in transfers]
    for t in transfers:
        if not (0 <= t.src < world_size and 0 <= t.dst < world_size) or t.src == t.dst:
            raise ScheduleError(f"{algorithm}: bad transfer {t} for world size {world_size}")
        if not 0 <= t.lo < t.hi <= num_chunks:
            raise ScheduleError(f"{algorithm}: bad chunk range [{t.lo}, {t.hi}) of {num_chunks} chunks")
    ordered = tuple(sorted(transfers, key=lambda t: t.round))
    return Schedule(algorithm, world_size, num_chunks, ordered, len(used))


def validate(schedule: Schedule) -> None:
    """No rank overwrites a chunk range that it also receives in the same round (the result would
    depend on arrival order). Send/receive matching holds by construction: a transfer is both."""
    incoming: dict[tuple[int, int], list[Transfer]] = {}
    for t in schedule.transfers:
        incoming.setdefault((t.round, t.dst), []).append(t)
    for (rnd, rank), msgs in incoming.items():
        if len(msgs) < 2 or all(m.reduce for m in msgs):
            continue
        for i, a in enumerate(msgs):
            for b in msgs[i + 1 :]:
                if a.lo < b.hi and b.lo < a.hi and not (a.reduce and b.reduce):
                    raise ScheduleError(
                        f"{schedule.algorithm}: rank {rank} overwrites chunks [{a.lo}, {a.hi}) while also "
                        f"receiving [{b.lo}, {b.hi}) in round {rnd}"
                    )


def describe(schedule: Schedule, max_rounds: int = 12) -> str:
    """Human-readable rounds, e.g. ``round 0: 1->0 add [0,1)``; long schedules are elided."""
    lines = [
        f"{schedule.algorithm}: {schedule.world_size} ranks, {schedule.num_chunks} chunks, {schedule.num_rounds} rounds"
    ]
    by_round: dict[int, list[str]] = {}
    for t in schedule.transfers:
        by_round.setdefault(t.round, []).append(f"{t.src}->{t.dst} {'add' if t.reduce else 'copy'} [{t.lo},{t.hi})")
    for rnd in range(min(schedule.num_rounds, max_rounds)):
        lines.append(f"  round {rnd}: " + ", ".join(by_round.get(rnd, [])))
    if schedule.num_rounds > max_rounds:
        lines.append(f"  ... {schedule.num_rounds - max_rounds} more rounds")
    return "\n".join(lines)
