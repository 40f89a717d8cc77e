"""LargeBatchScaling in training: it follows its LR plan and logs it every step, refuses a warm-up longer
than the run, applies momentum / weight decay / LARS, resumes exactly, and infers the global batch across
2 processes with gradient accumulation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from lightning_firecaffe.callbacks import LargeBatchScaling

# ----------------------------------------------------------------------------- Lightning


class TinyModel(BoringModel):
    """BoringModel with a chosen per-device batch and plain SGD (no scheduler)."""

    def __init__(self, batch_size: int = 2, lr: float = 0.1, momentum: float = 0.0):
        super().__init__()
        self.batch_size, self.lr, self.momentum = batch_size, lr, momentum

    def train_dataloader(self):
        return DataLoader(RandomDataset(32, 64), batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class LRRecorder(pl.Callback):
    """Records (global_step, lr) at every optimizer step; rank 0 can dump them to a JSON file."""

    def __init__(self, out: Path | None = None):
        self.steps: dict[int, float] = {}
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[trainer.global_step] = optimizer.param_groups[0]["lr"]

    def on_train_end(self, trainer, pl_module):
        if self.out is not None and trainer.global_rank == 0:
            cb = next(c for c in trainer.callbacks if isinstance(c, LargeBatchScaling))
            self.out.write_text(
                json.dumps(
                    {
                        "steps": self.steps,
                        "global_batch": cb.global_batch,
                        "layout": cb.batch_layout,
                        "max_iter": cb.lr_plan.max_iter,
                        "warmup_iters": cb.lr_plan.warmup_iters,
                        "world_size": trainer.world_size,
                        "summary": cb.describe(),
                    }
                )
            )


def _trainer(tmp_path, callbacks, **kw):
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        limit_train_batches=8,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def test_callback_follows_the_schedule_and_logs_every_step(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    cb = LargeBatchScaling(reference_batch=2, warmup=1, unit="epoch", decay="poly", power=0.5)
    rec = LRRecorder()
    trainer = _trainer(
        tmp_path, [cb, rec], accumulate_grad_batches=2, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="csv")
    )
    trainer.fit(TinyModel(batch_size=2, lr=0.1))
    # global batch 2 x 1 x 2 = 4 = 2x the reference; 8 batches / 2 = 4 steps per epoch, 3 epochs
    assert cb.global_batch == 4 and cb.batch_layout == {"per_device": 2, "world_size": 1, "accumulate": 2}
    s = cb.lr_plan
    assert (s.max_iter, s.warmup_iters, s.peak_lr) == (12, 4, pytest.approx(0.2))
    expected = [0.1 + 0.1 * i / 4 for i in range(4)] + [0.2 * (1 - i / 8) ** 0.5 for i in range(8)]
    assert [rec.steps[i] for i in range(12)] == pytest.approx(expected)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): float(r["lr"]) for r in rows if r.get("lr")}
    assert logged == pytest.approx(dict(enumerate(expected)))
    lines = [r.getMessage() for r in caplog.records if "LargeBatchScaling: global batch" in r.getMessage()]
    assert len(lines) == 1
    assert "global batch 4" in lines[0] and "peak LR 0.2" in lines[0] and "warm-up 4 iterations" in lines[0]
    assert "12 iterations in total" in lines[0]


def test_warmup_longer_than_the_run_is_refused(tmp_path):
    cb = LargeBatchScaling(reference_batch=2, warmup=5, unit="step")
    with pytest.raises(ValueError, match="not shorter than training"):
        _trainer(tmp_path, [cb], max_epochs=None, max_steps=4).fit(TinyModel())
    cb = LargeBatchScaling(reference_batch=2, warmup=2, unit="epoch")  # 2 epochs of 8 steps > max_steps=6
    with pytest.raises(ValueError, match=r"warmup=2 epochs.*warm-up of 16 iterations is not shorter than training"):
        _trainer(tmp_path, [cb], max_epochs=5, max_steps=6).fit(TinyModel())


def test_momentum_weight_decay_and_per_group_base_lrs(tmp_path):
    class TwoGroups(TinyModel):
        def configure_optimizers(self):
            w, b = self.layer.weight, self.layer.bias
            return torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.1)

    cb = LargeBatchScaling(reference_batch=1, rule="sqrt", decay="constant", momentum=0.9, weight_decay=2e-4)
    trainer = _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2)
    trainer.fit(TwoGroups(batch_size=4))
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.2, 0.02])  # sqrt(4) = 2, ratio kept
    assert {g["momentum"] for g in groups} == {0.9} and {g["weight_decay"] for g in groups} == {2e-4}


def test_lars_in_training_moves_weights_by_eta_times_their_norm(tmp_path):
    model = TinyModel(batch_size=4, lr=0.5)
    w0 = model.layer.weight.detach().clone()
    cb = LargeBatchScaling(reference_batch=4, decay="constant", lars=True, lars_eta=0.01)
    _trainer(tmp_path, [cb], max_epochs=None, max_steps=1).fit(model)
    # no weight decay: ratio * ||g|| = eta * ||w||, so one SGD step moves w by lr * eta * ||w||
    moved = torch.linalg.vector_norm(model.layer.weight.detach() - w0)
    assert float(moved) == pytest.approx(0.5 * 0.01 * float(torch.linalg.vector_norm(w0)), rel=1e-4)


def test_resume_continues_the_lr_sequence_exactly(tmp_path):
    def run(ckpt_path=None, ckpt_dir=None):
        # this toy diverges at LR 0.2 with momentum 0.9 (its loss goes 0.5 -> 1e4): the divergence guard would
        # rightly stop it at step 4; this test is about the LR sequence across a resume, so the guard is off
        cb = LargeBatchScaling(reference_batch=2, warmup=1, unit="epoch", decay="poly", power=0.5, guard=False)
        rec = LRRecorder()
        cbs = [cb, rec]
        if ckpt_dir is not None:
            cbs.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1))
        trainer = _trainer(tmp_path, cbs, accumulate_grad_batches=2, max_epochs=4, enable_checkpointing=True)
        # base LR taken from the optimizer: a resume that re-read it would start from a decayed LR
        trainer.fit(TinyModel(batch_size=2, lr=0.1, momentum=0.9), ckpt_path=ckpt_path)
        return rec.steps, trainer

    full, _ = run(ckpt_dir=tmp_path / "ckpt")
    assert len(full) == 16
    ckpt = tmp_path / "ckpt" / "epoch=1-step=5.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, trainer = run(ckpt_path=ckpt)
    assert min(resumed) == 5 and trainer.global_step == 16
    assert resumed == {k: v for k, v in full.items() if k >= 5}  # exact, not approximately


@pytest.mark.timeout(120)
def test_global_batch_inferred_across_two_processes_and_accumulation(tmp_path):
    out = tmp_path / "rank0.json"
    cb = LargeBatchScaling(reference_batch=4, warmup=2, unit="step", decay="poly", power=1.0)
    trainer = _trainer(
        tmp_path,
        [cb, LRRecorder(out)],
        strategy="ddp_fork",
        devices=2,
        accumulate_grad_batches=4,
        max_epochs=1,
        limit_train_batches=16,
    )
    trainer.fit(TinyModel(batch_size=2, lr=0.05))
    got = json.loads(out.read_text())
    assert got["world_size"] == 2
    assert got["global_batch"] == 16 and got["layout"] == {"per_device": 2, "world_size": 2, "accumulate": 4}
    assert (got["max_iter"], got["warmup_iters"]) == (4, 2)  # 16 batches per rank / 4 accumulated
    peak = 0.05 * 16 / 4
    expected = [0.05, (0.05 + peak) / 2, peak, peak * 0.5]
    assert [got["steps"][str(i)] for i in range(4)] == pytest.approx(expected)
    assert "global batch 16 = 2 per device x 2 devices x 4 accumulation" in got["summary"]
