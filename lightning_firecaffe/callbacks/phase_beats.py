"""Phase beats from Lightning's hooks, for the stall watchdog (``lightning_firecaffe.watchdog``).

Added by ``FireCaffeStrategy`` when its watchdog is on. Every hook costs one tuple assignment; a phase
names what the rank does *until the next beat*, so after ``on_train_batch_end`` the rank is "fetching
train batch k+1 (DataLoader)" and a rank stuck in its DataLoader is named as such. It also measures each
rank's compute + data time per training step (from fetching the batch to the start of backward: no
collective in between) and, at the end of fit, every rank's links (:mod:`..watchdog.link_probe`) for the
straggler report.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..watchdog.progress import PROGRESS, beat


class PhaseBeats(Callback):
    def __init__(self) -> None:
        self._fetch_started = time.perf_counter()
        self._compute_s = 0.0
        self._steps_timed = 0
        self.step_seconds: dict[int, float] = {}  # rank -> mean seconds per step, filled at the end of fit
        self.link_seconds: dict | None = None  # (sender, receiver) -> seconds of the end-of-fit link probe

    # -- setup and teardown
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        beat(f"setup ({stage})", "setup", trainer.global_step)

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        beat("sanity check", "warmup", trainer.global_step)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        beat("train start", "warmup", trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        beat(f"teardown ({stage})", "normal", trainer.global_step)

    # -- training
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fetch_started = time.perf_counter()
        beat(f"fetching train batch 0 of epoch {trainer.current_epoch} (DataLoader)", "warmup", trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        kind = "warmup" if trainer.global_step == 0 else "normal"
        beat(f"train batch {batch_idx} (training_step)", kind, trainer.global_step)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if trainer.global_step > 0:  # the first step's warm-up would skew the mean
            self._compute_s += time.perf_counter() - self._fetch_started
            self._steps_timed += 1
            PROGRESS.step_seconds = self._compute_s / self._steps_timed
        cur = PROGRESS.current
        beat(cur.phase.replace("(training_step)", "(backward)"), cur.kind, trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        beat(f"optimizer step {trainer.global_step}", PROGRESS.current.kind, trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._fetch_started = time.perf_counter()
        if PROGRESS.step_seconds is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            # this rank's own figure, for comparing ranks in the logger (self.log is not free: not every step)
            pl_module.log("firecaffe/compute_s", PROGRESS.step_seconds, on_step=True, on_epoch=False, sync_dist=False)
        beat(f"after train batch {batch_idx}: fetching the next batch (DataLoader)", "normal", trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        beat(
            f"train epoch {trainer.current_epoch} end (on_train_epoch_end, metric sync)", "normal", trainer.global_step
        )

    # -- evaluation (validation, test, predict share the wording)
    def _eval_start(self, trainer: pl.Trainer, what: str) -> None:
        beat(f"fetching {what} batch 0 (DataLoader)", "warmup", trainer.global_step)

    def _eval_batch(self, trainer: pl.Trainer, what: str, batch_idx: int, dataloader_idx: int) -> None:
        beat(f"{what} batch {batch_idx} of dataloader {dataloader_idx} ({what}_step)", "normal", trainer.global_step)

    def _eval_batch_end(self, trainer: pl.Trainer, what: str, batch_idx: int) -> None:
        beat(
            f"after {what} batch {batch_idx}: fetching the next batch (DataLoader) or ending the epoch",
            "normal",
            trainer.global_step,
        )

    def _eval_end(self, trainer: pl.Trainer, what: str) -> None:
        beat(f"{what} epoch end (on_{what}_epoch_end, metric sync)", "normal", trainer.global_step)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "validation")

    @override
    def on_validation_batch_start(
        self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch(trainer, "validation", batch_idx, dataloader_idx)

    @override
    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch_end(trainer, "validation", batch_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, "validation")

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "test")

    @override
    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "test", batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch_end(trainer, "test", batch_idx)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, "test")

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "predict")

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "predict", batch_idx, dataloader_idx)

    @override
    def on_predict_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch_end(trainer, "predict", batch_idx)

    # -- straggler report
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        beat("train end", "normal", trainer.global_step)
        watchdog = getattr(trainer.strategy, "watchdog", None)
        if watchdog is None:
            return
        self.step_seconds = watchdog.step_seconds()
        from ..watchdog.link_probe import PROBE_BYTES, probe_links
        from ..watchdog.stragglers import link_report, straggler_report

        beat("link probe (straggler report)", "normal", trainer.global_step)
        self.link_seconds = probe_links(
            trainer.global_rank, trainer.world_size, trainer.strategy.stall_timeout, device=pl_module.device
        )  # every rank: a collective
        reports = [straggler_report(self.step_seconds), link_report(self.link_seconds or {}, PROBE_BYTES)]
        if trainer.global_rank == 0:
            from lightning.pytorch.utilities import rank_zero_info

            for report in filter(None, reports):
                rank_zero_info(report)
