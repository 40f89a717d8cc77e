"""``firecaffe-train``, the Hydra app: every config composes and instantiates; the app runs, takes overrides,
refuses bad ones (Hydra's errors and our own config checks) and runs Hydra multiruns with 2 processes per job.

Compose tests use Hydra's compose API on the packaged configs (``lightning_firecaffe/conf`` -> ``conf/``) and
build every object except by ``Trainer.fit``; the training tests run the console script in a subprocess
(the firecaffe strategy's popen launcher re-runs ``sys.argv``, which inside pytest would be pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_firecaffe import app_checks
from lightning_firecaffe.train import CONFIG_DIR, instantiate_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCRIPT = Path(sys.executable).with_name("firecaffe-train")
# conf/hydra/launcher/submitit_slurm.yaml shadows (and lists every key of) the plugin's schema of the same name
pytestmark = pytest.mark.filterwarnings("ignore:.*validated against ConfigStore schema")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(tmp_path: Path, *overrides: str):
    """The composed config with the Hydra node (``${hydra:...}`` resolves), outputs under ``tmp_path``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def build_all(cfg, trainer: bool = True) -> dict:
    """Everything train.py builds, except that nothing is fit."""
    app_checks.validate(cfg)
    objs = {
        "model": instantiate(cfg.model),
        "data": instantiate(cfg.data),
        "strategy": instantiate(cfg.strategy),
        "callbacks": instantiate_dict(cfg.callbacks, "callbacks"),
        "loggers": instantiate_dict(cfg.logger, "logger"),
    }
    if trainer and cfg.trainer.accelerator == "cpu":
        objs["trainer"] = instantiate(
            cfg.trainer, strategy=objs["strategy"], callbacks=objs["callbacks"], logger=objs["loggers"] or False
        )
    return objs


# ------------------------------------------------------------------------------------------------ layout
def test_packaged_configs_are_conf(tmp_path):
    """``conf/`` is the single source of truth: the package's config dir is it, and package-data covers it."""
    assert Path(CONFIG_DIR).resolve() == CONF.resolve()
    yamls = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml"))
    assert len(yamls) > 20 and all(len(p.parts) <= 3 for p in yamls)  # covered by conf/*.yaml + conf/**/*.yaml
    for group, wanted in {
        "model": {"googlenet", "nin"},
        "data": {"imagenet", "demo"},
        "strategy": {"firecaffe", "firecaffe_tree", "firecaffe_ring", "ddp", "parameter_server"},
        "trainer": {"cpu", "gpu"},
        "callbacks": {"default", "large_batch", "checkpoint", "lr_monitor", "progress_bar"},
        "logger": {"csv", "tensorboard"},
        "experiment": {"paper_googlenet_1024", "paper_nin", "demo"},
        "hydra/launcher": {"submitit_slurm"},
    }.items():
        assert wanted <= set(options(group)), group
    import lightning_firecaffe

    expected = {f"firecaffe_{a}" for a in lightning_firecaffe.ALGORITHMS if a != "parameter_server"}
    assert expected <= set(options("strategy"))


# ------------------------------------------------------------------------------------------------ compose
def test_default_config_is_the_embedded_demo(tmp_path):
    cfg = compose_cfg(tmp_path)
    assert cfg.model.backbone._target_.endswith("NiN") and cfg.data._target_.endswith("demo_datamodule")
    assert cfg.strategy._target_ == "lightning_firecaffe.FireCaffeStrategy"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2
    assert set(cfg.callbacks) == {"large_batch", "checkpoint", "lr_monitor", "progress_bar"}
    assert cfg.data.batch_size * cfg.trainer.devices == cfg.global_batch_size
    # experiment=demo pins the same run
    demo = compose_cfg(tmp_path, "experiment=demo")
    for key in ("model", "data", "strategy", "global_batch_size", "callbacks.large_batch"):
        assert OmegaConf.select(demo, key) == OmegaConf.select(cfg, key), key


