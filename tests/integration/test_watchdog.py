"""The stall watchdog end to end on 2 CPU ranks: a user's project with one fault injected each time.

Every fault must end the job with a non-zero status within ``stall_timeout`` + 30 s of the fault, name the
rank to look at and what it was doing, and leave no process behind; a slow rank and a slow checkpoint
write must not be killed. Scripts run in subprocesses (the launcher re-runs the command line), in their
own session so that a test that fails still kills everything it started.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_firecaffe.processes import alive
from lightning_firecaffe.testing.ranks import run_in_session

SCRIPT = Path(__file__).parent / "scripts" / "watchdog_job.py"
T = 10.0  # stall_timeout of these tests


def run_job(out: Path, *args: str, timeout: float = 150) -> tuple[int, str]:
    command = [sys.executable, SCRIPT, "--out", out, "--stall-timeout", str(T), *args]
    try:
        return run_in_session(command, timeout=timeout)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the job hung ({timeout} s):\n{hung.output[-5000:]}")


def assert_stopped_in_time_and_nothing_left(out: Path, rc: int, output: str) -> None:
    assert rc != 0, output[-4000:]
    fault_at = float((out / "fault_at").read_text())
    assert time.time() - fault_at < T + 30, f"took {time.time() - fault_at:.0f} s after the fault\n{output[-4000:]}"
    pids = [int(p.read_text()) for p in (out / "pids").iterdir()]
    deadline = time.monotonic() + 5  # exiting processes close their pipes a moment before they are gone
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids and not [p.name for p in (out / "pids").iterdir() if alive(int(p.read_text()))], "processes left behind"


def caught(out: Path, rank: int) -> dict:
    return json.loads((out / f"caught-rank{rank}.json").read_text())


@pytest.mark.timeout(200)
def test_rank_blocked_in_validation_step_is_named_and_every_rank_stops(tmp_path):
    rc, output = run_job(tmp_path, "--fault", "validation")
    assert_stopped_in_time_and_nothing_left(tmp_path, rc, output)
    rank0 = [line for line in output.splitlines() if "rank 0" in line or line.startswith("  ")]
    assert "FireCaffe watchdog on rank 0: the job is stalled: rank 1 stopped progressing" in output, output[-4000:]
    assert any("rank 1 is alive but has not progressed" in line and "validation" in line for line in rank0)
    assert "Look at the log of rank 1." in output and "stopping rank 0 (exit code 70)" in output


@pytest.mark.timeout(200)
def test_rank_stuck_in_its_dataloader_worker_is_named_and_the_worker_killed(tmp_path):
    rc, output = run_job(tmp_path, "--fault", "dataloader", "--workers", "1")
    assert_stopped_in_time_and_nothing_left(tmp_path, rc, output)
    # rank 0 waits in the gradient all-reduce: the hook's deadline or the watchdog, whichever comes first, names rank 1
    named = [line for line in output.splitlines() if "rank 1 is alive but has not progressed" in line]
    assert named and all("fetching the next batch (DataLoader)" in line for line in named), output[-4000:]
    assert any(p.name.startswith("loader-rank1") for p in (tmp_path / "pids").iterdir()), "the worker ran"


@pytest.mark.timeout(200)
def test_rank_frozen_by_sigstop_is_named_as_not_responding(tmp_path):
    rc, output = run_job(tmp_path, "--fault", "sigstop", "--algorithm", "tree")
    assert_stopped_in_time_and_nothing_left(tmp_path, rc, output)
    assert "rank 1 is not responding: no heartbeat for" in output, output[-4000:]


@pytest.mark.timeout(200)
def test_raise_inside_the_comm_hook_reaches_the_user_as_peer_stall_error(tmp_path):
    rc, output = run_job(tmp_path, "--fault", "hook_raises", "--algorithm", "tree")
    assert rc != 0
    error = caught(tmp_path, 1)
    assert "PeerStallError" in error["mro"], error
    assert error["message"].startswith("FireCaffe all-reduce on rank 1: injected fault"), error
    assert "Unable to cast" not in error["message"]


@pytest.mark.timeout(200)
def test_peer_that_dies_reaches_the_user_as_peer_stall_error_naming_it(tmp_path):
    rc, output = run_job(tmp_path, "--fault", "dies", "--fault-rank", "0", "--algorithm", "tree")
    assert_stopped_in_time_and_nothing_left(tmp_path, rc, output)
    error = caught(tmp_path, 1)
    assert "PeerStallError" in error["mro"], error
    assert "rank 0" in error["message"] and "Unable to cast" not in error["message"], error


@pytest.mark.timeout(200)
def test_a_killed_peer_is_named_as_exited_never_as_alive(tmp_path):
    rc, output = run_job(tmp_path, "--fault", "dies", "--fault-rank", "1", "--algorithm", "tree")
    assert_stopped_in_time_and_nothing_left(tmp_path, rc, output)
    error = caught(tmp_path, 0)
    assert "PeerStallError" in error["mro"] and "rank 1" in error["message"], error
    assert "Watchdog: rank 1 has exited (its process is gone)" in error["message"], error
    assert "is alive" not in output, output[-4000:]


@pytest.mark.timeout(240)
def test_slow_rank_and_slow_checkpoint_are_not_killed_and_the_straggler_is_reported(tmp_path):
    rc, output = run_job(tmp_path, "--fault", "slow", "--max-steps", "8", timeout=220)
    assert rc == 0, output[-5000:]
    assert "the job is stalled" not in output
    result = json.loads((tmp_path / "result-rank0.json").read_text())
    assert result["global_step"] == 8
    seconds = {int(k): v for k, v in result["step_seconds"].items()}
    assert max(seconds, key=seconds.get) == 1 and seconds[1] / seconds[0] > 2, seconds
    assert "FireCaffe stragglers: rank 1 is a straggler" in output, output[-3000:]
