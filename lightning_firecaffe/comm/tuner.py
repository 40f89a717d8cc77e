"""The measured ``auto``: time the candidate algorithms on the real buckets, keep the fastest per size.

Pure bookkeeping (no processes): the comm hook asks :meth:`AutoTuner.algorithm_for` which algorithm to
run on each bucket, reports the time with :meth:`record`, and at the end of each optimizer step calls
:meth:`exchange` with a function that takes every rank's slowest time (a MAX all-reduce in the hook).
Every rank sees the same bucket sizes in the same order (DDP launches buckets identically), so every
rank runs the same trials in the same order, exchanges at the same step and - from identical MAX-reduced
times - chooses the same winner, as if rank 0 had chosen and broadcast it.

Candidates are the registry's ``auto`` algorithms, pre-filtered by the cost model (those predicted
within ``keep_within`` of the best, at most ``max_candidates``), plus every ``collective`` algorithm
(the backend's own all-reduce, which the model cannot price fairly). Tuning steps are real training
steps: every candidate computes the same sum.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .cost_model import LinkModel, rank_algorithms, schedule_time
from .schedules import get_algorithm, schedule_for_bytes

log = logging.getLogger(__name__)


@dataclass
class SizeTrials:
    """The tuning of one bucket size: trial order, times measured here, and the outcome."""

    candidates: tuple[str, ...]
    repetitions: int
    times: dict[str, list[float]] = field(default_factory=dict)
    next_trial: int = 0
    choice: str | None = None
    slowest_rank_ms: dict[str, float] = field(default_factory=dict)  # median of the slowest rank per candidate

    @property
    def trials(self) -> int:
        return len(self.candidates) * self.repetitions

    @property
    def measured(self) -> bool:
        return self.next_trial >= self.trials

    def current(self) -> str:
        return self.candidates[self.next_trial % len(self.candidates)]  # round-robin: drift hits all alike


@dataclass
class AutoTuner:
    """Chooses an algorithm per bucket size from measurements; ``fallback`` (the cost model) meanwhile."""

    world_size: int
    link: LinkModel
    fallback: Callable[[int], str]
    arity: int = 2
    chunk_bytes: int = 1 << 20
    repetitions: int = 2
    max_candidates: int = 3
    keep_within: float = 4.0
    collective_margin: float = 0.25  # a scheduled algorithm must beat the backend's all-reduce by this much
    candidates: tuple[str, ...] | None = None  # what may be picked; None: the registry's ``auto`` algorithms
    sizes: dict[int, SizeTrials] = field(default_factory=dict)

    @classmethod
    def restored(cls, choices: dict[int, str], **kwargs) -> AutoTuner:
        """A tuner that starts with the choices of a checkpoint (no re-tuning for those sizes)."""
        tuner = cls(**kwargs)
        for nbytes, name in choices.items():
            tuner.sizes[int(nbytes)] = SizeTrials((name,), 0, next_trial=0, choice=name)
        return tuner

    def candidates_for(self, nbytes: int) -> tuple[str, ...]:
        ranking = rank_algorithms(
            nbytes,
            self.world_size,
            self.link,
            arity=self.arity,
            chunk_bytes=self.chunk_bytes,
            candidates=self.candidates,
        )
        best = ranking[0][1] if ranking else 0.0
        kept = [name for name, t in ranking if not _is_collective(name) and t <= self.keep_within * best]
        collective = [name for name, _ in ranking if _is_collective(name)]
        return tuple(kept[: self.max_candidates]) + tuple(collective)

    def choice(self, nbytes: int) -> str | None:
        """The measured (or restored) choice for this bucket size, if there is one yet."""
        trials = self.sizes.get(nbytes)
        return trials.choice if trials is not None else None

    def algorithm_for(self, nbytes: int) -> str:
        """The algorithm to run on a bucket of ``nbytes`` now: the winner, the next trial, or the model's."""
        trials = self.sizes.get(nbytes)
        if trials is None:
            trials = self.sizes[nbytes] = SizeTrials(self.candidates_for(nbytes), self.repetitions)
        if trials.choice is not None:
            return trials.choice
        if trials.measured:
            return self.fallback(nbytes)  # measured, waiting for the end-of-step exchange
        return trials.current()

    def record(self, nbytes: int, algorithm: str, seconds: float) -> None:
        trials = self.sizes[nbytes]
        if trials.choice is not None or trials.measured or algorithm != trials.current():
            return
        trials.times.setdefault(algorithm, []).append(seconds)
        trials.next_trial += 1

    @property
    def tuning(self) -> bool:
        return any(t.choice is None for t in self.sizes.values())

    def ready_to_exchange(self) -> list[int]:
        """Sizes whose trials are all measured (the same list on every rank)."""
        return [n for n in sorted(self.sizes) if self.sizes[n].choice is None and self.sizes[n].measured]

    def exchange(self, slowest: Callable[[list[float]], list[float]]) -> dict[int, str]:
        """At the end of a step: decide every fully measured size. ``slowest`` maps this rank's times to the
        element-wise maximum over ranks (a collective: every rank calls it here with the same layout)."""
        ready = self.ready_to_exchange()
        if not ready:
            return {}
        layout = [(n, name) for n in ready for name in self.sizes[n].candidates]
        mine = [statistics.median(self.sizes[n].times.get(name) or [math.nan]) for n, name in layout]
        worst = slowest(mine)
        decided = {}
        for (n, name), seconds in zip(layout, worst):
            self.sizes[n].slowest_rank_ms[name] = 1e3 * seconds
        for n in ready:
            trials = self.sizes[n]
            valid = {k: v for k, v in trials.slowest_rank_ms.items() if math.isfinite(v) and v > 0}
            if len(valid) != len(trials.candidates):
                trials.choice = self.fallback(n)
                log.warning(
                    "FireCaffe auto: the measurement of %d-byte buckets is incomplete or invalid (%s); using the "
                    "cost model's choice %s",
                    n,
                    trials.slowest_rank_ms,
                    trials.choice,
                )
            else:
                trials.choice = self._winner(trials.candidates, valid)
            decided[n] = trials.choice
        return decided

    def _winner(self, candidates: tuple[str, ...], seconds: dict[str, float]) -> str:
        """The fastest candidate; but a scheduled one only if it beats the fastest collective by
        ``collective_margin``: its Python executor also takes CPU time from backward, which the bucket's
        own time does not show (measured on 2 cores: schedules that looked 10-20 % faster than gloo's
        all-reduce per bucket trained 10-15 % slower end to end)."""
        best = min(candidates, key=lambda k: (seconds[k], candidates.index(k)))
        collective = [k for k in candidates if _is_collective(k)]
        if collective and not _is_collective(best):
            native = min(collective, key=lambda k: seconds[k])
            if seconds[best] > (1 - self.collective_margin) * seconds[native]:
                return native
        return best

    def choices(self) -> dict[int, str]:
        return {n: t.choice for n, t in sorted(self.sizes.items()) if t.choice is not None}

    def report(self) -> list[dict]:
        """Per bucket size: the choice, its measured ms and the runner-up (for telemetry and the summary)."""
        rows = []
        for n, t in sorted(self.sizes.items()):
            # the best of the others: the choice need not be the fastest (a schedule must beat native by a margin)
            others = sorted((kv for kv in t.slowest_rank_ms.items() if kv[0] != t.choice), key=lambda kv: kv[1])
            rows.append(
                {
                    "bytes": n,
                    "algorithm": t.choice,
                    "measured_ms": t.slowest_rank_ms.get(t.choice or ""),
                    "runner_up": others[0][0] if others else None,
                    "runner_up_ms": others[0][1] if others else None,
                }
            )
        return rows

    def fitted_link(self) -> tuple[LinkModel, float] | None:
        """Latency and bandwidth fitted (least squares) to every measured scheduled algorithm, with the
        relative rms error of the fit; None when there is too little to fit."""
        rows = []
        for n, t in self.sizes.items():
            for name, ms in t.slowest_rank_ms.items():
                if not math.isfinite(ms) or ms <= 0 or _is_collective(name):
                    continue
                rounds, load = _features(name, n, self.world_size, self.link, self.arity, self.chunk_bytes)
                rows.append((rounds, load, ms / 1e3))
        return fit_link(rows, self.link)


