"""A rank that dies mid-training is named as dead by every survivor, on every route a bucket can take.

2 CPU ranks, rank 1 exits (``os._exit``) at a training step; the strategy's stall timeout is 60 s, so an
error that waited for the deadline would show. Every survivor must exit non-zero within 20 s of the death
with a ``PeerStallError`` that names rank 1 and says it closed its connection - whether the bucket went
through a schedule (``tree``), the backend's all-reduce (``native``, the COLLECTIVE route), ``auto`` while
it tunes (timed trials on the worker), or ``auto`` after it has chosen - and nothing may call it alive.
"""

import json
import time

import pytest
from test_watchdog import assert_stopped_in_time_and_nothing_left, caught, run_job

CASES = {
    "native": ("--algorithm", "native", "--at", "3"),
    "tree": ("--algorithm", "tree", "--at", "3"),
    # rank 0 reaches its next post after the pair has closed: posting raises at once
    "tree-posting-to-a-closed-pair": ("--algorithm", "tree", "--at", "3", "--step-sleep", "1.0"),
    "auto-while-tuning": ("--algorithm", "auto", "--at", "2"),
    "auto-after-tuning": ("--algorithm", "auto", "--auto-repetitions", "1", "--at", "9", "--max-steps", "14"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_every_survivor_names_the_dead_rank_as_closed_within_20_s(tmp_path, case):
    rc, output = run_job(tmp_path, "--fault", "dies", "--stall-timeout", "60", *CASES[case], timeout=100)
    ended = time.time()
    assert rc != 0, output[-4000:]
    assert ended - float((tmp_path / "fault_at").read_text()) < 20, output[-4000:]
    error = caught(tmp_path, 0)
    message = error["message"]
    assert "PeerStallError" in error["mro"], error
    assert "rank 1 closed its connection" in message, message
    assert "did not finish within" not in message and "did not answer within 60" not in message, message
    assert "rank 1 is alive" not in message, message
    choices = json.loads((tmp_path / "choices-at-fault-rank0.json").read_text())
    if case == "auto-after-tuning":
        assert choices, "auto had not chosen yet: the case would test tuning, not its outcome"
    elif case == "auto-while-tuning":
        assert not choices, "auto had already chosen"
    assert_stopped_in_time_and_nothing_left(tmp_path, rc, output)


@pytest.mark.timeout(200)
def test_a_stopped_rank_on_the_collective_route_is_named_as_not_responding(tmp_path):
    """SIGSTOP keeps rank 1's connections open: silent, not dead. The watchdog (stall_timeout 10 s) names it."""
    rc, output = run_job(tmp_path, "--fault", "sigstop", "--algorithm", "native")
    assert_stopped_in_time_and_nothing_left(tmp_path, rc, output)
    assert "rank 1 is not responding: no heartbeat for" in output, output[-4000:]
    assert "rank 1 closed its connection" not in output, output[-4000:]
