"""``firecaffe-train``, the Hydra app, run as a user runs it: trains on 2 processes, takes overrides, refuses
bad ones (Hydra's errors and our own config checks) before any process starts, and runs Hydra multiruns.

The console script runs in a subprocess (the firecaffe strategy's popen launcher re-runs ``sys.argv``,
which inside pytest would be pytest). The in-process config tests: tests/unit/test_app_config.py.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

SCRIPT = Path(sys.executable).with_name("firecaffe-train")
# conf/hydra/launcher/submitit_slurm.yaml shadows (and lists every key of) the plugin's schema of the same name
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*validated against ConfigStore schema"),
    pytest.mark.usefixtures("built_demo_set"),
]


# ------------------------------------------------------------------------------------------------ the app
def run_app(cwd: Path, *args: str, module: bool = False, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lightning_firecaffe.train"] if module else [str(SCRIPT)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def summary_of(r: subprocess.CompletedProcess, root: Path) -> dict:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (path,) = root.rglob("summary.json")
    return json.loads(path.read_text())


def lr_columns(header: list[str]) -> list[str]:
    """Columns that hold a learning rate: ``lr``, ``large_batch/lr``, LearningRateMonitor's ``lr-SGD``, ..."""
    return [c for c in header if "lr" in re.split(r"[/_.\-]", c)]


def test_lr_columns_finds_every_lr_name():
    header = ["epoch", "step", "lr", "large_batch/lr", "lr-SGD", "lr-SGD/pg1", "train/loss", "val/top1"]
    assert lr_columns(header) == ["lr", "large_batch/lr", "lr-SGD", "lr-SGD/pg1"]


@pytest.mark.timeout(180)
def test_console_script_trains_three_steps_on_two_processes(tmp_path):
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e ."
    # from outside the repository; the default run (the demo), logging every step
    r = run_app(tmp_path, "trainer.max_steps=3", "trainer.log_every_n_steps=1")
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
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    # one owner of the LR, one log: one column, one value per step (0.01 at batch 32 -> 0.02 at 64, poly 0.5)
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert lr_columns(list(rows[0])) == ["lr"]
    logged = {int(row["step"]): float(row["lr"]) for row in rows if row["lr"]}
    assert sum(1 for row in rows if row["lr"]) == 3
    assert logged == pytest.approx({i: 0.02 * (1 - i / 3) ** 0.5 for i in range(3)})


@pytest.mark.timeout(180)
def test_the_default_run_trains_its_epoch_within_a_minute_and_the_guard_leaves_it_alone(tmp_path):
    """README's first command, whole: 160 steps over the enlarged demo set, with the divergence guard on."""
    start = time.perf_counter()
    r = run_app(tmp_path)
    s = summary_of(r, tmp_path / "logs")
    print(f"default firecaffe-train: {time.perf_counter() - start:.0f} s in all, fit {s['fit_seconds']:.0f} s")
    assert s["global_step"] == 160 and s["epochs"] == 1 and s["val_top1"] > 0.5  # chance is 0.1
    assert s["fit_seconds"] < 60
    assert "training diverged" not in r.stderr


def _job_leaves_group(rank: int, world_size: int, fails: bool) -> bool:
    import torch.distributed as dist

    from lightning_firecaffe.train import _JobIsolation

    try:
        with _JobIsolation():
            dist.barrier()
            if fails:
                raise RuntimeError("the user's model failed")
    except RuntimeError:
        pass
    return dist.is_initialized()


@pytest.mark.timeout(60)
def test_a_job_that_succeeded_ends_its_process_group_and_a_failed_one_leaves_it():
    """A process that exits with its gloo group alive may abort at exit (SIGABRT after a run that passed, seen
    in CI); after a failure a destroy could wait on a dead peer, so the group stays for the exit to drop."""
    from lightning_firecaffe.testing.ranks import first_result, run_ranks

    for fails, alive in ((False, False), (True, True)):
        results = run_ranks(_job_leaves_group, 2, fails)
        first_result(results)  # raises, showing every failed rank, unless both ran
        assert [value for _, value in results.values()] == [alive, alive], f"job fails: {fails}"


@pytest.mark.timeout(180)
def test_overrides_change_the_run(tmp_path):
    r = run_app(
        tmp_path,
        "trainer.max_steps=2",
        "global_batch_size=32",
        "strategy.algorithm=ring",
        "logger=tensorboard",
        "callbacks.large_batch.rule=sqrt",
        "task_name=overridden",
        "rank_reports=true",
        module=True,
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
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["global_batch_size=100", "trainer.devices=3"],
            "global_batch_size=100 does not divide across trainer.devices=3",
        ),
        (["strategy.arity=1"], "strategy.arity=1 must be an integer >= 2"),
        (["callbacks.large_batch.rule=x"], "callbacks.large_batch.rule='x' is not one of linear, sqrt, none"),
    ],
)
def test_invalid_config_fails_before_any_process_starts(overrides, message, tmp_path):
    r = run_app(tmp_path, *overrides, timeout=50)
    assert r.returncode == 2, r.stderr[-3000:]
    assert message in r.stderr
    assert "Traceback" not in r.stderr and "Initializing distributed" not in r.stderr + r.stdout


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
