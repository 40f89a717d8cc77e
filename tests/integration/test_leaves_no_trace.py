"""After ``Trainer(strategy="firecaffe").fit/validate/test/predict`` the process is as it was: no
environment variable of ours (gloo's interface selection sets GLOO_SOCKET_IFNAME while it runs), no thread;
and it exits with its process groups ended after a run that succeeded (gloo may abort the exit otherwise),
but not after one that failed (a destroy could wait on a dead peer)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from lightning_firecaffe.testing.ranks import run_launcher_script

SCRIPT = Path(__file__).parent / "scripts" / "leaves_no_trace.py"


def run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}  # interface selection must run
    return run_launcher_script([SCRIPT, out, *args], timeout=200, env=env)


def groups_alive_at_exit(out: Path, rank: int) -> bool:
    return json.loads((out / f"exit-rank{rank}.json").read_text())["groups_alive"]


@pytest.mark.timeout(240)
def test_environment_and_threads_are_as_before_on_every_rank(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        trace = json.loads((tmp_path / f"trace-rank{rank}.json").read_text())
        assert trace["gloo_interface_was_chosen"], "interface selection did not run: the test proves nothing"
        assert trace["changed"] == {}, trace
        assert trace["threads_left"] == [], trace
        assert groups_alive_at_exit(tmp_path, rank) is False


@pytest.mark.timeout(120)
def test_a_failed_fit_leaves_the_process_groups_for_the_exit_to_drop(tmp_path):
    proc = run_script(tmp_path, "--fail")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 caught: the user's model failed at step 2" in proc.stdout
    # rank 0 only: rank 1 fails alike, but rank 0's teardown may stop it (a launched rank) before it exits
    assert groups_alive_at_exit(tmp_path, 0) is True
