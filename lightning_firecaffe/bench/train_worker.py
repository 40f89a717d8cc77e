"""One training run for ``firecaffe-bench train``: synthetic images, fixed steps, rank 0 writes timings.

Runs as a script (``python -m lightning_firecaffe.bench.train_worker``) so Lightning's launcher can start
the other local ranks, or once per rank with LOCAL_RANK/NODE_RANK/WORLD_SIZE set by an outside launcher
(the emulated cluster, SLURM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_firecaffe  # noqa: F401
from lightning_firecaffe import FireCaffeStrategy
from lightning_firecaffe.models import build_model
from lightning_firecaffe.process_groups import end_process_groups


class SyntheticImages(Dataset):
    """Random images generated once: the benchmark measures compute + communication, not decoding."""

    def __init__(self, n: int, size: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(min(n, 256), 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (min(n, 256),), generator=g)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.x[i % len(self.x)], self.y[i % len(self.y)]


class Bench(LightningModule):
    def __init__(self, model: str, classes: int, size: int):
        super().__init__()
        self.net = build_model(model, classes, image_size=size)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Progress:
    """Rank 0 writes the number of completed steps to a file after each step, so that the benchmark can
    tell a slow row from a hung one ("no step in N s") without touching the ranks. ``path=None``: silent."""

    def __init__(self, path: str | None):
        self.path = path

    def step(self, done: int) -> None:
        if self.path:
            tmp = f"{self.path}.tmp"
            Path(tmp).write_text(str(done))
            os.replace(tmp, self.path)


class StepTimer(Callback):
    def __init__(self, warmup: int, progress: Progress | None = None):
        self.warmup, self.times, self._t0 = warmup, [], 0.0
        self.progress = progress or Progress(None)

    def on_train_batch_start(self, trainer, *args):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t0)
        if trainer.global_rank == 0:
            self.progress.step(trainer.global_step)


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """What every training benchmark worker runs: the same model, images, batch and steps."""
    p.add_argument("--model", default="nin")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="per rank")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--progress", default=None, help="rank 0 writes the completed steps here after each step")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="firecaffe", help="ddp, or firecaffe")
    p.add_argument("--algorithm", default="auto")
    p.add_argument("--compression", default=None, help="bf16 or fp16 on the wire (firecaffe)")
    p.add_argument("--strategy-kwargs", default="{}", help="JSON: more FireCaffeStrategy options (a bench row's)")
    p.add_argument("--label", default=None, help="the row's name in the result")
    add_workload_arguments(p)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seed_everything(0)
    extra = json.loads(args.strategy_kwargs)
    strategy = (
        "ddp"
        if args.strategy == "ddp"
        else FireCaffeStrategy(**{"algorithm": args.algorithm, "compression": args.compression, **extra})
    )
    timer = StepTimer(args.warmup, Progress(args.progress))
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.steps + args.warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    model = Bench(args.model, args.classes, args.image_size)
    data = DataLoader(SyntheticImages(10**6, args.image_size, 10), batch_size=args.batch)
    trainer.fit(model, data)
    if trainer.global_rank == 0:
        stats = getattr(trainer.strategy, "comm_stats", None)
        exposed = [s.exposed_s for s in list(stats.history)[args.warmup :]] if stats else []
        step = statistics.median(timer.times)
        label = (
            args.strategy
            if args.strategy == "ddp"
            else f"firecaffe:{args.algorithm}" + (f"+{args.compression}" if args.compression else "")
        )
        result = {
            "strategy": args.label or label,
            "world_size": trainer.world_size,
            "step_s": step,
            "step_mean_s": statistics.mean(timer.times),
            "steps_per_s": 1 / step,
            "images_per_s": trainer.world_size * args.batch / step,
            "exposed_share": (statistics.mean(exposed) / step) if exposed else None,
            "gradient_bytes": sum(q.numel() * q.element_size() for q in model.parameters()),
            "algorithms": dict(stats.algorithms) if stats else {},
        }
        Path(args.out).write_text(json.dumps(result))
    end_process_groups()


if __name__ == "__main__":
    main()
