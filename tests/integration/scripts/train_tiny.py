"""Train a tiny classifier on 2 CPU ranks with a given strategy; rank 0 writes weights and comm facts.

Run as a script (the ``ddp``/``firecaffe`` launchers re-run the command line for every rank).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_firecaffe  # noqa: F401  (registers strategy="firecaffe")
from lightning_firecaffe import FireCaffeStrategy
from lightning_firecaffe.process_groups import end_process_groups


class Tiny(LightningModule):
    def __init__(self, unused: bool = False, die_at: int = -1, die_rank: int = 1, blowup_at: int = -1):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        self.spare = torch.nn.Linear(16, 4) if unused else None  # never used in the loss
        self.die_at, self.die_rank, self.blowup_at = die_at, die_rank, blowup_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.die_at and self.global_rank == self.die_rank:
            os._exit(17)  # a rank that dies without a word
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        if self.global_step == self.blowup_at:
            loss = loss * 1e9  # gradients far beyond fp16's range (65504)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 16, generator=g)
        y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


class Facts(Callback):
    """Records, on rank 0, which comm hook DDP ran and how many bytes the tree sent."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        strategy = trainer.strategy
        if hasattr(strategy, "auto_choices"):  # every rank: what auto chose, and whether it measured here
            tuner = strategy._hook_state.selector.tuner
            (self.out / f"auto-rank{trainer.global_rank}.json").write_text(
                json.dumps(
                    {
                        "choices": {str(k): v for k, v in strategy.auto_choices().items()},
                        "trials_run": sum(t.next_trial for t in tuner.sizes.values()) if tuner else 0,
                        "summary": strategy.comm_stats.summary(strategy.algorithm),
                    }
                )
            )
        if trainer.global_rank != 0:
            return
        ddp = trainer.strategy.model
        stats = getattr(trainer.strategy, "comm_stats", None)
        facts = {
            "comm_hook": ddp._get_ddp_logging_data().get("comm_hook"),
            "bytes_sent": stats.totals.bytes_sent if stats else 0,
            "steps": stats.totals.steps if stats else 0,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "bytes_saved": stats.totals.bytes_saved if stats else 0,
            "skipped_steps": stats.skipped_steps if stats else [],
            "summary": stats.summary(trainer.strategy.algorithm) if stats else "",
        }
        (self.out / "facts.json").write_text(json.dumps(facts))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="firecaffe")
    p.add_argument("--object", action="store_true", help="pass FireCaffeStrategy(...) instead of a name")
    p.add_argument("--algorithm", default="tree")
    p.add_argument("--link", default=None, help="'measure' to time the links at start-up")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--unused", action="store_true")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--resume", default=None)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="tiny values give many buckets")
    p.add_argument("--die-at", type=int, default=-1)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--stall-timeout", type=float, default=30.0)
    p.add_argument("--compression", default=None)
    p.add_argument("--error-feedback", action="store_true")
    p.add_argument("--powersgd-start", type=int, default=None, help="compression='powersgd' from this step, rank 2")
    p.add_argument("--blowup-at", type=int, default=-1, help="multiply the loss by 1e9 at this step")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(1234, workers=True)

    strategy = args.strategy
    ddp_kwargs = {}
    if args.bucket_cap_mb is not None:
        ddp_kwargs = {"bucket_cap_mb": args.bucket_cap_mb, "gradient_as_bucket_view": True}
    if args.object:
        strategy = FireCaffeStrategy(
            algorithm=args.algorithm,
            stall_timeout=args.stall_timeout,
            find_unused_parameters=args.unused,
            link=None if args.link in (None, "none") else args.link,
            compression_error_feedback=args.error_feedback,
            **(
                {"compression": args.compression}
                if args.powersgd_start is None
                else {"compression": "powersgd", "powersgd_rank": 2, "powersgd_start_step": args.powersgd_start}
            ),
            **ddp_kwargs,
        )
    elif args.strategy == "ddp" and ddp_kwargs:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(**ddp_kwargs)
    elif args.unused:
        strategy = f"{args.strategy}_find_unused_parameters_true" if args.strategy == "ddp" else strategy
    callbacks = [Facts(out)]
    if args.save_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.save_every, save_top_k=-1))
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        precision=args.precision,
        logger=CSVLogger(out, name="logs"),
        callbacks=callbacks,
        enable_checkpointing=bool(args.save_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model = Tiny(unused=args.unused, die_at=args.die_at, blowup_at=args.blowup_at)
    if trainer.global_rank == 0 and not args.resume:
        torch.save(model.state_dict(), out / "initial.pt")
    trainer.fit(model, ckpt_path=args.resume)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), out / "weights.pt")
    end_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
