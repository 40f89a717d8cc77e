"""``Fabric(strategy="firecaffe")`` on 2 CPU ranks, as a user runs a plain Fabric loop: bitwise the weights of
``strategy="ddp"`` (plain, accumulating under ``no_backward_sync``, bf16-mixed; launched by Fabric's
subprocess launcher, by its spawn launcher and by ``fabric run``), and a ``fabric.save``/``fabric.load``
resume with a 16-bit wire, error feedback and tuned ``auto`` that continues bitwise like a straight run.

To keep CI short, one launch runs every configuration of the subprocess launcher one after another in
the same ranks (``scripts/fabric_job.py --runs``); the other launchers get one run each.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_firecaffe.testing.ranks import run_in_session

SCRIPT = Path(__file__).parent / "scripts" / "fabric_job.py"
CONFIGS = ("plain", "accum", "bf16")
CLI = ("LT_CLI_USED",)  # set by `fabric run`: a job started from a test must not inherit it


def launch(out: Path, *runs: str, cli: bool = False, timeout: float = 150) -> str:
    """Run the script as a user would (its launcher re-runs the command line), in its own session."""
    command = [sys.executable, str(SCRIPT)]
    if cli:
        command = [str(Path(sys.executable).parent / "fabric"), "run", "--accelerator", "cpu", "--devices", "2"]
        command.append(str(SCRIPT))
    try:
        returncode, output = run_in_session([*command, "--out", out, "--runs", *runs], timeout=timeout, drop=CLI)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the job hung ({timeout} s):\n{hung.output[-5000:]}")
    assert returncode == 0, output[-5000:]
    return output


def weights(out: Path, name: str, config: str, rank: int) -> dict:
    return torch.load(out / f"{name}-{config}-rank{rank}.pt")


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different} differ (max {max((a[k] - b[k]).abs().max() for k in different)})"


@pytest.fixture(scope="module")
def popen_runs(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fabric")
    runs = [f"firecaffe:{c}" for c in CONFIGS] + ["firecaffe:ef"] + [f"ddp:{c}" for c in CONFIGS]
    return out, launch(out, *runs)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("config", CONFIGS)
def test_weights_on_every_rank_are_bitwise_those_of_ddp(popen_runs, config):
    out, _ = popen_runs
    for rank in (0, 1):
        assert_bitwise_equal(weights(out, "firecaffe", config, rank), weights(out, "ddp", config, rank), config)
        facts = json.loads((out / f"facts-firecaffe-{config}-rank{rank}.json").read_text())
        assert facts["comm_hook"] == "firecaffe_hook", facts  # the tree ran, not DDP's own all-reduce
        assert facts["steps"] == 6, facts  # accumulation: 12 backwards, 6 reductions (no_backward_sync sent nothing)


@pytest.mark.timeout(200)
def test_telemetry_a_fabric_user_can_log_and_the_end_of_run_summary(popen_runs):
    out, output = popen_runs
    metrics = json.loads((out / "facts-firecaffe-plain-rank0.json").read_text())["metrics"]
    assert {"firecaffe/exposed_s", "firecaffe/busy_s", "firecaffe/bytes_sent", "firecaffe/bytes_received"} <= set(
        metrics
    ), metrics
    assert all(isinstance(v, float) for v in metrics.values()) and metrics["firecaffe/bytes_sent"] > 0
    assert "FireCaffe (auto): 6 steps, buckets on the wire" in output, output[-3000:]
    assert "Gradients travelled as bf16" in output, output[-3000:]


@pytest.mark.timeout(200)
def test_spawn_launcher_and_fabric_run_give_ddps_weights(popen_runs, tmp_path):
    out, _ = popen_runs
    spawn, cli = tmp_path / "spawn", tmp_path / "cli"
    spawn.mkdir(), cli.mkdir()
    launch(spawn, "firecaffe_spawn:plain")
    launch(cli, "firecaffe:plain", cli=True)
    for rank in (0, 1):
        ddp = weights(out, "ddp", "plain", rank)
        assert_bitwise_equal(weights(spawn, "firecaffe_spawn", "plain", rank), ddp, "spawn launcher")
        assert_bitwise_equal(weights(cli, "firecaffe", "plain", rank), ddp, "fabric run")
    for out_dir in (spawn, cli):  # the script leaves its groups alone: the strategy ended them after success
        exits = {rank: json.loads((out_dir / f"exit-rank{rank}.json").read_text()) for rank in (0, 1)}
        assert exits == {0: {"groups_alive": False}, 1: {"groups_alive": False}}, out_dir.name


@pytest.mark.timeout(200)
def test_save_then_load_in_a_fresh_run_continues_bitwise_like_a_straight_run(popen_runs):
    """bf16 wire, error feedback, tuned auto: the checkpoint carries the residuals and auto's choices (the
    straight run saved it on its way: tuned choices follow timings, so two straight runs may differ)."""
    out, _ = popen_runs
    launch(out, "firecaffe:ef_resume")
    for rank in (0, 1):
        saved = json.loads((out / f"saved-choices-rank{rank}.json").read_text())
        assert saved, "auto had not settled before the save: the test proves nothing about its choices"
        assert json.loads((out / f"restored-choices-rank{rank}.json").read_text()) == saved
        straight = weights(out, "firecaffe", "ef", rank)
        assert_bitwise_equal(weights(out, "firecaffe", "ef_resume", rank), straight, "resumed run")
