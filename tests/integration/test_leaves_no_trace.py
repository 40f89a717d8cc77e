"""After ``Trainer(strategy="firecaffe").fit/validate/test/predict`` the process is as it was: no
environment variable of ours (gloo's interface selection sets GLOO_SOCKET_IFNAME while it runs), no thread."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "leaves_no_trace.py"


@pytest.mark.timeout(240)
def test_environment_and_threads_are_as_before_on_every_rank(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR", "GLOO_SOCKET_IFNAME"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        trace = json.loads((tmp_path / f"trace-rank{rank}.json").read_text())
        assert trace["gloo_interface_was_chosen"], "interface selection did not run: the test proves nothing"
        assert trace["changed"] == {}, trace
        assert trace["threads_left"] == [], trace
