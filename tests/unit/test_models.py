"""Models: reference parameter counts, shapes at 224 and small sizes, and that training reduces the loss."""

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_firecaffe.callbacks import LargeBatchScaling
from lightning_firecaffe.data import normalize
from lightning_firecaffe.models import GoogLeNet, ImageClassifier, NiN
from lightning_firecaffe.options import InvalidOption

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_caffe_references():
    assert n_params(GoogLeNet(1000)) == 6_998_552
    assert n_params(GoogLeNet(1000, aux_logits=True)) == 13_378_280
    assert n_params(NiN(1000)) == 7_595_176


@pytest.mark.parametrize("size", [224, 64, 32])
def test_output_shapes(size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert NiN(7).eval()(x).shape == (2, 7)
        net = GoogLeNet(7, aux_logits=True)
        assert net.eval()(x).shape == (2, 7)  # aux heads only in training
        main, aux1, aux2 = net.train()(x)
        assert main.shape == aux1.shape == aux2.shape == (2, 7)


def test_bad_backbone_arguments_raise():
    with pytest.raises(ValueError, match="num_classes"):
        NiN(0)


@pytest.mark.parametrize(
    "kwargs, option, match",
    [
        (dict(lr_policy="cosine"), "lr_policy", r"lr_policy='cosine' is not one of fixed, poly, step"),
        (dict(lr=-1), "lr", r"lr=-1 must be a positive, finite learning rate"),
        (dict(lr=0.0), "lr", r"lr=0.0 must be a positive"),
        (dict(momentum=1.0), "momentum", r"momentum=1.0 must be in \[0, 1\)"),
        (dict(weight_decay=-1), "weight_decay", r"weight_decay=-1 must be >= 0"),
        (dict(nesterov=True, momentum=0.0), "nesterov", r"nesterov=True needs momentum > 0"),
        (dict(aux_loss_weight=-0.3), "aux_loss_weight", r"aux_loss_weight=-0.3 must be >= 0"),
        (dict(lr_policy="poly", poly_power=0), "poly_power", r"poly_power=0 must be > 0 for lr_policy='poly'"),
        (dict(lr_policy="step", step_epochs=0), "step_epochs", r"step_epochs=0 must be an integer >= 1"),
        (dict(lr_policy="step", gamma=0), "gamma", r"gamma=0 must be in \(0, 1\]"),
        (dict(num_classes=0), "num_classes", r"num_classes=0 must be an integer >= 1"),
        (dict(lr_scheduler="cosine"), "lr_scheduler", r"lr_scheduler='cosine' must be a factory"),
    ],
)
def test_bad_classifier_arguments_name_the_option(kwargs, option, match):
    with pytest.raises(InvalidOption, match=r"^ImageClassifier: " + match) as err:
        ImageClassifier(NiN(3), **kwargs)
    assert err.value.option == option


def test_classifier_needs_the_number_of_classes():
    with pytest.raises(InvalidOption, match="num_classes=None") as err:
        ImageClassifier(torch.nn.Linear(3, 3))
    assert err.value.option == "num_classes"


@pytest.mark.parametrize("backbone", [lambda: NiN(5), lambda: GoogLeNet(5, aux_logits=True)], ids=["nin", "googlenet"])
def test_steps_on_a_fixed_batch_reduce_the_loss(backbone):
    torch.manual_seed(0)
    model = ImageClassifier(backbone(), lr=0.01, momentum=0.9, weight_decay=0.0)
    opt = model.configure_optimizers()
    labels = torch.arange(10) % 5
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0]])
    noise = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 76
    images = (colours[labels].view(10, 3, 1, 1) * 0.7 + noise).to(torch.uint8)  # uint8: the module normalises
    model.train()  # dropout and GoogLeNet's auxiliary losses included
    losses = []
    for _ in range(12):
        loss, _ = model._loss(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3]), losses


def test_uint8_batches_are_normalised_like_float_ones():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    model = ImageClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)), num_classes=4).eval()
    floats = normalize(images)
    assert torch.allclose(floats[0, 0], (images[0, 0].float() / 255 - 0.485) / 0.229)
    assert torch.allclose(model(images), model(floats))


