"""``firecaffe-bench plan``: predict per-iteration communication, speedup and efficiency on a cluster.

Pure arithmetic on the cost model (the same ``predict`` the simulator, ``auto`` and the comm benchmark
use). An iteration on G GPUs with b images per GPU costs forward + backward compute, b * t_image, plus
all-reducing the gradients in DDP-sized buckets. With overlap, communication hides behind backward
(2/3 of compute) and only the excess is paid. Speedup compares images/s with one GPU at the same b.

Given the model's parameter shapes, two communication-reducing options join as curves, each message
priced with the fastest algorithm for its size (:mod:`..comm.savings`): low-rank gradients (PowerSGD's P
and Q per DDP bucket, plus the compression's arithmetic on the GPU, :data:`..comm.savings.GPU`; both
overlap backward like the all-reduce) and local SGD (a parameter average every H steps, amortised, which
nothing overlaps).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..comm.cost_model import LinkModel, predict
from ..comm.low_rank_sizes import Shape, bucket_bytes, message_sizes
from ..comm.savings import GPU, ComputeModel, local_sgd_s, low_rank_compute_s, low_rank_sync_s
from ..comm.schedules import algorithm_names

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb
BACKWARD_SHARE = 2 / 3  # backward costs about twice the forward pass


@dataclass(frozen=True)
class Workload:
    name: str
    gradient_bytes: int
    seconds_per_image: float  # forward + backward on one GPU


@dataclass(frozen=True)
class Prediction:
    algorithm: str
    gpus: int
    batch_per_gpu: int
    comm_s: float
    compute_s: float
    iteration_s: float
    iteration_no_overlap_s: float

    @property
    def speedup(self) -> float:
        return self.gpus * self.compute_s / self.iteration_s if self.iteration_s > 0 else float(self.gpus)

    @property
    def speedup_no_overlap(self) -> float:
        return self.gpus * self.compute_s / self.iteration_no_overlap_s

    @property
    def efficiency(self) -> float:
        return self.speedup / self.gpus


def comm_time(algorithm: str, gradient_bytes: int, gpus: int, link: LinkModel, **kw) -> float:
    """All-reduce of the whole gradient, bucket by bucket (identical buckets are priced once)."""
    full, rest = divmod(gradient_bytes, BUCKET_BYTES)
    total = full * predict(algorithm, BUCKET_BYTES, gpus, link, **kw) if full else 0.0
    return total + (predict(algorithm, rest, gpus, link, **kw) if rest else 0.0)


def plan_point(workload: Workload, algorithm: str, gpus: int, batch_per_gpu: int, link: LinkModel, **kw) -> Prediction:
    comm = comm_time(algorithm, workload.gradient_bytes, gpus, link, **kw) if gpus > 1 else 0.0
    return _point(algorithm, workload, gpus, batch_per_gpu, comm, overlappable=True)


def _point(name: str, workload: Workload, gpus: int, batch: int, comm: float, overlappable: bool) -> Prediction:
    """A step of ``batch`` images per GPU and ``comm`` seconds of communication, which may hide behind
    backward (``overlappable``) or not (an average after the optimizer step)."""
    compute = batch * workload.seconds_per_image
    comm = comm if gpus > 1 else 0.0
    backward = BACKWARD_SHARE * compute
    overlapped = (compute - backward) + max(backward, comm) if overlappable else compute + comm
    return Prediction(name, gpus, batch, comm, compute, overlapped, compute + comm)


@dataclass(frozen=True)
class Reducer:
    """A communication-reducing option priced from the model's parameter shapes."""

    kind: str  # "powersgd" or "localsgd"
    rank: int = 4
    min_rate: float = 2.0
    period: int = 8
    compute: ComputeModel = GPU

    @property
    def name(self) -> str:
        return f"powersgd r{self.rank}" if self.kind == "powersgd" else f"local SGD H={self.period}"

    def point(self, workload: Workload, shapes: list[Shape], gpus: int, batch: int, link: LinkModel) -> Prediction:
        if self.kind == "powersgd":
            messages = message_sizes(shapes, self.rank, self.min_rate)
            comm = low_rank_sync_s(messages, gpus, link) + low_rank_compute_s(
                shapes, self.rank, self.min_rate, self.compute
            )
            return _point(self.name, workload, gpus, batch, comm, overlappable=True)
        return _point(
            self.name, workload, gpus, batch, local_sgd_s(bucket_bytes(shapes), gpus, link, self.period), False
        )