@pytest.mark.parametrize(
    "override",
    [f"model={o}" for o in options("model")]
    + [f"strategy={o}" for o in options("strategy")]
    + [f"trainer={o}" for o in options("trainer")]
    + [f"callbacks={o}" for o in ("default", "none")]
    + [f"logger={o}" for o in options("logger")]
    + [f"data={o}" for o in options("data")],
)
def test_every_group_option_instantiates(override, tmp_path):
    extra = [f"paths.imagenet={tmp_path}"] if override == "data=imagenet" else []
    cfg = compose_cfg(tmp_path, override, *extra)
    objs = build_all(cfg)
    assert isinstance(objs["model"], torch.nn.Module)
    from lightning.pytorch.strategies import DDPStrategy

    assert isinstance(objs["strategy"], DDPStrategy)
    if override.startswith("strategy=firecaffe_") or override == "strategy=parameter_server":
        assert objs["strategy"].algorithm == override.split("=")[1].removeprefix("firecaffe_")
    if override == "callbacks=none":
        assert objs["callbacks"] == []
    if override.startswith("logger="):
        assert len(objs["loggers"]) == {"none": 0, "many": 2}.get(override.split("=")[1], 1)
    if "trainer" in objs:
        assert objs["trainer"].world_size == 2 and objs["trainer"].strategy is objs["strategy"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_instantiates(experiment, tmp_path):
    cfg = compose_cfg(tmp_path, f"experiment={experiment}", f"paths.imagenet={tmp_path}")
    objs = build_all(cfg)
    (lb,) = [c for c in objs["callbacks"] if type(c).__name__ == "LargeBatchScaling"]
    per_device = cfg.data.batch_size
    assert per_device * cfg.trainer.devices * cfg.trainer.num_nodes == cfg.global_batch_size
    if experiment == "paper_googlenet_1024":
        assert cfg.global_batch_size == 1024 and cfg.trainer.max_epochs == 72
        assert type(objs["model"].backbone).__name__ == "GoogLeNet" and objs["strategy"].algorithm == "tree"
        assert (lb.base_lr, lb.reference_batch, lb.rule, lb.decay, lb.power) == (0.08, 1024, "linear", "poly", 0.5)
        assert (lb.momentum, lb.weight_decay) == (0.9, 2e-4)
    if experiment == "paper_nin":
        assert type(objs["model"].backbone).__name__ == "NiN" and objs["data"].num_classes == 1000
        assert (lb.rule, lb.reference_batch, lb.decay) == ("linear", 256, "step")


def test_slurm_launcher_is_wired_from_the_trainer(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    cfg = compose_cfg(tmp_path, "hydra/launcher=submitit_slurm", "trainer.devices=4", "trainer.num_nodes=3")
    assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.nodes == 3
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["tasks_per_node"] == 4 and launcher.params["nodes"] == 3


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["global_batch_size=100", "trainer.devices=3"], ["global_batch_size=100", "trainer.devices=3"]),
        (["trainer.devices=auto"], ["trainer.devices='auto'"]),
        (["strategy.algorithm=butterfly"], ["strategy.algorithm='butterfly'"]),
        (["callbacks.large_batch.warmup=8"], ["callbacks.large_batch.warmup=8", "trainer.max_epochs=8"]),
        (["callbacks.large_batch.warmup=1", "trainer.max_steps=5"], ["callbacks.large_batch.warmup=1", "trainer.max_steps=5"]),
        (["callbacks.large_batch.rule=cubic"], ["callbacks.large_batch.rule='cubic'"]),
        (["data=imagenet", "paths.imagenet=null"], ["paths.imagenet"]),
    ],
)
def test_invalid_combinations_name_the_keys(overrides, keys, tmp_path):
    cfg = compose_cfg(tmp_path, *overrides)
    with pytest.raises(app_checks.ConfigError) as err:
        app_checks.validate(cfg)
    for key in keys:
        assert key in str(err.value)


