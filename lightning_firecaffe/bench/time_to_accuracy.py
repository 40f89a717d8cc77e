"""Time to accuracy, FireCaffe's own measure, as pure functions of the runs' validation curves.

A run's curve is its validation top-1 (a fraction) against training wall-clock seconds (validation passes
excluded: :class:`~lightning_firecaffe.callbacks.TrainingClock`). Validations come at fixed image counts, so
the seeds of a configuration validate at the same points: its mean curve averages the k-th validation of
every seed that did not diverge (time and top-1), up to the last one they all reached. Its time to a target
is the first point of that mean curve at or above the target (a per-seed median would call a baseline that
ends at its own mean "never" whenever half its seeds end below it); the default target is the baseline's
final mean top-1 (its mean curve's last point) minus half a point. Nothing here reads files or starts
processes.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TIME, IMAGES, TOP1 = "time/train_s", "time/images", "val/top1"
TARGET_MARGIN = 0.005  # half a point of top-1 below the baseline's final mean


@dataclass(frozen=True)
class Point:
    seconds: float
    images: float
    top1: float


@dataclass
class Run:
    """One seed of one configuration: its curve, how it ended, and its throughput."""

    config: str
    seed: int
    points: list[Point]
    exit_code: int = 0
    diverged: bool = False
    message: str = ""

    @property
    def final_top1(self) -> float | None:
        return self.points[-1].top1 if self.points else None

    @property
    def images_per_s(self) -> float | None:
        last = self.points[-1] if self.points else None
        return last.images / last.seconds if last and last.seconds > 0 else None


def curve_from_csv_rows(rows: Iterable[dict[str, str]]) -> list[Point]:
    """The (seconds, images, top-1) rows of a CSVLogger ``metrics.csv``, in time order."""
    points = []
    for row in rows:
        if row.get(TIME) and row.get(TOP1):
            points.append(Point(float(row[TIME]), float(row.get(IMAGES) or "nan"), float(row[TOP1])))
    return sorted(points, key=lambda p: p.seconds)


def read_curve(path: str) -> list[Point]:
    with open(path, newline="") as f:
        return curve_from_csv_rows(csv.DictReader(f))


def time_to_target(points: Sequence[Point], target: float) -> float | None:
    """Seconds at the first validation whose top-1 reaches ``target``; ``None`` if none does."""
    return next((p.seconds for p in points if p.top1 >= target), None)


def mean_curve(runs: Sequence[Run]) -> list[Point]:
    """The k-th validation averaged over the seeds that did not diverge, up to the last all of them reached."""
    curves = [r.points for r in runs if not r.diverged and r.points]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [
        Point(
            statistics.mean(c[k].seconds for c in curves),
            statistics.mean(c[k].images for c in curves),
            statistics.mean(c[k].top1 for c in curves),
        )
        for k in range(n)
    ]


def spread(values: Sequence[float]) -> float:
    """Population standard deviation (0 for one value), as in the project's accuracy tables."""
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def default_target(baseline: Sequence[Run]) -> float:
    curve = mean_curve(baseline)
    if not curve:
        raise ValueError("the baseline has no finished run: no default target (pass --target)")
    return curve[-1].top1 - TARGET_MARGIN


@dataclass
class Summary:
    """One configuration's row of the report."""

    config: str
    seeds: int
    time_to_target: float | None  # first point of the mean curve at or above the target
    seed_times: list[float | None]  # each seed's own first validation at or above it (None: never)
    final_mean: float | None
    final_spread: float | None
    images_per_s: float | None
    diverged: list[int]
    speedup: float | None = None  # against the baseline's time to target
    speedup_same_batch: float | None = None  # against the named ddp row of the same batch
    same_batch_as: str | None = None


def summarise(runs: Sequence[Run], target: float) -> Summary:
    finals = [r.final_top1 for r in runs if r.final_top1 is not None and not r.diverged]
    rates = [r.images_per_s for r in runs if r.images_per_s is not None]
    times = [None if r.diverged else time_to_target(r.points, target) for r in runs]
    return Summary(
        config=runs[0].config,
        seeds=len(runs),
        time_to_target=time_to_target(mean_curve(runs), target),
        seed_times=times,
        final_mean=statistics.mean(finals) if finals else None,
        final_spread=spread(finals) if finals else None,
        images_per_s=statistics.mean(rates) if rates else None,
        diverged=[r.seed for r in runs if r.diverged],
    )


def ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow is not None and fast is not None and fast > 0 else None


def compare(
    runs: Sequence[Run], baseline: str, target: float | None = None, same_batch: dict[str, str] | None = None
) -> tuple[float, list[Summary]]:
    """Summaries of every configuration (in first-seen order) with speedups to target against ``baseline``
    and, where ``same_batch`` names one, against the ddp row of the same batch."""
    by_config: dict[str, list[Run]] = {}
    for r in runs:
        by_config.setdefault(r.config, []).append(r)
    if baseline not in by_config:
        raise ValueError(f"no runs of the baseline configuration {baseline!r}")
    target = default_target(by_config[baseline]) if target is None else target
    summaries = {name: summarise(rs, target) for name, rs in by_config.items()}
    base = summaries[baseline].time_to_target
    for name, s in summaries.items():
        s.speedup = ratio(base, s.time_to_target)
        other = (same_batch or {}).get(name)
        if other in summaries and other != name:
            s.same_batch_as = other
            s.speedup_same_batch = ratio(summaries[other].time_to_target, s.time_to_target)
    return target, list(summaries.values())


def _fmt(x: float | None, spec: str, none: str = "never") -> str:
    return none if x is None else format(x, spec)


def format_table(target: float, summaries: Sequence[Summary], baseline: str) -> str:
    lines = [
        f"target top-1 {100 * target:.2f} %; times to target are the seeds' mean curve's, speedups against "
        f"{baseline}; 'reached': seeds that got there on their own",
        f"{'configuration':<22} {'to target s':>11} {'reached':>7} {'final top-1 %':>15} {'images/s':>9} "
        f"{'diverged':>8} {'vs base':>8} {'vs ddp same batch':>18}",
    ]
    for s in summaries:
        reached = sum(t is not None for t in s.seed_times)
        final = "-" if s.final_mean is None else f"{100 * s.final_mean:.2f} +- {100 * s.final_spread:.2f}"
        same = f"{s.speedup_same_batch:.2f}x ({s.same_batch_as})" if s.speedup_same_batch is not None else "-"
        lines.append(
            f"{s.config:<22} {_fmt(s.time_to_target, '11.1f'):>11} {reached:>3}/{s.seeds:<3} {final:>15} "
            f"{_fmt(s.images_per_s, '9.1f', '-'):>9} {len(s.diverged):>8} "
            f"{_fmt(s.speedup, '7.2f', '-') + ('x' if s.speedup else ''):>8} {same:>18}"
        )
    return "\n".join(lines)
