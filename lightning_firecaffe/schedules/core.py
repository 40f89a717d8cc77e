"""The data model of an all-reduce schedule: who sends which chunk range to whom, in which round.

A schedule is pure data, computed once per (algorithm, world size, chunk count) and shared by the
simulator, the cost model and the executor. Rounds are lock-step in the model: every step of a round is
posted at once, sends read the buffer as it was when the round began, and received data is applied when
the round ends. "Forwarding" a chunk is a RECV_COPY followed by a SEND of the same chunk in a later round.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence


class ScheduleError(ValueError):
    """A schedule is malformed: unmatched send/receive, bad peer or chunk range."""


class Op(str, enum.Enum):
    SEND = "send"
    RECV_ADD = "recv_add"  # receive into scratch, then add into the buffer
    RECV_COPY = "recv_copy"  # receive and overwrite the buffer


@dataclass(frozen=True)
class Step:
    """One message as seen by one rank: ``op`` chunks ``[lo, hi)`` with ``peer``."""

    op: Op
    peer: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Transfer:
    """One message as seen by the builder: ``src`` sends chunks ``[lo, hi)`` to ``dst`` in ``round``."""

    round: int
    src: int
    dst: int
    lo: int
    hi: int
    reduce: bool = True  # True: the receiver adds; False: it overwrites


@dataclass(frozen=True)
class Schedule:
    """Per-rank, per-round steps of one all-reduce. ``rounds[rank][t]`` is a tuple of steps."""

    algorithm: str
    world_size: int
    num_chunks: int
    rounds: tuple[tuple[tuple[Step, ...], ...], ...]

    @property
    def num_rounds(self) -> int:
        return len(self.rounds[0]) if self.rounds else 0

    def steps_of(self, rank: int) -> tuple[tuple[Step, ...], ...]:
        return self.rounds[rank]

    def transfers(self) -> list[Transfer]:
        """Every message once, from the sender's side."""
        out = []
        for rank, per_round in enumerate(self.rounds):
            for t, steps in enumerate(per_round):
                for step in steps:
                    if step.op is Op.SEND:
                        out.append(Transfer(t, rank, step.peer, step.lo, step.hi))
        return out


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
    return [
        Transfer(first_round + last - t.round, t.dst, t.src, t.lo, t.hi, reduce=False) for t in transfers
    ]


def compact_rounds(transfers: Sequence[Transfer]) -> list[Transfer]:
    """Renumber rounds so that no round is empty (empty rounds cost nothing but add latency in the executor)."""
    used = sorted({t.round for t in transfers})
    index = {r: i for i, r in enumerate(used)}
    return [Transfer(index[t.round], t.src, t.dst, t.lo, t.hi, t.reduce) for t in transfers]


def build(algorithm: str, world_size: int, num_chunks: int, transfers: Sequence[Transfer]) -> Schedule:
    """Turn a list of transfers into per-rank steps, checking peers and chunk ranges."""
    if world_size < 1:
        raise ScheduleError(f"world_size must be >= 1, got {world_size}")
    transfers = compact_rounds(transfers)
    num_rounds = 1 + max((t.round for t in transfers), default=-1)
    grid: list[list[list[Step]]] = [[[] for _ in range(num_rounds)] for _ in range(world_size)]
    for t in transfers:
        if not (0 <= t.src < world_size and 0 <= t.dst < world_size) or t.src == t.dst:
            raise ScheduleError(f"{algorithm}: bad transfer {t} for world size {world_size}")
        if not 0 <= t.lo < t.hi <= num_chunks:
            raise ScheduleError(f"{algorithm}: bad chunk range [{t.lo}, {t.hi}) of {num_chunks} chunks")
        grid[t.src][t.round].append(Step(Op.SEND, t.dst, t.lo, t.hi))
        grid[t.dst][t.round].append(Step(Op.RECV_ADD if t.reduce else Op.RECV_COPY, t.src, t.lo, t.hi))
    schedule = Schedule(
        algorithm, world_size, num_chunks, tuple(tuple(tuple(steps) for steps in rank) for rank in grid)
    )
    validate(schedule)
    return schedule


def validate(schedule: Schedule) -> None:
    """Every send has exactly one matching receive in the same round, and no round writes a chunk twice."""
    for t in range(schedule.num_rounds):
        sends: Counter = Counter()
        recvs: Counter = Counter()
        for rank in range(schedule.world_size):
            received = []
            for step in schedule.rounds[rank][t]:
                if step.op is Op.SEND:
                    sends[(rank, step.peer, step.lo, step.hi)] += 1
                else:
                    recvs[(step.peer, rank, step.lo, step.hi)] += 1
                    received.append(step)
            for i, a in enumerate(received):
                for b in received[i + 1 :]:
                    overlap = a.lo < b.hi and b.lo < a.hi
                    if overlap and Op.RECV_COPY in (a.op, b.op):
                        raise ScheduleError(
                            f"{schedule.algorithm}: rank {rank} overwrites chunks [{a.lo}, {a.hi}) while also "
                            f"receiving [{b.lo}, {b.hi}) in round {t}"
                        )
        if sends != recvs:
            raise ScheduleError(
                f"{schedule.algorithm}: round {t} has unmatched messages: {dict(sends - recvs)} sent but not "
                f"received, {dict(recvs - sends)} received but not sent"
            )


def describe(schedule: Schedule, max_rounds: int = 12) -> str:
    """Human-readable rounds, e.g. ``round 0: 1->0 add [0,1)``; long schedules are elided."""
    lines = [f"{schedule.algorithm}: {schedule.world_size} ranks, {schedule.num_chunks} chunks, {schedule.num_rounds} rounds"]
    for t in range(schedule.num_rounds):
        if t == max_rounds:
            lines.append(f"  ... {schedule.num_rounds - max_rounds} more rounds")
            break
        msgs = [
            f"{tr.src}->{tr.dst} {'add' if step.op is Op.RECV_ADD else 'copy'} [{tr.lo},{tr.hi})"
            for tr in schedule.transfers()
            if tr.round == t
            for step in schedule.rounds[tr.dst][t]
            if step.peer == tr.src and step.op is not Op.SEND and (step.lo, step.hi) == (tr.lo, tr.hi)
        ]
        lines.append(f"  round {t}: " + ", ".join(msgs))
    return "\n".join(lines)
