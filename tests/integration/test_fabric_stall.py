"""The watchdog under Fabric: a rank that hangs in the user's own loop (between steps, not in a collective
of ours) is named within stall_timeout + 30 s, and every rank exits non-zero, leaving no process behind."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_firecaffe.processes import alive
from lightning_firecaffe.testing.ranks import run_in_session

SCRIPT = Path(__file__).parent / "scripts" / "fabric_job.py"
T = 6.0  # stall_timeout


@pytest.mark.timeout(120)
def test_rank_stalled_in_the_users_loop_is_named_and_every_rank_stops(tmp_path):
    command = [sys.executable, SCRIPT, "--out", tmp_path, "--runs", "firecaffe:stall", "--stall-timeout", str(T)]
    try:
        returncode, output = run_in_session(command, timeout=100, drop=("LT_CLI_USED",))
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the job hung:\n{hung.output[-5000:]}")
    took = time.time() - float((tmp_path / "fault_at").read_text())
    assert took < T + 30, f"{took:.0f} s after the fault\n{output[-4000:]}"
    assert returncode != 0, output[-4000:]  # rank 0: the error naming rank 1
    assert "stopping rank 1 (exit code 70)" in output, output[-4000:]  # rank 1: its own watchdog
    named = [line for line in output.splitlines() if "rank 1 is alive but has not progressed" in line]
    assert named and all("after optimizer step 3: user code" in line for line in named), output[-4000:]
    stalled = [line for line in output.splitlines() if "the job is stalled" in line]
    assert stalled and all("rank 1" in line or "no rank has progressed" in line for line in stalled), output[-4000:]
    assert "rank 0 is alive but has not progressed" not in output, output[-4000:]  # rank 0 waits: not a culprit
    pids = [int(p.read_text()) for p in (tmp_path / "pids").iterdir()]
    deadline = time.monotonic() + 5
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids) == 2 and not [p for p in pids if alive(p)], "processes left behind"
