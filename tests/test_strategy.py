"""FireCaffeStrategy end to end on 2 CPU ranks: bitwise equal to DDP, hook really used, dead ranks named.

Trainings run as scripts in subprocesses: the ``ddp``/``firecaffe`` launchers re-run the command line.
"""

import csv
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lightning_firecaffe
from lightning_firecaffe import FireCaffeStrategy

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def train(out: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def trained(tmp_path_factory, name: str, *args: str) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp(name)
    proc = train(out, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "weights.pt"), json.loads((out / "facts.json").read_text()) | {"out": str(out)}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs: max |diff| {(a[key] - b[key]).abs().max()}"


# -- construction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, option, allowed",
    [
        ({"algorithm": "butterfly"}, "algorithm", "tree, pipelined_tree"),
        ({"arity": 1}, "arity", ">= 2"),
        ({"arity": 2.5}, "arity", ">= 2"),
        ({"chunk_bytes": 0}, "chunk_bytes", "positive"),
        ({"chunk_bytes": -5}, "chunk_bytes", "positive"),
        ({"stall_timeout": 0}, "stall_timeout", "positive"),
        ({"stall_timeout": -1.0}, "stall_timeout", "positive"),
        ({"stall_timeout": float("inf")}, "stall_timeout", "finite"),
        ({"ddp_comm_hook": lambda s, b: None}, "ddp_comm_hook", "own comm hook"),
        ({"link": "guess"}, "link", "'measure'"),
    ],
)
def test_bad_options_raise_value_error_naming_option_and_allowed_values(kwargs, option, allowed):
    with pytest.raises(ValueError) as err:
        FireCaffeStrategy(**kwargs)
    assert option in str(err.value) and allowed in str(err.value)


def test_registered_names_resolve_and_import_is_idempotent():
    from lightning.pytorch.strategies import StrategyRegistry

    importlib.reload(lightning_firecaffe)  # a second registration must not raise
    for name, start in [("firecaffe", "popen"), ("firecaffe_spawn", "spawn"), ("firecaffe_fork", "fork")]:
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, FireCaffeStrategy) and strategy._start_method == start
    assert StrategyRegistry.get("firecaffe_ring").algorithm == "ring"
    assert FireCaffeStrategy(bucket_cap_mb=1, gradient_as_bucket_view=True)._ddp_kwargs["bucket_cap_mb"] == 1


def test_trainer_accepts_the_name():
    from lightning.pytorch import Trainer

    trainer = Trainer(strategy="firecaffe", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FireCaffeStrategy)
    assert trainer.strategy.algorithm == "auto"


# -- training equals DDP ----------------------------------------------------------------------------------
pytestmark_mp = [pytest.mark.multiprocess, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each configuration trained once with DDP and once with FireCaffe (short 2-rank trainings)."""
    r = {}
    r["ddp"] = trained(tmp_path_factory, "ddp", "--strategy", "ddp")
    r["fc"] = trained(tmp_path_factory, "fc", "--strategy", "firecaffe")
    r["ddp_acc"] = trained(tmp_path_factory, "ddp_acc", "--strategy", "ddp", "--accumulate", "2")
    r["fc_acc"] = trained(
        tmp_path_factory, "fc_acc", "--object", "--algorithm", "auto", "--link", "measure", "--accumulate", "2"
    )
    r["ddp_unused"] = trained(tmp_path_factory, "ddp_unused", "--strategy", "ddp", "--unused")
    r["fc_unused"] = trained(tmp_path_factory, "fc_unused", "--object", "--algorithm", "pipelined_tree", "--unused")
    r["ddp_bf16"] = trained(tmp_path_factory, "ddp_bf16", "--strategy", "ddp", "--precision", "bf16-mixed")
    r["fc_bf16"] = trained(tmp_path_factory, "fc_bf16", "--strategy", "firecaffe_ring", "--precision", "bf16-mixed")
    r["ddp_buckets"] = trained(tmp_path_factory, "ddp_buckets", "--strategy", "ddp", "--bucket-cap-mb", "0.001")
    r["fc_buckets"] = trained(tmp_path_factory, "fc_buckets", "--object", "--algorithm", "double_tree", "--bucket-cap-mb", "0.001")
    r["ddp_spawn"] = r["ddp_fork"] = r["ddp"]  # the launcher does not change the arithmetic
    r["fc_spawn"] = trained(tmp_path_factory, "fc_spawn", "--strategy", "firecaffe_spawn")
    r["fc_fork"] = trained(tmp_path_factory, "fc_fork", "--strategy", "firecaffe_fork")
    return r


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
@pytest.mark.parametrize("variant", ["", "_acc", "_unused", "_bf16", "_buckets", "_spawn", "_fork"])
def test_weights_bitwise_equal_to_ddp_and_hook_really_ran(runs, variant):
    ddp_weights, ddp_facts = runs["ddp" + variant]
    fc_weights, fc_facts = runs["fc" + variant]
    assert fc_facts["global_step"] == ddp_facts["global_step"] >= 5
    assert fc_facts["world_size"] == 2
    assert fc_facts["comm_hook"] == "firecaffe_hook"
    assert fc_facts["bytes_sent"] > 0
    assert fc_facts["steps"] == fc_facts["global_step"], "one tree all-reduce per optimizer step"
    assert_bitwise_equal(fc_weights, ddp_weights)
    initial = torch.load(Path(fc_facts["out"]) / "initial.pt")
    trained_keys = [k for k in initial if not k.startswith("spare.")]  # the unused layer never trains
    assert all(not torch.equal(fc_weights[k], initial[k]) for k in trained_keys), "training changed nothing"


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_comm_metrics_reach_the_csv_logger(runs):
    metrics = next(Path(runs["fc"][1]["out"]).rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    waits = [float(r["firecaffe/comm_wait_s"]) for r in rows if r.get("firecaffe/comm_wait_s")]
    sent = [float(r["firecaffe/bytes_sent"]) for r in rows if r.get("firecaffe/bytes_sent")]
    assert len(waits) == 6 and all(w >= 0 for w in waits)
    params = 16 * 64 + 64 + 64 * 4 + 4
    assert all(s >= params * 4 / 2 for s in sent), "each rank sends at least half of the gradient per step"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_checkpoint_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    assert train(straight, "--max-steps", "20", "--save-every", "16").returncode == 0
    ckpt = next((straight / "ckpt").glob("*step=16*.ckpt"))
    resumed = tmp_path / "resumed"
    proc = train(resumed, "--max-steps", "20", "--resume", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((resumed / "facts.json").read_text())["global_step"] == 20
    assert_bitwise_equal(torch.load(resumed / "weights.pt"), torch.load(straight / "weights.pt"))


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_dead_rank_is_named_and_survivors_exit_nonzero(tmp_path):
    started = time.monotonic()
    proc = train(tmp_path, "--die-at", "3", "--stall-timeout", "20", timeout=120)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert elapsed < 90
    assert "FireCaffe all-reduce on rank 0: rank 1" in output, output[-4000:]
