"""One rank of a Trainer run with local SGD on emulated nodes (one CPU rank per "node", launched
externally: the test sets NODE_RANK, LOCAL_RANK=0, WORLD_SIZE per process).

Every rank writes its weights and learning rate after every optimizer step (``weights-rank<r>.pt``:
global step -> flat weights; ``lr-rank<r>.json``: global step -> LR) and rank 0 the end-of-fit summary. Gradient accumulation 2 and LargeBatchScaling (warm-up and
decay) are on, to show that the period counts optimizer steps and that the callback composes.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_firecaffe import FireCaffeStrategy
from lightning_firecaffe.callbacks import LargeBatchScaling


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(72, 8, generator=g)  # 3 ranks x 6 batches of 4: 3 optimizer steps per epoch
        return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=4)


class Weights(Callback):
    def __init__(self, out: Path):
        self.out, self.weights, self.lrs = out, {}, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone()
        self.weights[trainer.global_step] = flat
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_end(self, trainer, pl_module):
        torch.save(self.weights, self.out / f"weights-rank{trainer.global_rank}.pt")
        (self.out / f"lr-rank{trainer.global_rank}.json").write_text(json.dumps(self.lrs))
        if trainer.global_rank == 0:
            summary = trainer.strategy.comm_stats.summary(trainer.strategy.algorithm)
            (self.out / "facts.json").write_text(json.dumps({"summary": summary}))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--resume", default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(7)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=3,
        strategy=FireCaffeStrategy(
            algorithm="tree", model_averaging_period=3, averaging_start_step=2, stall_timeout=30
        ),
        max_steps=args.max_steps,
        accumulate_grad_batches=2,
        callbacks=[
            Weights(out),
            LargeBatchScaling(reference_batch=24, warmup=2, unit="step", verbose=False),
            ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=6, save_top_k=-1),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), ckpt_path=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