REDUCERS = (Reducer("powersgd", rank=4), Reducer("localsgd", period=8))


def plan_table(
    workload: Workload,
    gpus: int,
    link: LinkModel,
    batches: Iterable[int],
    algorithms: Iterable[str] | None = None,
    shapes: list[Shape] | None = None,
    reducers: Iterable[Reducer] = REDUCERS,
    **kw,
) -> list[Prediction]:
    """One row per (algorithm, per-GPU batch); every registered algorithm unless ``algorithms`` is given;
    with ``shapes``, one per (reducer, batch) too."""
    batches = list(batches)
    rows = [plan_point(workload, a, gpus, b, link, **kw) for a in (algorithms or algorithm_names()) for b in batches]
    return rows + [r.point(workload, shapes, gpus, b, link) for r in (reducers if shapes else ()) for b in batches]


def speedup_curves(
    workload: Workload,
    batch_per_gpu: int,
    link: LinkModel,
    max_gpus: int = 1024,
    algorithms: Iterable[str] | None = None,
    shapes: list[Shape] | None = None,
    reducers: Iterable[Reducer] = REDUCERS,
    **kw,
) -> dict[str, list[tuple[int, float, float]]]:
    """Per algorithm (and with ``shapes`` per reducer): (GPUs, speedup with overlap, speedup without) for 1, 2,
    4, ... max_gpus."""
    gpu_counts = [2**i for i in range(int(math.log2(max_gpus)) + 1)]
    curves = {}
    for a in algorithms or algorithm_names():
        points = [plan_point(workload, a, g, batch_per_gpu, link, **kw) for g in gpu_counts]
        curves[a] = [(p.gpus, p.speedup, p.speedup_no_overlap) for p in points]
    for r in reducers if shapes else ():
        points = [r.point(workload, shapes, g, batch_per_gpu, link) for g in gpu_counts]
        curves[r.name] = [(p.gpus, p.speedup, p.speedup_no_overlap) for p in points]
    return curves


def format_plan(rows: list[Prediction], workload: Workload, link: LinkModel) -> str:
    head = (
        f"{workload.name}: {workload.gradient_bytes / 1e6:.1f} MB of gradients, "
        f"{1e3 * workload.seconds_per_image:.2f} ms/image/GPU; links {link.bandwidth_Bps * 8 / 1e9:g} Gbit/s, "
        f"{link.latency_s * 1e6:g} us, {link.ranks_per_node} GPU(s)/node\n"
        f"{'algorithm':<17} {'GPUs':>5} {'b/GPU':>6} {'global':>7} {'comm ms':>9} {'iter ms':>9} "
        f"{'speedup':>8} {'eff':>6} {'no-overlap speedup':>19}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.algorithm:<17} {r.gpus:>5} {r.batch_per_gpu:>6} {r.gpus * r.batch_per_gpu:>7} {1e3 * r.comm_s:>9.1f} "
            f"{1e3 * r.iteration_s:>9.1f} {r.speedup:>8.1f} {r.efficiency:>6.2f} {r.speedup_no_overlap:>19.1f}"
        )
    return "\n".join(lines)


def build_workload_model(spec: str, num_classes: int = 1000):
    """A registered model name (``googlenet``, ``nin``, ...) or ``package.module:Class`` (built with no
    arguments)."""
    import importlib

    from ..models import build_model, model_names

    if ":" in spec:
        mod, _, cls = spec.partition(":")
        return getattr(importlib.import_module(mod), cls)()
    if spec in model_names():
        return build_model(spec, num_classes)
    raise ValueError(
        f"unknown model {spec!r}: use one of {', '.join(model_names())}, package.module:Class or a parameter count"
    )


def gradient_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def measure_seconds_per_image(module, image_size: int = 224, batch: int = 8, reps: int = 3) -> float:
    """Forward + backward time per image of ``module`` on this machine (the planner's compute term when
    no figure for the target GPU is given)."""
    import time

    import torch

    x = torch.randn(batch, 3, image_size, image_size)
    times = []
    for _ in range(reps + 1):  # the first pass warms up allocators
        started = time.perf_counter()
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        times.append(time.perf_counter() - started)
    return min(times[1:]) / batch