def test_weight_decay_groups():
    model = ImageClassifier(NiN(3), weight_decay=1e-3, bias_weight_decay=False)
    groups = model.configure_optimizers().param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-3 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(decayed) + len(groups[1]["params"]) == len(list(model.backbone.parameters()))


def test_trainer_logs_metrics_and_poly_learning_rate(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 4)
    seen = []

    class LrProbe(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(trainer.callback_metrics["lr"].item())

    model = ImageClassifier(NiN(4), lr=0.1, lr_policy="poly", poly_power=0.5)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LrProbe()],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    # Caffe poly: lr * (1 - step / max_steps) ** power, logged before each step's update
    assert seen == pytest.approx([0.1 * (1 - i / 4) ** 0.5 for i in range(4)], rel=1e-5)
    for name in ("train/loss", "train/top1_epoch", "train/top5", "val/loss", "val/top1", "val/top5"):
        assert name in trainer.callback_metrics, name


# ----------------------------------------------------------------------------- who owns the learning rate
class TinyBackbone(torch.nn.Sequential):
    num_classes = 2

    def __init__(self):
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(lr_policy="poly"), "lr_policy"),
        (dict(lr_policy="step"), "lr_policy"),
        (dict(lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1)), "lr_scheduler"),
    ],
)
def test_a_model_schedule_beside_the_callback_is_refused(kwargs, option):
    model = ImageClassifier(NiN(3), **kwargs)
    assert model.check_lr_owner([]) is True  # alone, the model owns the LR
    with pytest.raises(InvalidOption, match="while LargeBatchScaling sets the learning rate") as err:
        model.check_lr_owner([LargeBatchScaling()])
    assert err.value.option == option


def test_the_refusal_happens_at_setup_before_any_step(tmp_path):
    data = TensorDataset(torch.zeros(4, 3, 8, 8), torch.arange(4) % 2)
    model = ImageClassifier(TinyBackbone(), lr_policy="poly")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LargeBatchScaling()],
        default_root_dir=tmp_path,
    )
    with pytest.raises(InvalidOption, match="lr_policy='poly' must be 'fixed'"):
        trainer.fit(model, DataLoader(data, batch_size=2))
    assert trainer.global_step == 0


class LogSpy(ImageClassifier):
    """Records which hook logged each ``lr`` value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_logged_from: list[str] = []

    def log(self, name, value, *args, **kwargs):
        if name == "lr":
            self.lr_logged_from.append(self._current_fx_name)
        super().log(name, value, *args, **kwargs)


def _fit_tiny(tmp_path, callbacks, **model_kwargs) -> tuple[LogSpy, pl.Trainer]:
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(16, 3, 8, 8), torch.arange(16) % 2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    model = LogSpy(TinyBackbone(), lr=0.1, **model_kwargs)
    trainer.fit(model, DataLoader(data, batch_size=4))
    return model, trainer


def test_with_the_callback_the_lr_is_logged_once_per_step_by_it(tmp_path):
    model, trainer = _fit_tiny(tmp_path, [LargeBatchScaling(reference_batch=2, decay="constant", verbose=False)])
    assert model.lr_logged_from == ["on_before_optimizer_step"] * 4  # 4 steps, the model logged none
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [c for c in rows[0] if "lr" in c.replace("-", "/").split("/")] == ["lr"]
    assert [float(r["lr"]) for r in rows if r["lr"]] == pytest.approx([0.2] * 4)  # 0.1 at batch 2, x2 at 4


def test_without_the_callback_the_model_schedules_and_logs_the_lr(tmp_path):
    model, _ = _fit_tiny(tmp_path, [], lr_policy="poly")
    assert model.schedules_lr and model.lr_logged_from == ["training_step"] * 4


def test_the_lr_owner_is_whoever_declares_it_without_models_importing_callbacks():
    import ast
    import pathlib

    from lightning_firecaffe.large_batch import lr_owner

    class Declares:
        owns_learning_rate = True

    plain, claims = object(), Declares()
    assert lr_owner([plain, claims]) is claims
    assert lr_owner([plain]) is None
    assert isinstance(lr_owner([LargeBatchScaling()]), LargeBatchScaling)
    import lightning_firecaffe.models

    models = pathlib.Path(lightning_firecaffe.models.__file__).parent
    for source in models.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "callbacks" not in (node.module or ""), f"{source.name} imports {node.module}"
