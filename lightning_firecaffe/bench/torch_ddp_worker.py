"""The best existing equivalent, for ``firecaffe-bench train --compression``: plain torch DDP (outside
Lightning, which ignores comm hooks on CPU) with torch's own ``bf16_compress_hook`` / ``fp16_compress_hook``,
on the same model, synthetic data, batch and steps as :mod:`.train_worker`; rank 0 writes the same result.

Started once per rank with torch.distributed's environment variables (``torchrun`` on loopback, the
emulated cluster's launcher there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..models import build_model
from .train_worker import SyntheticImages, add_workload_arguments


def bf16_hook_on_any_backend(state, bucket):
    """torch's ``bf16_compress_hook``, unchanged; only its name differs, because DDP refuses to register a
    hook *named* ``bf16_compress_hook`` without CUDA and NCCL, although it runs on gloo (gloo all-reduces
    bf16 on the CPU)."""
    return default_hooks.bf16_compress_hook(state, bucket)


HOOKS = {"bf16": bf16_hook_on_any_backend, "fp16": default_hooks.fp16_compress_hook, "none": None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hook", choices=sorted(HOOKS), required=True)
    add_workload_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    model = build_model(args.model, args.classes, image_size=args.image_size)
    ddp = DistributedDataParallel(model)  # 25 MB buckets, as under Lightning
    if HOOKS[args.hook] is not None:  # "none": plain torch DDP, to tell Lightning's own cost apart
        ddp.register_comm_hook(None, HOOKS[args.hook])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
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
    if dist.get_rank() == 0:
        step = statistics.median(times)
        world = dist.get_world_size()
        Path(args.out).write_text(
            json.dumps(
                {
                    "strategy": "torch DDP" + (f"+{args.hook}_compress_hook" if HOOKS[args.hook] else ""),
                    "world_size": world,
                    "step_s": step,
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
