"""Models: reference parameter counts, shapes at 224 and small sizes, and that training reduces the loss."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_firecaffe.data import normalize
from lightning_firecaffe.models import GoogLeNet, ImageClassifier, NiN


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


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_classes"):
        NiN(0)
    with pytest.raises(ValueError, match="lr_policy"):
        ImageClassifier(NiN(3), lr_policy="cosine")
    with pytest.raises(ValueError, match="num_classes"):
        ImageClassifier(torch.nn.Linear(3, 3))


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
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LrProbe()], default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    # Caffe poly: lr * (1 - step / max_steps) ** power, logged before each step's update
    assert seen == pytest.approx([0.1 * (1 - i / 4) ** 0.5 for i in range(4)], rel=1e-5)
    for name in ("train/loss", "train/top1_epoch", "train/top5", "val/loss", "val/top1", "val/top5"):
        assert name in trainer.callback_metrics, name
