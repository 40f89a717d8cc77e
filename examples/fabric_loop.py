"""A plain Lightning Fabric training loop (the shape of Lightning's own ``examples/fabric`` image classifier,
on random data so it runs offline), moved to FireCaffe by the one marked line.

    python examples/fabric_loop.py                 # Fabric's launcher starts the 2 ranks
    fabric run --accelerator cpu --devices 2 examples/fabric_loop.py
"""

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric, seed_everything
from torch.utils.data import DataLoader, TensorDataset

import lightning_firecaffe  # noqa: F401  <- FireCaffe: registers strategy="firecaffe"


def main(epochs: int = 2, accumulate: int = 2) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="firecaffe")  # <- FireCaffe: was strategy="ddp"
    if not fabric._launched:  # (`fabric run` has launched the ranks already)
        fabric.launch()
    seed_everything(42)

    x = torch.randn(2048, 1, 28, 28)
    y = (x.mean(dim=(1, 2, 3)) * 40).long().clamp(-4, 5) + 4  # 10 classes a network can learn
    train_loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, 2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 13 * 13, 10)
    )
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader = fabric.setup_dataloaders(train_loader)

    for epoch in range(epochs):
        model.train()
        for batch_idx, (data, target) in enumerate(train_loader):
            is_accumulating = (batch_idx + 1) % accumulate != 0
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                loss = F.cross_entropy(model(data), target)
                fabric.backward(loss / accumulate)
            if not is_accumulating:
                optimizer.step()
                optimizer.zero_grad()
            if batch_idx % 8 == 0:
                fabric.print(f"epoch {epoch} batch {batch_idx}: loss {loss.item():.3f}")
        fabric.save("fabric_loop.ckpt", {"model": model, "optimizer": optimizer, "epoch": epoch})


if __name__ == "__main__":
    main()
