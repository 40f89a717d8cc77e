"""An existing Lightning project that is not ours: a small CNN on synthetic 16x16 images, trained with DDP.

    python train.py                         # strategy="ddp", 2 CPU processes
    python train.py --strategy firecaffe    # the same run with FireCaffe's reduction-tree all-reduce

Nothing here knows about lightning_firecaffe except the import that registers the strategy name.
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def stripes(n: int, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Class c: vertical stripes in colour channel c % 3 at offset c, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    for c in range(classes):
        x[y == c, c % 3, :, c::classes] += 1.0
    return TensorDataset(x, y)


class StripeNet(LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 4),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="ddp", help='"ddp" (the project as it was) or "firecaffe"')
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.strategy.startswith("firecaffe"):
        import lightning_firecaffe  # noqa: F401  (registers strategy="firecaffe" with Lightning)

    seed_everything(0)
    trainer = Trainer(
        strategy=args.strategy,  # <- the one line that changes: "ddp" -> "firecaffe"
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(
        StripeNet(),
        DataLoader(stripes(2048), batch_size=32, shuffle=True),
        DataLoader(stripes(512, seed=1), batch_size=64),
    )
    if trainer.is_global_zero:
        print(
            f"strategy={args.strategy} ({type(trainer.strategy).__name__}): "
            f"val_acc {float(trainer.callback_metrics['val_acc']):.3f} on {trainer.world_size} processes"
        )


if __name__ == "__main__":
    main()