# ------------------------------------------------------------------------------------------------ the app
def run_app(cwd: Path, *args: str, module: bool = False, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lightning_firecaffe.train"] if module else [str(SCRIPT)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def summary_of(r: subprocess.CompletedProcess, root: Path) -> dict:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (path,) = root.rglob("summary.json")
    return json.loads(path.read_text())


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_console_script_trains_three_steps_on_two_processes(tmp_path):
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e ."
    r = run_app(tmp_path, "data=demo", "model=nin", "trainer.max_steps=3")  # from outside the repository
    s = summary_of(r, tmp_path / "logs")
    assert s["global_step"] == 3 and s["world_size"] == 2 and s["strategy"] == "FireCaffeStrategy"
    assert 0 <= s["val_top1"] <= 1 and 0 <= s["val_top5"] <= 1
    assert s["communication"]["steps"] == 3 and s["communication"]["mb_sent"] > 0
    out = r.stdout
    assert "final validation top-1" in out and "gradient communication" in out and "checkpoints:" in out
    run_dir = Path(s["output_dir"])
    assert run_dir.parent == tmp_path / "logs" / "train" / "runs"
    assert (run_dir / "train_ddp_process_1.log").exists(), "the second rank did not run in the same run dir"
    assert len(list((tmp_path / "logs" / "train" / "runs").iterdir())) == 1
    assert (run_dir / "csv" / "metrics.csv").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_overrides_change_the_run(tmp_path):
    r = run_app(
        tmp_path, "trainer.max_steps=2", "global_batch_size=32", "strategy=firecaffe_ring", "logger=tensorboard",
        "callbacks.large_batch.rule=sqrt", "task_name=overridden", "rank_reports=true", module=True,
    )
    s = summary_of(r, tmp_path / "logs")
    assert s["global_step"] == 2 and s["communication"]["algorithm"] == "ring"
    assert "global batch 32 = 16 per device x 2 devices" in r.stdout + r.stderr
    assert "rule sqrt" in r.stdout + r.stderr
    run_dir = Path(s["output_dir"])
    assert run_dir.parent.parent.name == "overridden" and (run_dir / "tensorboard").is_dir()
    ranks = [json.loads((run_dir / "ranks" / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [f["global_rank"] for f in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert all(f["comm_hook"] == "firecaffe_hook" and f["world_size"] == 2 for f in ranks)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "override, message",
    [
        ("model=resnet50", "Could not find 'model/resnet50'"),
        ("trainer.no_such_key=1", "Could not override 'trainer.no_such_key'"),
        ("global_batch_size=[1", "override_grammar"),  # a syntax error
    ],
)
def test_bad_override_gives_hydras_error(override, message, tmp_path):
    r = run_app(tmp_path, override, timeout=50)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("*.ckpt"))


@pytest.mark.timeout(60)
def test_invalid_combination_fails_before_any_process_starts(tmp_path):
    r = run_app(tmp_path, "global_batch_size=100", "trainer.devices=3", timeout=50)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "global_batch_size=100 does not divide across trainer.devices=3" in r.stderr
    assert "Traceback" not in r.stderr and "Initializing distributed" not in r.stderr + r.stdout


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_multirun_runs_each_job_on_two_processes(tmp_path):
    """Basic launcher: the jobs run one after another in one process; each job's second rank must compose
    that job's config (not re-run the sweep) and write into that job's directory."""
    r = run_app(tmp_path, "-m", "global_batch_size=32,64", "trainer.max_steps=2", "rank_reports=true")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    jobs = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job, batch in zip(jobs, (32, 64)):
        s = json.loads((job / "summary.json").read_text())
        assert s["global_step"] == 2 and s["world_size"] == 2
        assert sorted(p.name for p in (job / "ranks").iterdir()) == ["rank0.json", "rank1.json"]
        assert OmegaConf.load(job / ".hydra" / "config.yaml").global_batch_size == batch
