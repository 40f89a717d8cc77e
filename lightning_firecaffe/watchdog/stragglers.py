"""Which rank slows the others down, and by how much (like DeepSpeed's ``show_straggler``).

In data-parallel training every rank takes the same wall time per step: the fast ones wait for the
slowest in the all-reduce. So the report compares what each rank spends *outside* collectives (fetching
its batch and running its training step), measured by the phase-beat callback and shared in the beats.
"""

from __future__ import annotations

import statistics

#: A rank counts as a straggler when it is this much slower than the median rank.
STRAGGLER_RATIO = 1.5


def slowest(step_seconds: dict[int, float]) -> tuple[int, float, float] | None:
    """(rank, its seconds per step, ratio to the median of the other ranks), or None without figures."""
    known = {r: s for r, s in step_seconds.items() if s is not None and s > 0}
    if len(known) < 2:
        return None
    rank = max(known, key=known.__getitem__)
    others = statistics.median(s for r, s in known.items() if r != rank)
    return rank, known[rank], known[rank] / others if others > 0 else float("inf")


def straggler_report(step_seconds: dict[int, float]) -> str | None:
    """The end-of-fit summary line(s), or None without figures."""
    found = slowest(step_seconds)
    if found is None:
        return None
    rank, seconds, ratio = found
    per_rank = ", ".join(f"{r}: {s * 1e3:.0f} ms" for r, s in sorted(step_seconds.items()) if s is not None)
    verdict = (
        f"rank {rank} is a straggler: {seconds * 1e3:.0f} ms of compute + data per step, {ratio:.1f}x the "
        f"other ranks' median"
        if ratio >= STRAGGLER_RATIO
        else f"no straggler (slowest: rank {rank}, {ratio:.2f}x the other ranks' median)"
    )
    return f"FireCaffe stragglers: {verdict}. Compute + data per step by rank: {per_rank}."


def slowest_links(seconds: dict[tuple[int, int], float]) -> tuple[int, float, float, dict[int, float]] | None:
    """From probe times ``{(sender, receiver): seconds}``: the rank whose links are slowest, as (rank, its
    time, ratio to the other ranks' median, every rank's time), or None without figures.

    A rank's link time is its *fastest* transfer, in or out: a transfer is as slow as the slower of its
    two ends, so a host whose NIC or cable is slow has no fast transfer at all, while its peers still do.
    """
    per_rank: dict[int, float] = {}
    for (src, dst), s in seconds.items():
        if s is None or not s > 0:
            continue
        for rank in (src, dst):
            per_rank[rank] = min(per_rank.get(rank, float("inf")), s)
    found = slowest(per_rank)
    return None if found is None else (*found, per_rank)


def link_report(seconds: dict[tuple[int, int], float], nbytes: int) -> str | None:
    """The links line of the end-of-fit summary, or None without figures."""
    found = slowest_links(seconds)
    if found is None:
        return None
    rank, worst, ratio, per_rank = found
    size = f"{nbytes / 2**20:g} MiB"
    listed = ", ".join(f"{r}: {s * 1e3:.1f} ms" for r, s in sorted(per_rank.items()))
    verdict = (
        f"rank {rank}'s links are the slowest: {worst * 1e3:.1f} ms per {size}, {ratio:.1f}x the other ranks' median"
        if ratio >= STRAGGLER_RATIO
        else f"no slow link (slowest: rank {rank}, {ratio:.2f}x the other ranks' median)"
    )
    return f"FireCaffe links: {verdict}. Fastest transfer of {size} in or out, by rank: {listed}."
