"""The Lightning-private attributes :mod:`lightning_firecaffe.compat` relies on exist in the pinned release."""

from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from lightning_firecaffe import compat


def test_trainer_of_a_detached_and_an_attached_module(tmp_path):
    model = BoringModel()
    assert compat.trainer_of(model) is None and compat.trainer_of(None) is None
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    model.trainer = trainer
    assert compat.trainer_of(model) is trainer


def test_hpc_save_path_names_an_hpc_checkpoint_in_the_root_dir(tmp_path):
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    path = compat.hpc_save_path(trainer)
    assert str(path).startswith(str(tmp_path)) and "hpc_ckpt_" in str(path)


def test_launched_pids_reads_the_subprocess_launchers_children():
    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)

    class Strategy:
        _launcher = launcher

    assert compat.launched_pids(Strategy()) == []
    launcher.procs = [type("P", (), {"pid": 42})()]
    assert compat.launched_pids(Strategy()) == [42]
    assert compat.launched_pids(object()) == []
