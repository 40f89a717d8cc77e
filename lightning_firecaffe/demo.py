"""``firecaffe-demo``: train a small CNN on 2 CPU processes with ``strategy="firecaffe"`` and show the tree.

No downloads: the data are synthetic 16x16 images whose class is a coloured stripe pattern. It prints the
schedule the tree ran, per-step communication figures and the final accuracy.
"""

from __future__ import annotations

import argparse
import os

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_firecaffe  # noqa: F401  (registers the strategy names)
from lightning_firecaffe.schedules import build_schedule, describe, num_chunks_for


def synthetic_images(n: int, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    for c in range(classes):
        x[y == c, c % 3, :, c :: classes] += 1.0  # class c: stripes in channel c % 3 at offset c
    return TensorDataset(x, y)


class SmallCNN(LightningModule):
    def __init__(self, classes: int = 4, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, classes),
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.net(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=2e-4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--algorithm", default="tree", choices=lightning_firecaffe.ALGORITHM_CHOICES)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="lightning_logs_demo")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seed_everything(0)
    model = SmallCNN()
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=lightning_firecaffe.FireCaffeStrategy(algorithm=args.algorithm),
        max_epochs=args.epochs,
        default_root_dir=args.out,
        log_every_n_steps=5,
        enable_model_summary=False,
    )
    train = DataLoader(synthetic_images(2048), batch_size=32, shuffle=True)
    val = DataLoader(synthetic_images(512, seed=1), batch_size=64)
    trainer.fit(model, train, val)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.algorithm != "auto":
        chunks = num_chunks_for(args.algorithm, nbytes, trainer.world_size, 1 << 20)
        rank_zero_info("The schedule each gradient bucket followed:\n" + describe(build_schedule(args.algorithm, trainer.world_size, chunks)))
    rank_zero_info(f"Final validation accuracy: {trainer.callback_metrics['val_acc']:.3f} (chance 0.25)")
    rank_zero_info(f"Logs and checkpoints: {trainer.log_dir}")


if __name__ == "__main__":
    main()
