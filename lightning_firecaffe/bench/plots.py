"""PNG plots (matplotlib, headless): time vs size per algorithm; speedup vs GPU count."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comm(reports: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """One panel per world size: measured median (markers) and cost-model prediction (dashed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4.5), squeeze=False)
    for ax, report in zip(axes[0], reports):
        names = list(dict.fromkeys(r["algorithm"] for r in report["results"]))
        for i, name in enumerate(names):
            rows = sorted((r for r in report["results"] if r["algorithm"] == name), key=lambda r: r["bytes"])
            color = f"C{i % 10}"
            x = [r["bytes"] for r in rows]
            ax.plot(x, [r["median_s"] * 1e3 for r in rows], "o-", color=color, label=name)
            ax.plot(x, [r["predicted_s"] * 1e3 for r in rows], "--", color=color, alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("time (ms)  — solid: measured, dashed: cost model")
        ax.set_title(f"{title} p={report['world_size']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(curves: dict[str, list[tuple[int, float, float]]], path: Path, title: str = "") -> None:
    """Speedup vs number of GPUs per algorithm: solid with overlap, dashed without; ideal diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    gpus = sorted({pt[0] for pts in curves.values() for pt in pts})
    ax.plot(gpus, gpus, ":", color="grey", label="ideal")
    for i, (name, pts) in enumerate(curves.items()):
        x = [pt[0] for pt in pts]
        ax.plot(x, [pt[1] for pt in pts], "o-", color=f"C{i % 10}", label=f"{name} (overlap)", markersize=3)
        ax.plot(x, [pt[2] for pt in pts], "--", color=f"C{i % 10}", alpha=0.7, label=f"{name} (no overlap)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("speedup vs 1 GPU")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_to_accuracy(runs, target: float, path: Path, title: str = "") -> None:
    """Validation top-1 against training wall-clock: per configuration its seeds' mean curve (the curve the
    time to target is read from; ddp rows dashed) and the seeds' min-max as a band, diverged seeds dotted,
    the target as a black line."""
    import numpy as np

    from .time_to_accuracy import mean_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    configs = list(dict.fromkeys(r.config for r in runs))
    for i, name in enumerate(configs):
        color = f"C{i % 10}"
        mine = [r for r in runs if r.config == name and r.points]
        for r in (r for r in mine if r.diverged):
            ax.plot([p.seconds for p in r.points], [100 * p.top1 for p in r.points], ":", color=color, alpha=0.6)
        healthy = [r for r in mine if not r.diverged]
        if not healthy:
            continue
        grid = np.linspace(min(r.points[0].seconds for r in healthy), min(r.points[-1].seconds for r in healthy), 60)
        ys = np.array(
            [np.interp(grid, [p.seconds for p in r.points], [100 * p.top1 for p in r.points]) for r in healthy]
        )
        ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.12, linewidth=0)
        curve = mean_curve(healthy)
        diverged = len(mine) - len(healthy)
        label = f"{name} ({len(healthy)} seeds" + (f", {diverged} diverged)" if diverged else ")")
        style = "--" if name.startswith("ddp") else "-"  # the baselines dashed
        ax.plot(
            [p.seconds for p in curve],
            [100 * p.top1 for p in curve],
            style,
            color=color,
            label=label,
            linewidth=2.2 if name == "ddp" else 1.4,
        )
    ax.axhline(100 * target, color="black", linestyle="-.", linewidth=1, label=f"target {100 * target:.1f} %")
    ax.set_xlabel("training wall-clock (s, validation excluded); line: mean over seeds, band: min-max")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
