"""``ImageClassifier``: the LightningModule that trains any backbone on (image, label) batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from ..large_batch import lr_owner
from ..options import InvalidOption, is_int, is_number, require, require_choice

LR_POLICIES = ("fixed", "poly", "step")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier with SGD, top-1/top-5 accuracy and learning-rate logging.

    Strategy-agnostic: it only uses Lightning's logging and torchmetrics, so it runs under DDP, the
    firecaffe strategy or a single device alike. uint8 batches are normalised here, on the device.

    One owner of the learning rate: with a :class:`~lightning_firecaffe.callbacks.LargeBatchScaling` among
    the Trainer's callbacks, the callback sets and logs the LR every step (``lr`` is then its base LR) and
    ``lr_policy`` must stay ``fixed`` (no ``lr_scheduler``); without it, this module applies ``lr_policy`` and
    logs ``lr`` itself. A bad argument raises :class:`~lightning_firecaffe.options.InvalidOption`.

    Args:
        backbone: returns logits, or a tuple ``(logits, *aux_logits)`` in training (GoogLeNet's heads).
        num_classes: defaults to ``backbone.num_classes``.
        lr, momentum, weight_decay, nesterov: SGD.
        bias_weight_decay: apply weight decay to biases (and other 1-d parameters) too.
        aux_loss_weight: weight of each auxiliary loss (0.3 in GoogLeNet).
        lr_policy: ``fixed``; ``poly`` (Caffe: lr * (1 - step/max_steps) ** poly_power, per step);
            ``step`` (x ``gamma`` every ``step_epochs``). ``lr_scheduler`` (a factory taking the optimizer)
            overrides it, e.g. a Hydra ``_partial_`` of a torch scheduler.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 2e-4,
        nesterov: bool = False,
        bias_weight_decay: bool = True,
        aux_loss_weight: float = 0.3,
        lr_policy: str = "fixed",
        poly_power: float = 0.5,
        step_epochs: int = 30,
        gamma: float = 0.1,
        lr_scheduler: Callable | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        num_classes = num_classes if num_classes is not None else getattr(backbone, "num_classes", None)
        _check_arguments(
            num_classes=num_classes,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            aux_loss_weight=aux_loss_weight,
            lr_policy=lr_policy,
            poly_power=poly_power,
            step_epochs=step_epochs,
            gamma=gamma,
            lr_scheduler=lr_scheduler,
        )
        self.save_hyperparameters(ignore=["backbone", "lr_scheduler"])
        self.backbone = backbone
        self.lr_scheduler_factory = lr_scheduler
        top5 = min(5, num_classes)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.train_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.schedules_lr = True  # False while a callback owns the LR (decided in setup)

    def check_lr_owner(self, callbacks: Iterable[Any]) -> bool:
        """Whether this module schedules (and logs) the LR itself given the Trainer's ``callbacks``; raise
        :class:`~lightning_firecaffe.options.InvalidOption` when a callback owns the LR and this module was
        also given a schedule (the app calls this before launch, ``setup`` again in every process)."""
        owner = lr_owner(callbacks)
        if owner is None:
            return True
        why = f"while {type(owner).__name__} sets the learning rate (drop the callback to use the module's own)"
        require(
            self.hparams.lr_policy == "fixed",
            type(self).__name__,
            "lr_policy",
            self.hparams.lr_policy,
            f"must be 'fixed' {why}",
        )
        if self.lr_scheduler_factory is not None:
            raise InvalidOption(type(self).__name__, "lr_scheduler", self.lr_scheduler_factory, f"must be None {why}")
        return False

    @override
    def setup(self, stage: str) -> None:
        self.schedules_lr = self.check_lr_owner(self.trainer.callbacks)

    def forward(self, images: torch.Tensor):
        if images.dtype == torch.uint8:
            images = normalize(images, self.hparams.mean, self.hparams.std)
        return self.backbone(images)

    def _loss(self, outputs, labels) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(outputs, (tuple, list)):
            logits, aux = outputs[0], [a for a in outputs[1:] if a is not None]
        else:
            logits, aux = outputs, []
        loss = F.cross_entropy(logits, labels)
        for a in aux:
            loss = loss + self.hparams.aux_loss_weight * F.cross_entropy(a, labels)
        return loss, logits

    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        loss, logits = self._loss(self(images), labels)
        self.train_top1(logits, labels)
        self.train_top5(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", self.train_top1, on_step=True, on_epoch=True)
        self.log("train/top5", self.train_top5, on_step=False, on_epoch=True)
        if self.schedules_lr:  # otherwise the callback that sets the LR logs it
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        logits = self(images)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        # epoch-level only: ranks may have different numbers of validation batches
        self.log("val/loss", F.cross_entropy(logits, labels), on_step=False, on_epoch=True, sync_dist=True)
        self.log("val/top1", self.val_top1, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/top5", self.val_top5, on_step=False, on_epoch=True)

    def on_train_epoch_end(self):
        skipped = getattr(getattr(self.trainer, "datamodule", None), "skipped_samples", None)
        if skipped is not None:  # corrupt samples skipped by the data pipeline, summed over ranks
            self.log("data/skipped", float(skipped), sync_dist=True, reduce_fx="sum")

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.backbone.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 and not hp.bias_weight_decay else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        if self.lr_scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer)}}
        if hp.lr_policy == "poly":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: max(0.0, 1 - step / total) ** hp.poly_power
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        if hp.lr_policy == "step":
            schedule = torch.optim.lr_scheduler.StepLR(optimizer, hp.step_epochs, hp.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
        return optimizer


def _check_arguments(
    *,
    num_classes: Any,
    lr: Any,
    momentum: Any,
    weight_decay: Any,
    nesterov: Any,
    aux_loss_weight: Any,
    lr_policy: Any,
    poly_power: Any,
    step_epochs: Any,
    gamma: Any,
    lr_scheduler: Any,
) -> None:
    """Every constructor argument checked before anything is built, each error naming its option."""
    owner = ImageClassifier.__name__
    require(
        is_int(num_classes) and num_classes >= 1,
        owner,
        "num_classes",
        num_classes,
        "must be an integer >= 1 (given, or the backbone's num_classes attribute)",
    )
    require(is_number(lr) and lr > 0, owner, "lr", lr, "must be a positive, finite learning rate")
    require(is_number(momentum) and 0 <= momentum < 1, owner, "momentum", momentum, "must be in [0, 1)")
    require(is_number(weight_decay) and weight_decay >= 0, owner, "weight_decay", weight_decay, "must be >= 0")
    require(not nesterov or momentum > 0, owner, "nesterov", nesterov, "needs momentum > 0")
    require(
        is_number(aux_loss_weight) and aux_loss_weight >= 0, owner, "aux_loss_weight", aux_loss_weight, "must be >= 0"
    )
    require_choice(owner, "lr_policy", lr_policy, LR_POLICIES)
    if lr_policy == "poly":
        require(
            is_number(poly_power) and poly_power > 0,
            owner,
            "poly_power",
            poly_power,
            "must be > 0 for lr_policy='poly'",
        )
    if lr_policy == "step":
        require(
            is_int(step_epochs) and step_epochs >= 1,
            owner,
            "step_epochs",
            step_epochs,
            "must be an integer >= 1 for lr_policy='step'",
        )
        require(is_number(gamma) and 0 < gamma <= 1, owner, "gamma", gamma, "must be in (0, 1] for lr_policy='step'")
    require(
        lr_scheduler is None or callable(lr_scheduler),
        owner,
        "lr_scheduler",
        lr_scheduler,
        "must be a factory taking the optimizer, or None",
    )
