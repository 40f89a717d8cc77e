"""Plain torch DDP rows of ``firecaffe-bench train`` (outside Lightning, which ignores comm hooks on CPU), on
the same model, synthetic data, batch and steps as :mod:`.train_worker`; rank 0 writes the same result.

Modes: ``none`` (plain DDP, to tell Lightning's own cost apart), ``bf16`` / ``fp16`` (torch's compress
hooks, the best existing equivalent), ``noop`` (torch's ``noop_hook``: no communication at all, the
ceiling of any gradient-sync scheme: the ``limit`` row), ``powersgd`` (torch's ``powerSGD_hook``) and
``localsgd`` (torch's post-local SGD: ``post_localSGD_hook`` + ``PostLocalSGDOptimizer`` with a
``PeriodicModelAverager``; the local subgroup is built explicitly, since torch's default needs CUDA).

Started once per rank with torch.distributed's environment variables (by the train benchmark on loopback
or on the emulated cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks, default_hooks, powerSGD_hook
from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as local_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..models import build_model
from .train_worker import Progress, SyntheticImages, add_workload_arguments


def bf16_hook_on_any_backend(state, bucket):
    """torch's ``bf16_compress_hook``, unchanged; only its name differs, because DDP refuses to register a
    hook *named* ``bf16_compress_hook`` without CUDA and NCCL, although it runs on gloo (gloo all-reduces
    bf16 on the CPU)."""
    return default_hooks.bf16_compress_hook(state, bucket)


HOOKS = {"bf16": bf16_hook_on_any_backend, "fp16": default_hooks.fp16_compress_hook, "noop": debugging_hooks.noop_hook}
MODES = ("none", "bf16", "fp16", "noop", "powersgd", "localsgd")
LABELS = {
    "none": "torch DDP",
    "bf16": "torch DDP+bf16_compress_hook",
    "fp16": "torch DDP+fp16_compress_hook",
    "noop": "torch DDP+noop_hook (no comm)",
}


def _label(args: argparse.Namespace) -> str:
    if args.hook == "powersgd":
        return f"torch DDP+powerSGD_hook r{args.powersgd_rank}"
    if args.hook == "localsgd":
        return f"torch post-local SGD H={args.period}"
    return LABELS[args.hook]


def _setup(args: argparse.Namespace, ddp: DistributedDataParallel, params) -> torch.optim.Optimizer:
    """Registers the mode's hook and returns the optimizer the loop steps."""
    sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if args.hook in HOOKS:
        ddp.register_comm_hook(None, HOOKS[args.hook])
    elif args.hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=args.powersgd_rank,
            start_powerSGD_iter=args.powersgd_start,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif args.hook == "localsgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        # ranks of one host reduce gradients every step, hosts average parameters every `period` steps;
        # torch's default subgroup (one per node by CUDA device count) raises without CUDA
        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        subgroup, _ = dist.new_subgroups(group_size=per_host)
        state = local_hook.PostLocalSGDState(
            process_group=None, subgroup=subgroup, start_localSGD_iter=args.localsgd_start
        )
        ddp.register_comm_hook(state, local_hook.post_localSGD_hook)
        averager = PeriodicModelAverager(period=args.period, warmup_steps=args.localsgd_start)
        return PostLocalSGDOptimizer(optim=sgd, averager=averager)
    return sgd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hook", choices=MODES, required=True)
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--powersgd-start", type=int, default=2, help="torch's minimum with error feedback")
    p.add_argument("--period", type=int, default=8, help="local SGD: average parameters every so many steps")
    p.add_argument("--localsgd-start", type=int, default=2, help="local SGD: steps of full DDP first")
    add_workload_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    progress = Progress(args.progress if dist.get_rank() == 0 else None)
    model = build_model(args.model, args.classes, image_size=args.image_size)
    ddp = DistributedDataParallel(model)  # 25 MB buckets, as under Lightning
    optimizer = _setup(args, ddp, ddp.parameters())
    data = DataLoader(SyntheticImages(10**6, args.image_size, 10), batch_size=args.batch)
    times = []
    for i, (x, y) in enumerate(data):
        if i >= args.warmup + args.steps:
            break
        started = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
        progress.step(i + 1)
    if dist.get_rank() == 0:
        step = statistics.median(times)
        world = dist.get_world_size()
        Path(args.out).write_text(
            json.dumps(
                {
                    "strategy": _label(args),
                    "world_size": world,
                    "step_s": step,
                    "step_mean_s": statistics.mean(times),
                    "steps_per_s": 1 / step,
                    "images_per_s": world * args.batch / step,
                    "exposed_share": None,
                    "gradient_bytes": sum(q.numel() * q.element_size() for q in model.parameters()),
                    "algorithms": {},
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
