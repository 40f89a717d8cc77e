"""Tiny Lightning training with ``strategy="firecaffe"``; every rank writes what it saw to ``rank<N>.json``.

Used by tests/test_slurm.py through ``hydra_app.py`` (under ``srun`` from the sbatch example, and under the
submitit launcher). Stand-in for ``firecaffe-train`` until the test switches to the real app.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

import lightning_firecaffe  # noqa: F401  (registers strategy="firecaffe")
from lightning_firecaffe.process_groups import end_process_groups


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 16, generator=g)
        y = x[:, :4].argmax(1)
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


class CommFacts(Callback):
    """Reads, while DDP still wraps the model, which comm hook ran and how many bytes the tree sent."""

    facts: dict = {}

    def on_train_end(self, trainer, pl_module):
        ddp = trainer.strategy.model
        stats = getattr(trainer.strategy, "comm_stats", None)
        self.facts = {
            "comm_hook": ddp._get_ddp_logging_data().get("comm_hook")
            if hasattr(ddp, "_get_ddp_logging_data")
            else None,
            "bytes_sent": stats.totals.bytes_sent if stats is not None else None,
        }


def train(out_dir: str, devices: int, num_nodes: int, max_steps: int, strategy: str = "firecaffe") -> dict:
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    model = Tiny()
    comm = CommFacts()
    trainer = Trainer(
        callbacks=[comm],
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    facts = {
        **comm.facts,
        "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
        "strategy": type(trainer.strategy).__name__,
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "local_rank": trainer.local_rank,
        "node_rank": trainer.node_rank,
        "global_step": trainer.global_step,
        "losses": model.losses,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_procid": os.environ.get("SLURM_PROCID"),
        "slurm_ntasks": os.environ.get("SLURM_NTASKS"),
        "pid": os.getpid(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts, indent=1))
    end_process_groups()
    return facts
