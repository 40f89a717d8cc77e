"""Which rank slows the others down, and by how much (like DeepSpeed's ``show_straggler``).

In data-parallel training every rank takes the same wall time per step: the fast ones wait for the
slowest in the all-reduce. So the report compares what each rank spends *outside* collectives (fetching
its batch and running its training step), measured by the phase-beat callback and shared in the beats.
"""

from __future__ import annotations

import statistics
from typing import Optional

#: A rank counts as a straggler when it is this much slower than the median rank.
STRAGGLER_RATIO = 1.5


def slowest(step_seconds: dict[int, float]) -> Optional[tuple[int, float, float]]:
    """(rank, its seconds per step, ratio to the median of the other ranks), or None without figures."""
    known = {r: s for r, s in step_seconds.items() if s is not None and s > 0}
    if len(known) < 2:
        return None
    rank = max(known, key=known.__getitem__)
    others = statistics.median(s for r, s in known.items() if r != rank)
    return rank, known[rank], known[rank] / others if others > 0 else float("inf")


def straggler_report(step_seconds: dict[int, float]) -> Optional[str]:
    """The end-of-fit summary line(s), or None without figures."""
    found = slowest(step_seconds)
    if found is None:
        return None
    rank, seconds, ratio = found
    per_rank = ", ".join(f"{r}: {s * 1e3:.0f} ms" for r, s in sorted(step_seconds.items()) if s is not None)
    verdict = (f"rank {rank} is a straggler: {seconds * 1e3:.0f} ms of compute + data per step, {ratio:.1f}x the "
               f"other ranks' median" if ratio >= STRAGGLER_RATIO else
               f"no straggler (slowest: rank {rank}, {ratio:.2f}x the other ranks' median)")  # fmt: skip
    return f"FireCaffe stragglers: {verdict}. Compute + data per step by rank: {per_rank}."