def _is_collective(name: str) -> bool:
    return get_algorithm(name).collective


def _features(algorithm: str, nbytes: int, world_size: int, link: LinkModel, arity: int, chunk_bytes: int):
    """(latency terms, bytes on the busiest link) of an algorithm: its time is ``a * latency + b / B``."""
    schedule = schedule_for_bytes(
        algorithm, nbytes, world_size, chunk_bytes=chunk_bytes, arity=arity, ranks_per_node=link.ranks_per_node
    )
    unit = dict(ranks_per_node=link.ranks_per_node, intra_latency_s=0.0, intra_bandwidth_Bps=1e30)
    rounds = schedule_time(schedule, nbytes, LinkModel(latency_s=1.0, bandwidth_Bps=1e30, **unit))
    load = schedule_time(schedule, nbytes, LinkModel(latency_s=0.0, bandwidth_Bps=1.0, **unit))
    return rounds, load


def fit_link(rows: Sequence[tuple[float, float, float]], like: LinkModel) -> tuple[LinkModel, float] | None:
    """Least squares ``seconds = rounds * latency + load / bandwidth`` (non-negative latency)."""
    if len(rows) < 2:
        return None
    srr = sum(r * r for r, _, _ in rows)
    sll = sum(l * l for _, l, _ in rows)
    srl = sum(r * l for r, l, _ in rows)
    srt = sum(r * t for r, _, t in rows)
    slt = sum(l * t for _, l, t in rows)
    det = srr * sll - srl * srl
    if det <= 0:
        return None
    latency = (srt * sll - slt * srl) / det
    inverse_bandwidth = (srr * slt - srl * srt) / det
    if latency < 0:  # refit bandwidth alone
        latency, inverse_bandwidth = 0.0, slt / sll
    if inverse_bandwidth <= 0:
        return None
    fitted = LinkModel(
        latency_s=latency,
        bandwidth_Bps=1.0 / inverse_bandwidth,
        ranks_per_node=like.ranks_per_node,
        intra_latency_s=like.intra_latency_s,
        intra_bandwidth_Bps=like.intra_bandwidth_Bps,
    )
    errors = [((r * latency + l * inverse_bandwidth) - t) / t for r, l, t in rows if t > 0]
    return fitted, math.sqrt(sum(e * e for e in errors) / len(errors))
