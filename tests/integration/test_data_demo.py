"""The offline demo set, and acceptance 6: NiN trains on it under Trainer(strategy="firecaffe")."""

import json
import os
import textwrap
from pathlib import Path

import pytest

from lightning_firecaffe.data import build_demo_set, cache_dir
from lightning_firecaffe.testing.ranks import run_launcher_script


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache") / "demo")


def test_demo_set_is_built_once_offline(demo_root, monkeypatch, tmp_path):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the demo set must be built without the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    demo = build_demo_set(demo_root)
    monkeypatch.undo()
    # big enough for large batches: 16x the demo's reference batch (512) still takes 20 steps per epoch
    assert demo.num_classes == 10 and demo.train_samples == 10240 and demo.val_samples == 1000
    assert demo.train_samples // (16 * 32) >= 20
    info = json.loads(Path(demo_root, "demo-train-info.json").read_text())
    assert info["samples"] == 10240 and len(info["shards"]) == 103
    stamp = os.path.getmtime(os.path.join(demo_root, "demo.json"))
    assert build_demo_set(demo_root) == demo and os.path.getmtime(os.path.join(demo_root, "demo.json")) == stamp
    monkeypatch.setenv("FIRECAFFE_CACHE", str(tmp_path))
    assert cache_dir() == str(tmp_path)


def test_demo_validation_crops_are_held_out(demo_root):
    from lightning_firecaffe.data import ImageNetShards

    demo = build_demo_set(demo_root)
    dm = ImageNetShards(
        train_shards=demo.train_shards,
        val_shards=demo.val_shards,
        num_workers=0,
        image_size=32,
        val_resize=36,
        num_classes=10,
        batch_size=100,
        with_keys=True,
    )
    val_keys = [k for b in dm.val_dataloader() for k in b[2]]
    assert len(val_keys) == 1000 and all("_val_" in k for k in val_keys)
    labels = [int(label) for b in dm.val_dataloader() for label in b[1]]
    assert sorted(set(labels)) == list(range(10)) and labels.count(0) == 100


def test_the_same_version_gives_the_same_bytes(tmp_path):
    """Seeded crops and fixed tar time stamps: two builds (here a tenth of the size, the same code path) are
    byte for byte identical, so every machine trains on the same shards."""
    import hashlib

    def digest(root: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}

    first, second = tmp_path / "a", tmp_path / "b"
    build_demo_set(str(first), train_per_class=16, val_per_class=4)
    build_demo_set(str(second), train_per_class=16, val_per_class=4)
    assert digest(first) == digest(second) and any(name.endswith(".tar") for name in digest(first))


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import lightning.pytorch as pl
    import torch
    import lightning_firecaffe  # registers strategy="firecaffe"
    from lightning_firecaffe.data import demo_datamodule
    from lightning_firecaffe.models import ImageClassifier, NiN
    from lightning_firecaffe.process_groups import end_process_groups

    root, out, strategy, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class Keys(pl.Callback):
        def __init__(self):
            self.keys = {}
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.keys.setdefault(trainer.current_epoch, []).extend(batch[2])
        def on_train_end(self, trainer, module):
            with open(os.path.join(out, f"keys-{trainer.global_rank}.json"), "w") as f:
                json.dump(self.keys, f)

    pl.seed_everything(0)
    dm = demo_datamodule(root, batch_size=32, num_workers=1, image_size=32, val_resize=36, with_keys=True)
    model = ImageClassifier(NiN(10), lr=0.02, weight_decay=5e-4, bias_weight_decay=False)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Keys()], num_sanity_val_steps=0)
    start = time.time()
    trainer.fit(model, dm)
    if trainer.global_rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics.update(steps=trainer.global_step, seconds=time.time() - start, world=trainer.world_size)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(metrics, f)
    end_process_groups()
    """
)


@pytest.mark.timeout(420)
def test_nin_learns_the_demo_set_under_firecaffe(demo_root, tmp_path):
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_firecaffe  # noqa: F401  (a broken registration must fail this test, not skip it)

    assert "firecaffe" in StrategyRegistry
    build_demo_set(demo_root)  # once, before the ranks start
    script = tmp_path / "train_demo.py"
    script.write_text(TRAIN_SCRIPT)
    epochs = 1  # 160 steps of 2 x 32 over the 10,240 images
    res = run_launcher_script([script, demo_root, tmp_path, "firecaffe", epochs], timeout=400, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(
        f"firecaffe, 2 ranks, NiN 32 px: {result['steps']} steps in {result['seconds']:.0f} s, "
        f"val top-1 {result['val/top1']:.3f}, top-5 {result['val/top5']:.3f}"
    )
    assert result["world"] == 2 and result["steps"] == epochs * (10240 // (32 * 2))
    assert result["val/top1"] > 0.35, result  # chance is 0.10
    assert result["data/skipped"] == 0
    keys = [json.loads((tmp_path / f"keys-{r}.json").read_text()) for r in (0, 1)]
    for epoch in keys[0]:  # the ranks got their rank from the Trainer: disjoint samples, equal counts
        assert len(keys[0][epoch]) == len(keys[1][epoch]) == 160 * 32
        assert not set(keys[0][epoch]) & set(keys[1][epoch])
