"""``firecaffe-train``'s configs, in process: every config composes and instantiates, presets apply, and a bad
value in any group is reported with its full config key before anything is launched.

Hydra's compose API on the packaged configs (``lightning_firecaffe/conf`` -> ``conf/``); every object is
built (the app's own pre-launch build), nothing is fit. The runs of the app itself: tests/integration/test_app.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from lightning_firecaffe import algorithm_names, app_checks
from lightning_firecaffe.callbacks import LargeBatchScaling
from lightning_firecaffe.testing.required import import_or_missing
from lightning_firecaffe.train import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
SCRIPT = Path(sys.executable).with_name("firecaffe-train")
# conf/hydra/launcher/submitit_slurm.yaml shadows (and lists every key of) the plugin's schema of the same name
pytestmark = pytest.mark.filterwarnings("ignore:.*validated against ConfigStore schema")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(tmp_path: Path, *overrides: str):
    """The composed config with the Hydra node (``${hydra:...}`` resolves), outputs under ``tmp_path``."""
    app_checks.register_resolvers()  # as firecaffe-train's main() does
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def build_all(cfg, trainer: bool = True) -> dict:
    """Everything train.py builds (through the app's own pre-launch build), except that nothing is fit."""
    built = app_checks.build(cfg)
    objs = {
        "model": built.model,
        "data": built.data,
        "strategy": built.strategy,
        "callbacks": list(built.callbacks.values()),
        "loggers": list(built.loggers.values()),
    }
    if trainer and cfg.trainer.accelerator == "cpu":
        objs["trainer"] = instantiate(
            cfg.trainer, strategy=objs["strategy"], callbacks=objs["callbacks"], logger=objs["loggers"] or False
        )
    return objs


def large_batch_of(objs: dict) -> LargeBatchScaling:
    (lb,) = [c for c in objs["callbacks"] if isinstance(c, LargeBatchScaling)]
    return lb


DEMO_CALLBACKS = {"large_batch", "checkpoint", "progress_bar", "requeue", "training_clock"}


# ------------------------------------------------------------------------------------------------ layout
def test_packaged_configs_are_conf(tmp_path):
    """``conf/`` is the single source of truth: the package's config dir is it, and package-data covers it."""
    assert Path(CONFIG_DIR).resolve() == CONF.resolve()
    yamls = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml"))
    assert len(yamls) > 20 and all(len(p.parts) <= 3 for p in yamls)  # covered by conf/*.yaml + conf/**/*.yaml
    for group, wanted in {
        "model": {"googlenet", "nin"},
        "data": {"imagenet", "demo"},
        "trainer": {"cpu", "gpu"},
        "callbacks": {"default", "demo", "large_batch", "checkpoint", "lr_monitor", "progress_bar", "requeue"},
        "logger": {"csv", "tensorboard"},
        "experiment": {"paper_googlenet_1024", "paper_nin", "demo"},
        "hydra/launcher": {"submitit_slurm"},
    }.items():
        assert wanted <= set(options(group)), group
    # an algorithm is chosen with strategy.algorithm=<name>, not by a yaml per algorithm
    assert set(options("strategy")) == {"ddp", "firecaffe"}


# ------------------------------------------------------------------------------------------------ compose
def test_default_config_is_the_embedded_demo(tmp_path):
    cfg = compose_cfg(tmp_path)
    assert cfg.data._target_.endswith("demo_datamodule")
    assert cfg.strategy._target_ == "lightning_firecaffe.FireCaffeStrategy"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2
    assert set(cfg.callbacks) == DEMO_CALLBACKS  # no LR monitor
    assert cfg.data.batch_size * cfg.trainer.devices == cfg.global_batch_size == 64
    # the demo's LR: 0.01 at batch 32, the only callback setting the run changes
    assert cfg.model.lr == 0.01
    assert {k: v for k, v in cfg.callbacks.large_batch.items() if v is not None} == {
        "_target_": "lightning_firecaffe.callbacks.LargeBatchScaling",
        "reference_batch": 32,
    }
    # experiment=demo is the same run
    demo = compose_cfg(tmp_path, "experiment=demo")
    assert {k: demo[k] for k in demo if k != "hydra"} == {k: cfg[k] for k in cfg if k != "hydra"}


def test_default_run_scales_the_lr_linearly_from_batch_32(tmp_path):
    objs = build_all(compose_cfg(tmp_path), trainer=False)
    assert type(objs["model"].backbone).__name__ == "NiN"
    lb = large_batch_of(objs)
    assert (lb.rule, lb.reference_batch, lb.warmup, lb.decay, lb.power) == ("linear", 32, 0, "poly", 0.5)
    assert lb.base_lr is None and lb.log_name == "lr"  # the model's lr (0.01) is the base: 0.02 at batch 64


def test_command_line_groups_win_over_the_default_experiment(tmp_path):
    objs = build_all(compose_cfg(tmp_path, "model=googlenet", "callbacks=none"), trainer=False)
    assert type(objs["model"].backbone).__name__ == "GoogLeNet" and objs["callbacks"] == []


@pytest.mark.parametrize(
    "override",
    [f"{group}={o}" for group in ("model", "strategy", "trainer", "logger", "data") for o in options(group)]
    + [f"callbacks={o}" for o in ("default", "demo", "none")],
)
def test_every_group_option_instantiates(override, tmp_path):
    extra = [f"paths.imagenet={tmp_path}"] if override == "data=imagenet" else []
    objs = build_all(compose_cfg(tmp_path, override, *extra))
    assert isinstance(objs["model"], torch.nn.Module)
    from lightning.pytorch.strategies import DDPStrategy

    assert isinstance(objs["strategy"], DDPStrategy)
    if "trainer" in objs:
        assert objs["trainer"].world_size == 2 and objs["trainer"].strategy is objs["strategy"]


@pytest.mark.parametrize("override, loggers", [("logger=none", 0), ("logger=csv", 1), ("logger=many", 2)])
def test_logger_options_build_their_loggers(override, loggers, tmp_path):
    assert len(build_all(compose_cfg(tmp_path, override), trainer=False)["loggers"]) == loggers


def test_lr_monitor_is_opt_in(tmp_path):
    cfg = compose_cfg(tmp_path, "callbacks=[demo,lr_monitor]")
    assert set(cfg.callbacks) == DEMO_CALLBACKS | {"lr_monitor"}
    assert cfg.callbacks.large_batch.reference_batch == 32


@pytest.mark.parametrize("algorithm", ["auto", *algorithm_names()])
def test_the_algorithm_is_an_option_of_strategy_firecaffe(algorithm, tmp_path):
    from lightning_firecaffe import FireCaffeStrategy

    objs = build_all(compose_cfg(tmp_path, "strategy=firecaffe", f"strategy.algorithm={algorithm}"))
    assert isinstance(objs["strategy"], FireCaffeStrategy) and objs["strategy"].algorithm == algorithm
    assert objs["trainer"].strategy is objs["strategy"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_instantiates(experiment, tmp_path):
    cfg = compose_cfg(tmp_path, f"experiment={experiment}", f"paths.imagenet={tmp_path}")
    objs = build_all(cfg)
    large_batch_of(objs)
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == cfg.global_batch_size


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_set_no_nulls(experiment):
    """An experiment sets what its run changes; a preset applies without nulling the base config's keys."""
    assert not re.search(r"\bnull\b", (CONF / "experiment" / f"{experiment}.yaml").read_text())


def test_paper_googlenet_takes_the_preset(tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=paper_googlenet_1024", f"paths.imagenet={tmp_path}")
    objs = build_all(cfg, trainer=False)
    lb = large_batch_of(objs)
    assert cfg.global_batch_size == 1024 and cfg.trainer.max_epochs == 72
    assert type(objs["model"].backbone).__name__ == "GoogLeNet" and objs["strategy"].algorithm == "tree"
    assert (lb.preset, lb.base_lr, lb.reference_batch, lb.rule, lb.decay, lb.power, lb.warmup) == (
        "firecaffe",
        0.08,
        1024,
        "linear",
        "poly",
        0.5,
        0,
    )
    assert (lb.momentum, lb.weight_decay) == (0.9, 2e-4)


def test_paper_nin_keeps_its_recipe(tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=paper_nin", f"paths.imagenet={tmp_path}")
    objs = build_all(cfg, trainer=False)
    lb = large_batch_of(objs)
    assert type(objs["model"].backbone).__name__ == "NiN" and objs["data"].num_classes == 1000
    assert objs["strategy"].algorithm == "tree" and objs["model"].hparams.lr == 0.01
    assert (lb.rule, lb.reference_batch, lb.decay, lb.step_size, lb.gamma) == ("linear", 256, "step", 12, 0.1)


def test_slurm_launcher_is_wired_from_the_trainer(tmp_path):
    import_or_missing("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher is not installed")
    cfg = compose_cfg(tmp_path, "hydra/launcher=submitit_slurm", "trainer.devices=4", "trainer.num_nodes=3")
    assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.nodes == 3
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["tasks_per_node"] == 4 and launcher.params["nodes"] == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        # spanning groups: app_checks' own checks
        (
            ["global_batch_size=100", "trainer.devices=3"],
            "global_batch_size=100 does not divide across trainer.devices=3",
        ),
        (["trainer.devices=auto"], "trainer.devices='auto' must be a positive integer"),
        (
            ["callbacks.large_batch.warmup=8", "trainer.max_epochs=8"],
            "callbacks.large_batch.warmup=8 epochs is not shorter than training (trainer.max_epochs=8)",
        ),
        (
            ["callbacks.large_batch.warmup=1", "trainer.max_epochs=2", "trainer.max_steps=5"],
            "callbacks.large_batch.warmup=1 epochs (= 160 steps of global_batch_size=64 over 10240 images) is not "
            "shorter than trainer.max_steps=5",
        ),
        (["data=imagenet", "paths.imagenet=null"], "paths.imagenet is not set"),
        (
            ["model.lr_policy=poly"],
            "model.lr_policy='poly' must be 'fixed' while LargeBatchScaling sets the learning rate",
        ),
        # one group: the constructor's check, reported under its config key
        (["strategy.arity=1"], "strategy.arity=1 must be an integer >= 2"),
        (["strategy.algorithm=butterfly"], "strategy.algorithm='butterfly' is not one of auto, "),
        (["strategy.compression=int8"], "strategy.compression='int8' is not one of None, 'bf16', 'fp16'"),
        (
            ["strategy.compression=powersgd", "strategy.powersgd_rank=0"],
            "strategy.powersgd_rank=0 must be an integer >= 1",
        ),
        (
            ["strategy.compression=powersgd", "strategy.powersgd_wire=fp16"],
            "strategy.powersgd_wire='fp16' cannot be 'fp16'",
        ),
        (["strategy.model_averaging_period=0"], "strategy.model_averaging_period=0 must be None (local SGD off)"),
        (
            ["strategy.model_averaging_period=4", "strategy.averaging_wire=fp16"],
            "strategy.averaging_wire='fp16' is not supported",
        ),
        (["callbacks.large_batch.rule=x"], "callbacks.large_batch.rule='x' is not one of linear, sqrt, none"),
        (
            ["callbacks.large_batch.reference_batch=0"],
            "callbacks.large_batch.reference_batch=0 must be an integer >= 1",
        ),
        (["callbacks.large_batch.preset=alexnet"], "callbacks.large_batch.preset='alexnet' is not one of firecaffe"),
        (["model.lr=-1"], "model.lr=-1 must be a positive, finite learning rate"),
        # a constructor that raises a plain ValueError: the message under the group's key
        (
            ["+callbacks.bad._target_=fractions.Fraction", "+callbacks.bad.numerator=x"],
            "callbacks.bad: Invalid literal for Fraction: 'x'",
        ),
    ],
)
def test_invalid_settings_are_reported_with_their_config_key(overrides, message, tmp_path):
    with pytest.raises(app_checks.ConfigError) as err:
        app_checks.build(compose_cfg(tmp_path, *overrides))
    assert message in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = compose_cfg(tmp_path, "strategy.arity=1", "callbacks.large_batch.rule=x", "model.lr=-1")
    with pytest.raises(app_checks.ConfigError) as err:
        app_checks.build(cfg)
    lines = str(err.value).splitlines()[1:]
    assert [line.split("=")[0].strip(" -") for line in lines] == [
        "model.lr",
        "strategy.arity",
        "callbacks.large_batch.rule",
    ], str(err.value)
