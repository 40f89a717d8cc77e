"""What the stall watchdog costs: training steps/s with and without it, 2 CPU ranks on loopback.

    python benchmarks/watchdog_overhead.py [--steps 400] [--repeats 3]

Runs the same small training (``strategy=FireCaffeStrategy(watchdog=True|False)``) alternately, each in
fresh processes, and prints steps/s of the steady state (after ``--skip`` steps) per run, the medians
and their ratio; then the cost of one phase beat measured in-process. A small model makes the relative
cost as large as it gets: the watchdog's per-step work does not grow with the model.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path


def worker(args) -> int:
    import torch
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_firecaffe import FireCaffeStrategy

    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader(
                TensorDataset(torch.randn(4096, 64, generator=g), torch.randint(0, 10, (4096,), generator=g)),
                batch_size=16,
            )

    class Clock(Callback):
        watchdog_cpu_per_s = None

        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step == args.skip:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

        def on_train_end(self, trainer, *a):
            dog = getattr(trainer.strategy, "watchdog", None)  # CPU seconds its thread used per second of training
            if dog is not None:
                self.watchdog_cpu_per_s = dog.cpu_s / (time.monotonic() - dog.observer.started_at)

    seed_everything(0)
    clock = Clock()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        strategy=FireCaffeStrategy(algorithm=args.algorithm, watchdog=args.watchdog == "on"),
    )
    trainer.fit(Net())
    if trainer.global_rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "steps_per_s": (args.steps - args.skip) / (clock.end - clock.start),
                    "watchdog_cpu_per_s": clock.watchdog_cpu_per_s,
                }
            )
        )
    return 0


def hooks_cost_us() -> float:
    """The phase-beat callback's work in one training step (its hooks, as Lightning calls them), in us."""
    from types import SimpleNamespace

    from lightning_firecaffe.callbacks.phase_beats import PhaseBeats
    from lightning_firecaffe.watchdog.progress import bucket_beat

    cb = PhaseBeats()
    trainer = SimpleNamespace(global_step=7, current_epoch=0, log_every_n_steps=50)
    module = SimpleNamespace(log=lambda *a, **k: None)

    def one_step():
        cb.on_train_batch_start(trainer, module, None, 3)
        cb.on_before_backward(trainer, module, None)
        bucket_beat(0)  # the comm hook, once per gradient bucket
        cb.on_before_optimizer_step(trainer, module, None)
        cb.on_train_batch_end(trainer, module, None, None, 3)

    n = 20_000
    return min(timeit.repeat(one_step, number=n, repeat=5)) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--skip", type=int, default=50, help="warm-up steps not timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--algorithm", default="tree")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--watchdog", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    results: dict[str, list[float]] = {"off": [], "on": []}
    cpu_per_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for mode in ("off", "on"):  # alternate, so drifting machine load hits both alike
                out = Path(tmp) / f"{mode}-{rep}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--watchdog",
                    mode,
                    "--out",
                    str(out),
                    "--steps",
                    str(args.steps),
                    "--skip",
                    str(args.skip),
                    "--algorithm",
                    args.algorithm,
                ]
                subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
                run = json.loads(out.read_text())
                results[mode].append(run["steps_per_s"])
                if run.get("watchdog_cpu_per_s") is not None:
                    cpu_per_s.append(run["watchdog_cpu_per_s"])
                print(f"run {rep + 1}/{args.repeats} watchdog {mode:>3}: {results[mode][-1]:7.1f} steps/s", flush=True)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    cpu = statistics.median(cpu_per_s)
    print(
        f"\n2 ranks, loopback, algorithm={args.algorithm}, {args.steps - args.skip} timed steps per run, "
        f"median of {args.repeats} runs:"
    )
    print(f"  watchdog off: {off:7.1f} steps/s ({1e3 / off:.2f} ms/step)")
    print(f"  watchdog on:  {on:7.1f} steps/s ({1e3 / on:.2f} ms/step)   ratio on/off {on / off:.3f}")
    hooks = hooks_cost_us()
    print(
        f"  measured in-process, independent of machine load: phase beats {hooks:.1f} us per step "
        f"({hooks * 1e-3 * off / 10:.3f} % of a watchdog-off step); watchdog thread {cpu * 1e3:.2f} ms CPU per "
        f"second of training ({cpu * 100:.3f} % of one core)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
