"""Emulated cluster (issue 5, acceptance 2): namespaces + bridge + tbf links, runs over them, no leftovers.

Tests that build a cluster need root, ``ip`` and ``tc``; they skip with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lightning_firecaffe.processes import alive
from lightning_firecaffe.testing.cluster import (
    ClusterRunError,
    ClusterTimeoutError,
    EmulatedCluster,
    can_emulate,
    down_all,
    list_runs,
    workloads,
)
from lightning_firecaffe.testing.iproute import ip, tc
from lightning_firecaffe.testing.required import needs

CAN_EMULATE, REASON = can_emulate()
needs_cluster = needs(CAN_EMULATE, REASON)
ROOT = Path(__file__).resolve().parents[2]


def _netns() -> set[str]:
    out = ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _root_links() -> set[str]:
    out = ip("-o", "link", "show", check=False).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


def _foreign_processes() -> set[tuple[int, str]]:
    """(pid, command line) of every live process outside our network namespace or running a rank worker."""
    own = os.readlink("/proc/self/ns/net")  # psutil does not know namespaces
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            net = os.readlink(f"/proc/{proc.pid}/ns/net")
        except OSError:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if alive(proc.pid) and (net != own or "cluster/worker.py" in cmd):
            found.add((proc.pid, cmd))
    return found


def _snapshot() -> dict:
    return {"netns": _netns(), "links": _root_links(), "procs": _foreign_processes()}


def assert_nothing_left(before: dict, run_id: str) -> None:
    deadline = time.monotonic() + 5
    while True:
        after = _snapshot()
        leftovers = {
            "netns": sorted(after["netns"] - before["netns"]),
            "links": sorted(after["links"] - before["links"]),
            "procs": sorted(after["procs"] - before["procs"]),
        }
        if not any(leftovers.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(leftovers.values()), leftovers
    assert run_id not in list_runs()


# --- no root needed -------------------------------------------------------------------------------------------


def test_can_emulate_gives_a_reason():
    ok, reason = can_emulate()
    assert isinstance(ok, bool) and reason
    if os.geteuid() != 0:
        assert not ok and "root" in reason


def test_cli_help_states_the_latency_limitation():
    from lightning_firecaffe.testing.cluster.__main__ import build_parser

    text = build_parser().format_help()
    assert "latency" in text and "netem" in text


# --- emulated cluster ---------------------------------------------------------------------------------------


@needs_cluster
@pytest.mark.timeout(120)
def test_all_reduce_over_three_hosts_and_nothing_left():
    before = _snapshot()
    with EmulatedCluster(hosts=3, rate="1gbit") as cluster:
        run_id = cluster.run_id
        assert set(cluster.host_namespaces) | {cluster.bridge_namespace} <= _netns()
        assert _root_links() == before["links"]  # everything lives inside the cluster's namespaces
        for ns in (*cluster.host_namespaces, cluster.bridge_namespace):
            qdiscs = tc("-n", ns, "qdisc", "show", check=False).stdout
            assert "tbf" in qdiscs and "rate 1Gbit" in qdiscs, (ns, qdiscs)
        stats0 = cluster.link_stats()

        results = cluster.run(workloads.all_reduce_check, kwargs={"numel": 100_000}, world_size=2, timeout=90)

        assert [r.rank for r in results] == [0, 1] and all(r.ok for r in results)
        assert [r.value["values"] for r in results] == [[3.0], [3.0]]  # 1 + 2 everywhere
        assert [r.value["host"] for r in results] == [0, 1]
        assert [r.value["addr"] for r in results] == ["10.77.0.1", "10.77.0.2"]
        stats1 = cluster.link_stats()
        for host in (0, 1):  # the 400 kB buffer really crossed both hosts' links
            assert stats1[host]["tx_bytes"] - stats0[host]["tx_bytes"] > 200_000
        assert stats1[2]["tx_bytes"] - stats0[2]["tx_bytes"] < 10_000  # host 2 ran no rank
    assert not cluster.is_up
    assert_nothing_left(before, run_id)


@needs_cluster
@pytest.mark.timeout(120)
def test_workload_that_raises_propagates_and_cleans_up():
    before = _snapshot()
    with pytest.raises(ClusterRunError) as info:
        with EmulatedCluster(hosts=3, rate="1gbit") as cluster:
            run_id = cluster.run_id
            cluster.run(
                workloads.fail, kwargs={"message": "boom on rank 1", "rank": 1}, world_size=2, timeout=60, fail_fast=1.0
            )
    err = info.value
    assert "boom on rank 1" in str(err)
    assert isinstance(err.__cause__, ValueError) and str(err.__cause__) == "boom on rank 1"
    failed = err.results[1]
    assert failed.returncode == 1 and "ValueError: boom on rank 1" in failed.error
    assert not err.results[0].ok  # its peer died: it failed or was killed, but did not hang
    assert_nothing_left(before, run_id)


@needs_cluster
@pytest.mark.timeout(120)
def test_exception_in_the_block_and_timeout_kill_everything():
    before = _snapshot()
    with pytest.raises(KeyError, match="raised in the with block"):
        with EmulatedCluster(hosts=2, rate=None) as cluster:
            run_id = cluster.run_id
            sleeper = cluster.popen(1, ["sleep", "300"])
            with pytest.raises(ClusterTimeoutError) as info:
                cluster.run(["sleep", "300"], timeout=1.0)
            assert [r.timed_out for r in info.value.results] == [True, True]
            assert sleeper.poll() is None
            raise KeyError("raised in the with block")
    assert sleeper.poll() is not None
    assert_nothing_left(before, run_id)


@needs_cluster
@pytest.mark.timeout(120)
def test_links_are_shaped():
    # 20 MB at 200 Mbit/s is 0.8 s on the wire; unshaped it takes ~0.05 s here.  A loose lower bound.
    with EmulatedCluster(hosts=2, rate="200mbit") as cluster:
        results = cluster.run(workloads.p2p_time, kwargs={"nbytes": 20e6}, timeout=90)
    assert all(r.value["correct"] for r in results)
    assert results[1].value["seconds"] >= 0.7, results[1].value


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_cluster
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_run_torn_down_on_signal(sig):
    """`python -m lightning_firecaffe.testing.cluster run ... -- sleep` killed with SIGTERM or Ctrl-C leaves nothing."""
    before, runs_before = _snapshot(), set(list_runs())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "lightning_firecaffe.testing.cluster",
        "run",
        "--hosts",
        "2",
        "--rate",
        "1gbit",
        "--",
        "sleep",
        "300",
    ]
    # Ctrl-C as from a terminal: SIGINT at its default in the CLI, even where this worker inherited it ignored
    # (an ignored SIGINT is inherited across exec, and the CLI then never hears the signal: seen under xdist)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    try:
        deadline = time.monotonic() + 60
        run_id = None
        while run_id is None and time.monotonic() < deadline and proc.poll() is None:
            # up, and both ranks started (they are `sleep` inside the namespaces)
            new = {pid for pid, cmdline in _foreign_processes() - before["procs"] if cmdline.startswith("sleep")}
            runs = set(list_runs()) - runs_before
            if len(new) == 2 and len(runs) == 1:
                run_id = runs.pop()
            time.sleep(0.1)
        assert run_id is not None, proc.communicate(timeout=30)
        proc.send_signal(sig)
        out, err = proc.communicate(
            timeout=120
        )  # nothing left is the point, not speed (a loaded machine took > 30 s once)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, (out, err)
    assert_nothing_left(before, run_id)


@needs_cluster
@pytest.mark.timeout(120)
def test_down_all_removes_leftovers_of_a_killed_run():
    before = _snapshot()
    cluster = EmulatedCluster(hosts=2, rate="1gbit", keep=True).up()  # as if its owner had been SIGKILLed
    created, cluster._created = cluster._created, []  # forget it: only down_all can find it now
    try:
        cluster.popen(0, ["sleep", "300"])
        assert cluster.run_id in list_runs()
        removed = down_all(run_id=cluster.run_id)
    finally:
        cluster._created = [n for n in created if n in _netns()]
        cluster.down()
    assert sorted(removed) == sorted([cluster.bridge_namespace, *cluster.host_namespaces])
    assert_nothing_left(before, cluster.run_id)
