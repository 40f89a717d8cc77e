"""Large-batch experiment (issue 4, acceptance 6): does linear scaling + warm-up keep small-batch accuracy?

On scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), a small CNN is trained
for the same number of epochs three ways:

* ``small``: the reference batch with its tuned LR (rule ``none``, poly decay);
* ``linear+warmup``: a batch ``--factor`` x larger, LR scaled linearly with gradual warm-up (Goyal et al.);
* ``none``: the same large batch with the reference LR left unscaled.

and test top-1 is printed for each (mean and spread over ``--seeds``). Everything goes through
:class:`lightning_firecaffe.callbacks.LargeBatchScaling`. Needs scikit-learn (``pip install scikit-learn``).
With ``--devices 2`` the runs use ``FireCaffeStrategy`` (fork start) and ``--wires`` compares how gradients
travel: ``fp32``, ``bf16``, ``bf16_feedback`` (bf16 with error feedback), ``fp16``, ``powersgd`` (low-rank,
rank 4); ``--configs`` picks which of the three trainings run.

    python benchmarks/large_batch.py            # ~1.5 min on 2 CPU cores (5 seeds x 3 runs)
    python benchmarks/large_batch.py --devices 2 --seeds 3 --wires fp32,bf16,bf16_feedback   # 16-bit wire
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_firecaffe import FireCaffeStrategy
from lightning_firecaffe.callbacks import LargeBatchScaling

WIRES = {
    "fp32": {},
    "bf16": {"compression": "bf16"},
    "fp16": {"compression": "fp16"},
    "bf16_feedback": {"compression": "bf16", "compression_error_feedback": True},
    "powersgd": {"compression": "powersgd", "powersgd_rank": 4},  # low-rank gradients, full for 10 steps first
}


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """Stratified train/test split of the digits, pixels scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=test_fraction, stratify=y.numpy(), random_state=seed)
    return (x[tr], y[tr]), (x[te], y[te])


class DigitsCNN(pl.LightningModule):
    """Two 3x3 convolutions and a linear classifier: big enough to overfit, small enough for a CPU."""

    def __init__(self, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4):
        super().__init__()
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def run(batch: int, rule: str, warmup: float, args, train, test, seed: int, wire: str = "fp32") -> tuple[float, float]:
    """One training; ``batch`` is global (split across ``args.devices`` ranks)."""
    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(TensorDataset(*train), batch_size=batch // args.devices, shuffle=True, drop_last=False)
    model = DigitsCNN(lr=args.base_lr)
    cb = LargeBatchScaling(
        rule=rule, reference_batch=args.ref_batch, warmup=warmup, unit="epoch", decay="poly", power=0.5, verbose=False
    )
    strategy = "auto" if args.devices == 1 else FireCaffeStrategy(start_method="fork", **WIRES[wire])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    peak = cb.lr_plan.peak_lr if cb.lr_plan is not None else float("nan")  # built in the ranks (fork)
    return top1(model, *test), peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-batch", type=int, default=16, help="reference (small) batch")
    p.add_argument("--factor", type=int, default=8, help="large batch = factor x reference batch")
    p.add_argument("--base-lr", type=float, default=0.02, help="LR tuned for the reference batch")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--rule", default="linear", choices=("linear", "sqrt"), help="rule of the scaled large-batch run")
    p.add_argument("--warmup", type=float, default=5, help="warm-up epochs of the scaled large-batch run")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing small CPUs)")
    p.add_argument("--devices", type=int, default=1, help="ranks; 2 or more train with FireCaffeStrategy")
    p.add_argument(
        "--wires", default="fp32", help=f"with --devices >= 2: how gradients travel, from {', '.join(WIRES)}"
    )
    p.add_argument("--configs", default="small,scaled,none", help="which trainings: small, scaled (rule+warmup), none")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    train, test = load_digits_split()
    big = args.ref_batch * args.factor
    every = {
        "small": ("small", args.ref_batch, "none", 0.0),
        "scaled": (f"{args.rule}+warmup", big, args.rule, args.warmup),
        "none": ("none", big, "none", 0.0),
    }
    asked = list(dict.fromkeys(c for c in args.configs.split(",") if c))
    if not asked or any(c not in every for c in asked):
        raise SystemExit(f"--configs: choose from {', '.join(every)}")
    print(
        f"digits: {len(train[1])} train / {len(test[1])} test images; {args.epochs} epochs; "
        f"reference batch {args.ref_batch} at LR {args.base_lr:g}; large batch {big} ({args.factor}x)"
    )
    wires = [w for w in args.wires.split(",") if w]
    if any(w not in WIRES for w in wires) or (args.devices == 1 and wires != ["fp32"]):
        raise SystemExit(f"--wires: choose from {', '.join(WIRES)} (anything but fp32 needs --devices >= 2)")
    configs = [every[c] for c in asked]
    results: dict[tuple[str, str], list[float]] = {}
    for name, batch, rule, warmup in configs:
        for wire in wires:
            t0 = time.perf_counter()
            accs = []
            for seed in range(args.seeds):
                acc, peak = run(batch, rule, warmup, args, train, test, seed, wire)
                accs.append(acc)
            results[name, wire] = accs
            spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            print(
                f"{name:>14} {wire:>13}: batch {batch:4d}  warm-up {warmup:g} ep  "
                f"top-1 {statistics.mean(accs):6.2f} +- {spread:.2f}  (seeds: "
                f"{', '.join(f'{a:.2f}' for a in accs)}; {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    for wire in wires if set(asked) == set(every) else []:
        small, scaled, none = (statistics.mean(results[every[c][0], wire]) for c in ("small", "scaled", "none"))
        print(
            f"[{wire}] {every['scaled'][0]} - small = {scaled - small:+.2f} points; "
            f"none - small = {none - small:+.2f} points"
        )
    for wire in wires[1:]:
        gaps = [statistics.mean(results[c[0], wire]) - statistics.mean(results[c[0], wires[0]]) for c in configs]
        print(f"{wire} - {wires[0]}: " + ", ".join(f"{c[0]} {g:+.2f}" for c, g in zip(configs, gaps)) + " points")


if __name__ == "__main__":
    main()
