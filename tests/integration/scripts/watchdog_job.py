"""A user's small Lightning project on 2 CPU ranks, with one fault injected (for the watchdog tests).

Run as a script (the ``firecaffe`` launcher re-runs the command line for every rank). Every process writes
its pid to ``OUT/pids/``; the moment the fault starts is written to ``OUT/fault_at``; the exception caught
around ``trainer.fit`` goes to ``OUT/caught-rank<r>.json``; a clean run writes ``OUT/result.json``.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset

import lightning_firecaffe  # noqa: F401
from lightning_firecaffe import FireCaffeStrategy

FAULTS = ("none", "validation", "dataloader", "sigstop", "hook_raises", "dies", "slow")
args = None  # parsed in main(); the module's classes read it in every rank


def mark(name: str, text: str = "") -> None:
    Path(args.out, name).write_text(text or str(time.time()))


def record_pid(role: str) -> None:
    (Path(args.out) / "pids").mkdir(exist_ok=True)
    (Path(args.out) / "pids" / f"{role}-{os.getpid()}").write_text(str(os.getpid()))


class Samples(Dataset):
    """Random regression samples; on the faulty rank, ``__getitem__`` blocks once it has served ``block_after``."""

    def __init__(self, n: int, rank: int, block_after: int = -1):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 16, generator=g), torch.randn(n, 1, generator=g)
        self.rank, self.block_after, self.served = rank, block_after, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.served == 0:
            record_pid(f"loader-rank{self.rank}")
        self.served += 1
        if self.served == self.block_after:
            mark("fault_at")
            time.sleep(300)  # a stuck file system, say (finite: a leftover cannot live forever)
        return self.x[i], self.y[i]


class UserModel(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def faulty(self) -> bool:
        return self.global_rank == args.fault_rank

    def training_step(self, batch, batch_idx):
        if self.global_step == args.at and hasattr(self.trainer.strategy, "auto_choices"):
            choices = {str(k): v for k, v in self.trainer.strategy.auto_choices().items()}
            mark(f"choices-at-fault-rank{self.global_rank}.json", json.dumps(choices))
        if self.faulty() and self.global_step == args.at:
            if args.fault == "sigstop":
                # run while watched first: the others see its heartbeat advance (a rank frozen before its second
                # beat is, truthfully, one "heard once, of unknown age", not one known to have gone silent)
                time.sleep(3 * min(2.0, max(0.2, args.stall_timeout / 10)))  # 3 watchdog intervals
                mark("fault_at")
                os.kill(os.getpid(), signal.SIGSTOP)
            if args.fault == "dies":
                mark("fault_at")
                os._exit(17)
        if args.fault == "slow":
            time.sleep(args.base_s * (3 if self.faulty() else 1))
        if self.global_step == args.mark_step:
            mark(f"at-step-{args.mark_step}-rank{self.global_rank}")
        time.sleep(args.step_sleep)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        if args.fault == "validation" and self.faulty() and batch_idx == 0:
            mark("fault_at")
            threading.Event().wait()  # blocks forever, as a deadlocked user step would
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss, sync_dist=True)  # rank 0 waits here (at the epoch's end) for rank 1
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        block = 4 * 3 + 1 if args.fault == "dataloader" and self.faulty() else -1  # in the 4th batch
        return DataLoader(
            Samples(256, self.global_rank, block),
            batch_size=4,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )

    def val_dataloader(self):
        return DataLoader(Samples(32, self.global_rank), batch_size=4)


class SlowDisk(TorchCheckpointIO):
    """A checkpoint write that takes longer than stall_timeout."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        time.sleep(args.stall_timeout + 5)
        super().save_checkpoint(checkpoint, path, storage_options)


def inject_hook_fault() -> None:
    """The comm hook raises on the faulty rank at step ``--at``, as the executor does for a silent peer."""
    from lightning_firecaffe.comm.executor import ScheduleExecutor
    from lightning_firecaffe.errors import PeerStallError

    original = ScheduleExecutor.all_reduce_

    def all_reduce_(self, buffer, schedule, *, bucket=0, step=0, **options):
        if self.rank == args.fault_rank and step == args.at:
            mark("fault_at")
            raise PeerStallError(
                f"FireCaffe all-reduce on rank {self.rank}: injected fault in gradient bucket "
                f"{bucket} at training step {step}",
                [1 - self.rank],
            )
        return original(self, buffer, schedule, bucket=bucket, step=step, **options)

    ScheduleExecutor.all_reduce_ = all_reduce_


def main() -> int:
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--fault", choices=FAULTS, default="none")
    p.add_argument("--fault-rank", type=int, default=1)
    p.add_argument("--at", type=int, default=3, help="training step (or batch) of the fault")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--stall-timeout", type=float, default=10.0)
    p.add_argument("--stall-grace", type=float, default=None)
    p.add_argument("--algorithm", default="auto")
    p.add_argument("--auto-repetitions", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--base-s", type=float, default=0.1, help="'slow': seconds per step of the fast ranks")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--mark-step", type=int, default=-1, help="write OUT/at-step-<k>-rank<r> at this step")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds added to every step on every rank")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    if args.fault == "hook_raises":
        inject_hook_fault()
    strategy = FireCaffeStrategy(
        algorithm=args.algorithm,
        stall_timeout=args.stall_timeout,
        stall_grace=args.stall_grace,
        auto_repetitions=args.auto_repetitions,
        checkpoint_io=SlowDisk() if args.fault == "slow" else None,
    )
    callbacks = []
    if args.fault == "slow":
        callbacks.append(ModelCheckpoint(dirpath=Path(args.out) / "ckpt", every_n_train_steps=4, save_top_k=-1))
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.max_steps,
        limit_train_batches=4 if args.fault == "validation" else None,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=args.fault == "slow",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    rank = trainer.global_rank
    record_pid(f"rank{rank}")
    try:
        trainer.fit(model := UserModel())
    except Exception as exc:  # what a user's script would catch
        print(f"rank {rank} caught {type(exc).__name__}: {exc}", flush=True)
        mark(
            f"caught-rank{rank}.json",
            json.dumps(
                {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
            ),
        )
        return 1
    if rank == 0:
        torch.save(model.state_dict(), Path(args.out) / "weights.pt")
    beats = next((cb for cb in trainer.callbacks if type(cb).__name__ == "PhaseBeats"), None)
    mark(
        f"result-rank{rank}.json",
        json.dumps(
            {
                "global_step": trainer.global_step,
                "step_seconds": {str(k): v for k, v in (beats.step_seconds if beats else {}).items()},
            }
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
