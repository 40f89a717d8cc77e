"""Turn the strategy's per-step communication figures into logged metrics and an end-of-fit summary."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ..comm.telemetry import step_metrics


class CommTelemetry(Callback):
    """Logs ``firecaffe/exposed_s`` (not hidden behind backward), ``firecaffe/busy_s`` and bytes
    sent/received by this rank after every optimizer step; rank 0 prints a summary at the end of fit.

    Added automatically by ``FireCaffeStrategy``; loggers (CSV, TensorBoard, ...) record the metrics.
    When ``auto`` has measured its choice for a bucket size, ``firecaffe/auto_ms/<bytes>`` logs the
    winner's time once. It keeps no state: the strategy itself saves the gradient path's state in
    checkpoints (``auto``'s choices, compression's scale and residuals).
    """

    def __init__(self) -> None:
        self._logged_steps = 0
        self._logged_choices: set[int] = set()

    @staticmethod
    def _stats(trainer: pl.Trainer):
        return getattr(trainer.strategy, "comm_stats", None)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        stats = self._stats(trainer)
        if stats is None or stats.completed_steps == self._logged_steps:
            return  # no new optimizer step (e.g. accumulating gradients)
        self._logged_steps = stats.completed_steps
        pl_module.log_dict(step_metrics(stats), on_step=True, on_epoch=False, sync_dist=False)
        fresh = {row["bytes"]: row for row in stats.tuning if row["bytes"] not in self._logged_choices}
        for nbytes, row in fresh.items():
            self._logged_choices.add(nbytes)
            if row.get("measured_ms") is not None:
                pl_module.log(f"firecaffe/auto_ms/{nbytes}", float(row["measured_ms"]), on_step=True, on_epoch=False)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = self._stats(trainer)
        if stats is not None:
            rank_zero_info(stats.summary(getattr(trainer.strategy, "algorithm", "?")))
