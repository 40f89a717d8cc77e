"""Turn the strategy's per-step communication figures into logged metrics and an end-of-fit summary."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ..comm.cost_model import LinkModel
from ..comm.savings import CPU_CORE, GPU, format_savings, price_options
from ..comm.telemetry import step_metrics


class CommTelemetry(Callback):
    """Logs ``firecaffe/exposed_s`` (not hidden behind backward), ``firecaffe/busy_s`` and bytes
    sent/received by this rank after every optimizer step; rank 0 prints a summary at the end of fit.

    The summary ends with how much of a step was exposed communication and what a bf16 wire, low-rank
    gradients and local SGD would save per step, priced by the cost model (:mod:`..comm.savings`) against
    the steady state (the later half of the steps: ``auto`` measures in the first ones); it turns nothing on.

    Added automatically by ``FireCaffeStrategy``; loggers (CSV, TensorBoard, ...) record the metrics.
    When ``auto`` has measured its choice for a bucket size, ``firecaffe/auto_ms/<bytes>`` logs the
    winner's time once. It keeps no state in checkpoints: the strategy itself saves the gradient path's
    state (``auto``'s choices, compression's scale and residuals); batch times are this fit's only.
    """

    def __init__(self) -> None:
        self._logged_steps = 0
        self._logged_choices: set[int] = set()
        self._batch_started = 0.0
        self._batch_s: deque[float] = deque(maxlen=1000)  # as many as CommStats keeps steps

    @staticmethod
    def _stats(trainer: pl.Trainer):
        return getattr(trainer.strategy, "comm_stats", None)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._batch_started = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._batch_s.append(time.perf_counter() - self._batch_started)
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
            if trainer.world_size > 1 and stats.history:
                rank_zero_info(self._priced(trainer, pl_module, stats))

    def _priced(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: Any) -> str:
        steady = list(stats.history)[len(stats.history) // 2 :]
        exposed = statistics.mean(s.exposed_s for s in steady)
        busy = statistics.mean(s.busy_s for s in steady)
        batches = list(self._batch_s)[len(self._batch_s) // 2 :]
        step = statistics.median(batches) * trainer.accumulate_grad_batches if batches else None
        options = getattr(trainer.strategy, "options", None)
        if options is not None and (options.low_rank is not None or options.local_sgd):
            return format_savings(step, exposed, [])  # the prices are against full gradients, not this run's
        shapes = [tuple(p.shape) for p in pl_module.parameters() if p.requires_grad]
        on_gpu = trainer.strategy.root_device.type == "cuda"
        wire = options.wire_format if options is not None else None
        savings = price_options(
            exposed_s=exposed,
            busy_s=busy,
            shapes=shapes,
            world_size=trainer.world_size,
            link=_link(trainer.strategy, stats, trainer.num_devices),
            wire_itemsize=wire.itemsize if wire is not None else 4,
            compute=GPU if on_gpu else CPU_CORE,
        )
        return format_savings(step, exposed, savings)


def _link(strategy: Any, stats: Any, ranks_per_node: int) -> LinkModel:
    """The links as best known: measured at start-up, fitted to ``auto``'s measurements, given, or the default."""
    measured = getattr(strategy, "measured_link", None)
    if measured is not None:
        return measured
    if stats.fitted_link:
        f = stats.fitted_link
        return LinkModel.from_gbit(f["gbit_per_s"], f["latency_us"], ranks_per_node)
    given = getattr(getattr(strategy, "options", None), "link", None)
    return dataclasses.replace(given if isinstance(given, LinkModel) else LinkModel(), ranks_per_node=ranks_per_node)
