"""Network faults on the emulated cluster (3 hosts, one rank each), as a user on a real cluster meets them:
a host's link goes down for good mid-training, a link flaps (down 3 s, then up), a link becomes 10x slower.
Needs root, ``ip`` and ``tc``; skipped with the reason otherwise.
"""

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_firecaffe.testing.cluster import INTERFACE, EmulatedCluster, can_emulate
from lightning_firecaffe.testing.required import needs

CAN_EMULATE, REASON = can_emulate()
pytestmark = needs(CAN_EMULATE, REASON)
SCRIPT = Path(__file__).parent / "scripts" / "watchdog_job.py"
T = 10.0
HOSTS = 3
JOB = [
    "--devices",
    "1",
    "--num-nodes",
    str(HOSTS),
    "--algorithm",
    "tree",
    "--stall-timeout",
    str(T),
    "--max-steps",
    "16",
    "--step-sleep",
    "0.3",
    "--mark-step",
    "4",
]


def train(cluster: EmulatedCluster, out: Path, fault=None, timeout: float = 150.0):
    """Train on every host; once every rank reached step 4, ``fault(cluster)`` runs (in this process).
    Returns the rank results and the time the fault started."""
    out.mkdir(parents=True, exist_ok=True)
    results, fault_at = {}, {}

    def run():
        results["ranks"] = cluster.run(
            [sys.executable, str(SCRIPT), "--out", str(out), *JOB],
            timeout=timeout,
            backend=None,
            check=False,
            fail_fast=None,
        )

    runner = threading.Thread(target=run)
    started = time.monotonic()
    runner.start()
    if fault is not None:
        deadline = time.monotonic() + timeout
        while len(list(out.glob("at-step-4-rank*"))) < HOSTS and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        fault_at["t"] = time.monotonic() - started  # seconds after the ranks started
        fault(cluster)
    runner.join()
    return results["ranks"], fault_at.get("t")


def link(cluster, host, state):
    subprocess_run = cluster.exec(host, ["ip", "link", "set", INTERFACE, state])
    assert subprocess_run.returncode == 0, subprocess_run.stderr


def output(result) -> str:
    return (result.stdout or "") + (result.stderr or "")


@pytest.mark.timeout(240)
def test_link_down_for_good_survivors_exit_naming_the_unreachable_rank(tmp_path):
    with EmulatedCluster(hosts=HOSTS, rate="1gbit") as cluster:
        ranks, fault_at = train(cluster, tmp_path, fault=lambda c: link(c, 2, "down"))
    assert fault_at is not None
    for r in ranks[:2]:  # the survivors
        text = output(r)
        assert r.returncode not in (0, None), text[-3000:]
        assert "rank 2" in text, text[-3000:]
    took = [r.duration - fault_at for r in ranks]
    assert max(took[:2]) < T + 30, f"survivors took {took} s after the link went down"
    isolated = output(ranks[2])
    assert ranks[2].returncode not in (0, None) and took[2] < T + 30, (took, isolated[-3000:])
    assert "rank 0 is not responding" in isolated or "cannot reach the rendezvous store" in isolated, isolated[-3000:]


@pytest.mark.timeout(300)
def test_link_flap_training_finishes_with_the_weights_of_a_clean_run(tmp_path):
    def flap(c):
        link(c, 1, "down")
        time.sleep(3)
        link(c, 1, "up")

    with EmulatedCluster(hosts=HOSTS, rate="1gbit") as cluster:
        clean, _ = train(cluster, tmp_path / "clean")
        flapped, _ = train(cluster, tmp_path / "flap", fault=flap)
    for r in clean + flapped:
        assert r.returncode == 0, output(r)[-3000:]
    a, b = torch.load(tmp_path / "clean" / "weights.pt"), torch.load(tmp_path / "flap" / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(240)
def test_ten_times_slower_link_training_finishes_and_the_straggler_report_names_its_rank(tmp_path):
    def slow(c):
        ns = c.host_namespaces[2]
        import subprocess

        for args in (
            ["-n", ns, "qdisc", "replace", "dev", INTERFACE],
            ["-n", c.bridge_namespace, "qdisc", "replace", "dev", "h2"],
        ):
            subprocess.run(
                ["tc", *args, "root", "tbf", "rate", "100mbit", "burst", "65536", "latency", "100ms"], check=True
            )

    with EmulatedCluster(hosts=HOSTS, rate="1gbit") as cluster:
        ranks, _ = train(cluster, tmp_path, fault=slow)
    for r in ranks:
        assert r.returncode == 0, output(r)[-3000:]
    assert "the job is stalled" not in "".join(output(r) for r in ranks)
    assert "rank 2's links are the slowest" in output(ranks[0]), output(ranks[0])[-3000:]  # the straggler report
