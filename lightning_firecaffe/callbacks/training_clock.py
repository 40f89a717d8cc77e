"""``TrainingClock``: logs how long the run has trained, and on how many images, at every validation.

Why: time to accuracy (FireCaffe's own measure) needs top-1 against wall-clock. Lightning logs top-1 per
validation but not the time; this callback logs ``time/train_s`` (seconds since training started, the
validation passes themselves excluded, so validating more often does not make a run look slower) and
``time/images`` (global batches stepped x global batch) beside ``val/top1``, in the same logger row.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override


class TrainingClock(Callback):
    """Logs ``time/train_s`` and ``time/images`` with every validation result."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._in_validation = 0.0
        self._val_start: float | None = None
        self._images = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._in_validation, self._images = time.perf_counter(), 0.0, 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += int(extract_batch_size(batch)) * trainer.world_size

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None or trainer.sanity_checking or self._val_start is None:
            return
        train_s = self._val_start - self._start - self._in_validation
        pl_module.log("time/train_s", train_s, on_step=False, on_epoch=True, batch_size=1, rank_zero_only=True)
        pl_module.log(
            "time/images", float(self._images), on_step=False, on_epoch=True, batch_size=1, rank_zero_only=True
        )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None and self._start is not None:
            self._in_validation += time.perf_counter() - self._val_start
        self._val_start = None
