"""``firecaffe-bench comm``: time every all-reduce algorithm and torch's ``dist.all_reduce``.

Each rank runs the same loop: for every size and algorithm, a warm-up, then timed repetitions that start
after a barrier; a repetition's time is the slowest rank's. Figures follow nccl-tests: algorithm
bandwidth = bytes / time, bus bandwidth = algbw * 2 (p-1) / p. Each measurement sits beside the cost
model's prediction for a link calibrated by ping-pong between ranks 0 and 1 (or given explicitly).

With ``compression`` every algorithm (``auto`` and ``native`` included) sends 16-bit values, the
``dist.all_reduce`` row stays fp32 (the baseline), and a row for torch's own compress hook on plain torch
DDP (``torch DDP+bf16_compress_hook``: a one-parameter module whose backward is a fill, so the time is the
hook's conversions and its all-reduce) runs beside them. Sizes are the gradients' (fp32) bytes.
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
from ..comm.compression import rounding_bound, wire_format
from ..comm.cost_model import LinkModel, predict
from ..comm.executor import ScheduleExecutor
from ..comm.hook import ScheduleSelector
from ..comm.schedules import algorithm_names
from ..comm.tuner import AutoTuner
from ..units import human_bytes

TORCH = "dist.all_reduce"
TORCH_HOOK = "torch DDP+{}_compress_hook"


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
    compression: str | None = None  # "bf16" / "fp16": every algorithm sends 16-bit values


def measure(rank: int, world_size: int, spec: CommSpec, link: LinkModel | None = None) -> dict[str, Any]:
    """Run on every rank (process group already initialised); rank 0's return value is the report."""
    if link is None:
        link = measure_link(rank, world_size, spec.ranks_per_node) if spec.calibrate and world_size > 1 else LinkModel()
    groups = dist.new_group(), dist.new_group()  # like the strategy: p2p traffic on its own groups
    executor = ScheduleExecutor(rank, world_size, group=groups[0], group_reverse=groups[1], stall_timeout=120)
    default_link = LinkModel(ranks_per_node=spec.ranks_per_node)  # what strategy="firecaffe" assumes
    fmt = wire_format(spec.compression)
    wire = fmt.dtype if fmt else None
    records = []
    for nbytes in spec.sizes:
        numel = max(1, nbytes // 4)
        wire_bytes = numel * (fmt.itemsize if fmt else 4)  # what algorithm choices and schedules are keyed by
        original = torch.arange(numel, dtype=torch.float32) % 97
        buf = torch.empty_like(original)
        algorithms = list(spec.algorithms) + ([TORCH_HOOK.format(fmt.name)] if fmt else [])
        for algorithm in algorithms:
            if algorithm.startswith("torch DDP"):
                times = _ddp_hook_times(numel, fmt.name, spec)
                records.append(_record(algorithm, "native", world_size, numel * 4, times, link, spec, executor))
                continue
            selector = None
            if algorithm == "auto":  # what strategy="firecaffe" does: measure the candidates, keep the fastest
                choice = _tune(executor, buf, original, world_size, spec, default_link, wire)
                selector = ScheduleSelector(choice, world_size, spec.arity, spec.chunk_bytes, default_link)
            elif algorithm != TORCH:
                selector = ScheduleSelector(algorithm, world_size, spec.arity, spec.chunk_bytes, default_link)
            chosen = selector.decide(wire_bytes).algorithm if selector else "native"
            times = []
            for rep in range(spec.warmup + spec.reps):
                buf.copy_(original)
                dist.barrier()
                t0 = time.perf_counter()
                if selector is None:
                    dist.all_reduce(buf)
                else:
                    executor.all_reduce_(
                        buf, selector.schedule_for(wire_bytes, chosen), bucket=rep, step=rep, wire=wire
                    )
                elapsed = time.perf_counter() - t0
                if rep >= spec.warmup:
                    times.append(elapsed)
            _check_sum(buf, original, world_size, fmt if selector is not None else None, f"{algorithm} on rank {rank}")
            slowest = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            records.append(_record(algorithm, chosen, world_size, numel * 4, slowest.tolist(), link, spec, executor))
    return {"world_size": world_size, "link": asdict(link), "compression": spec.compression, "results": records}


def _check_sum(buf, original, world_size: int, fmt, what: str) -> None:
    """Exact in full precision; within the rounding bound (``2p - 1`` roundings covers every algorithm)
    on a 16-bit wire."""
    expected = original * world_size
    if fmt is None:
        ok = torch.equal(buf, expected)
    else:
        bound = rounding_bound(fmt, 2 * world_size - 1, expected.double().abs(), additions=world_size)
        ok = bool(((buf.double() - expected.double()).abs() <= bound).all())
    if not ok:
        raise RuntimeError(f"{what} gave a wrong sum at {buf.numel() * 4} bytes")


class _FlatParameter(torch.nn.Module):
    """One parameter of ``numel`` elements whose gradient is a fill: DDP's backward is then its hook."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(numel))

    def forward(self) -> torch.Tensor:
        return self.weight.sum()


def _ddp_hook_times(numel: int, fmt_name: str, spec: CommSpec) -> list[float]:
    """torch's own compress hook on plain torch DDP (one bucket): the slowest rank's backward, per rep."""
    from torch.nn.parallel import DistributedDataParallel

    from .torch_ddp_worker import HOOKS

    ddp = DistributedDataParallel(_FlatParameter(numel), bucket_cap_mb=numel * 4 / 2**20 + 1)
    ddp.register_comm_hook(None, HOOKS[fmt_name])
    times = []
    for rep in range(spec.warmup + spec.reps + 1):  # +1: DDP rebuilds its buckets after the first backward
        loss = ddp()
        dist.barrier()
        t0 = time.perf_counter()
        loss.backward()
        elapsed = time.perf_counter() - t0
        if rep > spec.warmup:
            times.append(elapsed)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def _tune(executor, buf, original, world_size: int, spec: CommSpec, link: LinkModel, wire=None) -> str:
    """Run the strategy's tuner on one buffer size until it has chosen (every rank chooses alike)."""
    nbytes = buf.numel() * (4 if wire is None else 2)
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
        executor.all_reduce_(buf, model.schedule_for(nbytes, name), bucket=trial, step=trial, wire=wire)
        tuner.record(nbytes, name, time.perf_counter() - t0)
        tuner.exchange(slowest)
        trial += 1
    return tuner.choices()[nbytes]


def _record(algorithm, modelled_as, world_size, nbytes, times, link, spec, executor) -> dict[str, Any]:
    median = statistics.median(times)
    algbw = nbytes / median / 1e9  # of the gradients' bytes, so 16-bit rows show the speed a user gets
    on_wire = nbytes // 2 if spec.compression and algorithm != TORCH else nbytes
    predicted = predict(modelled_as, on_wire, world_size, link, arity=spec.arity, chunk_bytes=spec.chunk_bytes)
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
        f"{'p':>3} {'size':>8} {'algorithm':<28} {'median ms':>10} {'min ms':>8} {'max ms':>8} "
        f"{'algbw GB/s':>10} {'busbw GB/s':>10} {'model ms':>9} {'meas/model':>10} {'vs torch':>8}"
    ]
    for report in reports:
        torch_times = {r["bytes"]: r["median_s"] for r in report["results"] if r["algorithm"] == TORCH}
        for r in report["results"]:
            ratio = r["measured_over_predicted"]
            vs = r["median_s"] / torch_times[r["bytes"]] if r["bytes"] in torch_times else float("nan")
            name = r["algorithm"] if r["algorithm"] != "auto" else f"auto->{r['modelled_as']}"
            lines.append(
                f"{r['world_size']:>3} {human_bytes(r['bytes']):>8} {name:<28} {1e3 * r['median_s']:>10.2f} "
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
