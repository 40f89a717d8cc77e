"""``firecaffe-bench comm``: time every all-reduce algorithm and torch's ``dist.all_reduce``.

Each rank runs the same loop: for every size and algorithm, a warm-up, then timed repetitions that start
after a barrier; a repetition's time is the slowest rank's. Figures follow nccl-tests: algorithm
bandwidth = bytes / time, bus bandwidth = algbw * 2 (p-1) / p. Each measurement sits beside the cost
model's prediction for a link calibrated by ping-pong between ranks 0 and 1 (or given explicitly).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..comm.calibration import measure_link
from ..comm.hook import ScheduleSelector
from ..comm.cost_model import LinkModel, predict
from ..comm.executor import ScheduleExecutor
from ..comm.schedules import algorithm_names
from ..comm.tuner import AutoTuner
from ..units import human_bytes

TORCH = "dist.all_reduce"


@dataclass
class CommSpec:
    sizes: list[int]
    algorithms: list[str] = field(default_factory=lambda: ["auto", *algorithm_names(), TORCH])
    reps: int = 5
    warmup: int = 1
    arity: int = 2
    chunk_bytes: int = 1 << 20
    ranks_per_node: int = 1
    calibrate: bool = True


def measure(rank: int, world_size: int, spec: CommSpec, link: LinkModel | None = None) -> dict[str, Any]:
    """Run on every rank (process group already initialised); rank 0's return value is the report."""
    if link is None:
        link = measure_link(rank, world_size, spec.ranks_per_node) if spec.calibrate and world_size > 1 else LinkModel()
    groups = dist.new_group(), dist.new_group()  # like the strategy: p2p traffic on its own groups
    executor = ScheduleExecutor(rank, world_size, group=groups[0], group_reverse=groups[1], stall_timeout=120)
    default_link = LinkModel(ranks_per_node=spec.ranks_per_node)  # what strategy="firecaffe" assumes
    records = []
    for nbytes in spec.sizes:
        numel = max(1, nbytes // 4)
        original = torch.arange(numel, dtype=torch.float32) % 97
        buf = torch.empty_like(original)
        for algorithm in spec.algorithms:
            selector = None
            if algorithm == "auto":  # what strategy="firecaffe" does: measure the candidates, keep the fastest
                choice = _tune(executor, buf, original, world_size, spec, default_link)
                selector = ScheduleSelector(choice, world_size, spec.arity, spec.chunk_bytes, default_link)
            elif algorithm != TORCH:
                selector = ScheduleSelector(algorithm, world_size, spec.arity, spec.chunk_bytes, default_link)
            times = []
            for rep in range(spec.warmup + spec.reps):
                buf.copy_(original)
                dist.barrier()
                t0 = time.perf_counter()
                if selector is None:
                    dist.all_reduce(buf)
                else:
                    executor.all_reduce_(buf, selector.schedule_for(numel * 4), bucket=rep, step=rep)
                elapsed = time.perf_counter() - t0
                if rep >= spec.warmup:
                    times.append(elapsed)
            if not torch.equal(buf, original * world_size):
                raise RuntimeError(f"{algorithm} gave a wrong sum at {nbytes} bytes on rank {rank}")
            slowest = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            chosen = selector.algorithm_for(numel * 4) if selector else "native"
            records.append(_record(algorithm, chosen, world_size, numel * 4, slowest.tolist(), link, spec, executor))
    return {"world_size": world_size, "link": asdict(link), "results": records}


def _tune(executor, buf, original, world_size: int, spec: CommSpec, link: LinkModel) -> str:
    """Run the strategy's tuner on one buffer size until it has chosen (every rank chooses alike)."""
    nbytes = buf.numel() * 4
    model = ScheduleSelector("auto", world_size, spec.arity, spec.chunk_bytes, link)
    tuner = AutoTuner(world_size, link, model.model_choice, spec.arity, spec.chunk_bytes)

    def slowest(times: list[float]) -> list[float]:
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    trial = 0
    while tuner.choices().get(nbytes) is None:
        name = tuner.algorithm_for(nbytes)
        buf.copy_(original)
        dist.barrier()
        t0 = time.perf_counter()
        executor.all_reduce_(buf, model.schedule_for(nbytes, name), bucket=trial, step=trial)
        tuner.record(nbytes, name, time.perf_counter() - t0)
        tuner.exchange(slowest)
        trial += 1
    return tuner.choices()[nbytes]


def _record(algorithm, modelled_as, world_size, nbytes, times, link, spec, executor) -> dict[str, Any]:
    median = statistics.median(times)
    algbw = nbytes / median / 1e9
    predicted = predict(modelled_as, nbytes, world_size, link, arity=spec.arity, chunk_bytes=spec.chunk_bytes)
    return {
        "algorithm": algorithm,
        "modelled_as": modelled_as,
        "world_size": world_size,
        "bytes": nbytes,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "algbw_GBps": algbw,
        "busbw_GBps": algbw * 2 * (world_size - 1) / world_size,
        "predicted_s": predicted,
        "measured_over_predicted": median / predicted if predicted > 0 else None,
        "peak_extra_bytes": executor.scratch_bytes,
    }


def format_table(reports: list[dict[str, Any]]) -> str:
    lines = [
        f"{'p':>3} {'size':>8} {'algorithm':<18} {'median ms':>10} {'min ms':>8} {'max ms':>8} "
        f"{'algbw GB/s':>10} {'busbw GB/s':>10} {'model ms':>9} {'meas/model':>10} {'vs torch':>8}"
    ]
    for report in reports:
        torch_times = {r["bytes"]: r["median_s"] for r in report["results"] if r["algorithm"] == TORCH}
        for r in report["results"]:
            ratio = r["measured_over_predicted"]
            vs = r["median_s"] / torch_times[r["bytes"]] if r["bytes"] in torch_times else float("nan")
            name = r["algorithm"] if r["algorithm"] != "auto" else f"auto->{r['modelled_as']}"
            lines.append(
                f"{r['world_size']:>3} {human_bytes(r['bytes']):>8} {name:<18} {1e3 * r['median_s']:>10.2f} "
                f"{1e3 * r['min_s']:>8.2f} {1e3 * r['max_s']:>8.2f} {r['algbw_GBps']:>10.3f} {r['busbw_GBps']:>10.3f} "
                f"{1e3 * r['predicted_s']:>9.2f} {ratio if ratio is not None else float('nan'):>10.2f} {vs:>8.2f}"
            )
    return "\n".join(lines)


def save(reports: list[dict[str, Any]], json_path: Path, png_path: Path | None, meta: dict[str, Any]) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "reports": reports}, indent=2))
    if png_path is not None:
        from .plots import plot_comm

        plot_comm(reports, png_path, title=meta.get("where", ""))
