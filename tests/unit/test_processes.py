"""lightning_firecaffe.processes on real (tiny) process trees: stop leaves nothing, zombies are dead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from lightning_firecaffe import processes
from lightning_firecaffe.processes import alive, descendants, identity, running, stop

# A parent that starts a child that starts a grandchild (all sleeping), prints the three pids and sleeps.
# IGNORE_TERM=1: every process of the tree ignores SIGTERM (a rank blocked in C++ code does, in effect).
TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    if os.environ.get("IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    depth = int(sys.argv[1])
    pids = [os.getpid()]
    if depth > 0:
        child = subprocess.Popen([sys.executable, "-c", sys.argv[2], str(depth - 1), sys.argv[2]], stdout=subprocess.PIPE, text=True)
        pids += [int(p) for p in child.stdout.readline().split()]
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(60)
    """
)


def start_tree(ignore_term: bool = False) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "IGNORE_TERM": "1" if ignore_term else "0"}
    root = subprocess.Popen([sys.executable, "-c", TREE, "2", TREE], stdout=subprocess.PIPE, text=True, env=env)
    pids = [int(p) for p in root.stdout.readline().split()]
    assert len(pids) == 3 and all(alive(p) for p in pids)
    return root, pids


@pytest.fixture
def trees():
    started = []
    yield lambda **kw: started.append(start_tree(**kw)) or started[-1]
    for root, pids in started:  # whatever a failing test left
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        root.wait(timeout=10)


def test_descendants_are_the_whole_tree(trees):
    root, pids = trees()
    assert set(descendants(root.pid)) == set(pids[1:])


def test_stop_ends_a_tree_that_obeys_sigterm_without_killing(trees):
    root, pids = trees()
    assert stop([root.pid], grace_s=10) == []
    assert not any(alive(p) for p in pids)
    assert root.wait(timeout=5) == -15  # SIGTERM, and its exit status is still there for Popen (not reaped)


def test_stop_kills_what_ignores_sigterm_after_the_grace(trees):
    root, pids = trees(ignore_term=True)
    started = time.monotonic()
    killed = stop([root.pid], grace_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert sorted(killed) == sorted(pids)
    assert not any(alive(p) for p in pids)
    assert root.wait(timeout=5) == -9


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not reaped yet
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert psutil.pid_exists(child.pid) and not alive(child.pid)
    assert child.wait(timeout=5) == 0


def test_a_running_or_stopped_process_is_alive_and_an_unknown_pid_is_not():
    assert alive(os.getpid())
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(sleeper.pid, 19)  # SIGSTOP: frozen is not dead
        assert alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not alive(sleeper.pid)


# stop_descendants signals every descendant of the calling process: run it in a process of its own.
DESCENDANTS = textwrap.dedent(
    """
    import json, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])  # the module alone: importing the package (torch, Lightning) takes seconds
    from processes import alive, stop_descendants
    worker = subprocess.Popen(["sleep", "60"])                                        # e.g. a DataLoader worker
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])   # exits on its own
    frozen = subprocess.Popen(["sleep", "60"])                                        # a launched rank that hangs
    started = time.monotonic()
    killed = stop_descendants([rank.pid, frozen.pid], grace_s=1.5)
    print(json.dumps({
        "seconds": time.monotonic() - started,
        "killed": sorted(killed),
        "expected": sorted([worker.pid, frozen.pid]),
        "alive": [alive(p.pid) for p in (worker, rank, frozen)],
        "codes": [p.wait(timeout=5) for p in (worker, rank, frozen)],
    }))
    """
)


def test_stop_descendants_spares_launched_ranks_for_the_grace_only():
    here = os.path.dirname(processes.__file__)
    out = subprocess.run([sys.executable, "-c", DESCENDANTS, here], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["killed"] == result["expected"]  # the worker at once, the hanging rank after the grace
    assert result["alive"] == [False, False, False]
    assert result["codes"] == [-9, 0, -9]  # the rank that exited by itself was not signalled
    assert 1.5 <= result["seconds"] < 10


def test_identity_tells_a_process_that_exited_from_one_on_another_machine():
    child = subprocess.Popen(["sleep", "30"])
    token = identity(child.pid)
    assert running(identity()) is True and running(token) is True
    machine, pid, started = token.rsplit("/", 2)
    assert running(f"{machine}/{pid}/{float(started) - 5.0!r}") is False  # that pid now is another process
    assert running(f"another-boot/pid:[1]/{pid}/{started}") is None  # not ours to see
    assert running(None) is None
    child.kill()
    child.wait()
    assert running(token) is False
