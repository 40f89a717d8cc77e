"""Stack classification, torch's wrapped hook error undone, the straggler report, and the watchdog's
warn / fail actions with an in-memory store and a hand-driven clock."""

import subprocess
import threading

import pytest

from lightning_firecaffe.errors import PeerStallError, unwrap_hook_error
from lightning_firecaffe.processes import identity
from lightning_firecaffe.watchdog.errors import with_watchdog_view
from lightning_firecaffe.watchdog.monitor import STALL_EXIT_CODE, Watchdog
from lightning_firecaffe.watchdog.progress import Phase, Progress
from lightning_firecaffe.watchdog.stacks import Frame, Whereabouts, classify, stack_of
from lightning_firecaffe.watchdog.stragglers import link_report, slowest_links, straggler_report
from lightning_firecaffe.watchdog.verdict import Policy

SITE = "/venv/lib/python3.11/site-packages"


# -- stacks --------------------------------------------------------------------------------------------------
def test_collective_is_recognised_and_its_caller_named():
    frames = [
        Frame(f"{SITE}/torch/distributed/distributed_c10d.py", 2800, "all_reduce"),
        Frame(f"{SITE}/torch/distributed/c10d_logger.py", 81, "wrapper"),
        Frame(f"{SITE}/lightning/fabric/utilities/distributed.py", 230, "_sync_ddp"),
        Frame("/home/me/job.py", 40, "validation_step"),
    ]
    where = classify(frames)
    assert where.blocked_in.startswith(
        "torch.distributed.all_reduce (called from lightning/fabric/utilities/distributed.py:230 in _sync_ddp)"
    )
    assert where.at.startswith("lightning/fabric/utilities/distributed.py:230")


def test_user_code_called_from_inside_ddp_forward_is_not_a_collective():
    frames = [
        Frame("/usr/lib/python3.11/threading.py", 600, "wait"),
        Frame("/home/me/job.py", 40, "training_step"),
        Frame(f"{SITE}/torch/nn/parallel/distributed.py", 1600, "forward"),
    ]
    assert classify(frames) == Whereabouts(None, "home/me/job.py:40 in training_step")


def test_backward_and_ddp_internals_count_as_waiting():
    assert classify([Frame(f"{SITE}/torch/autograd/graph.py", 825, "_engine_run_backward")]).blocked_in.startswith(
        "backward"
    )
    assert (
        "DistributedDataParallel"
        in classify([Frame(f"{SITE}/torch/nn/parallel/distributed.py", 1500, "_sync_buffers")]).blocked_in
    )
    # FireCaffe's own waits for a peer (a census after a failed collective, NCCL's inline rounds)
    census = classify([Frame(f"{SITE}/lightning_firecaffe/transport.py", 36, "wait_within")]).blocked_in
    assert census.startswith("FireCaffe transport.wait_within")


def test_stack_of_a_real_blocked_thread():
    release = threading.Event()
    t = threading.Thread(target=release.wait, daemon=True)
    t.start()
    try:
        frames = stack_of(t.ident)
        assert frames[0].function == "wait" and classify(frames).blocked_in is None
    finally:
        release.set()
        t.join()


# -- errors --------------------------------------------------------------------------------------------------
MESSAGE = "FireCaffe all-reduce on rank 0: rank 1 did not answer within 10 s while receiving\nsecond line"


def test_wrapped_hook_error_becomes_peer_stall_error_with_the_clean_message():
    error = unwrap_hook_error(RuntimeError(f"Unable to cast {MESSAGE} to Tensor"))
    assert isinstance(error, PeerStallError) and str(error) == MESSAGE and error.peers == [1]


def test_the_recorded_original_is_preferred():
    original = PeerStallError(MESSAGE, [1])
    assert unwrap_hook_error(RuntimeError(f"Unable to cast {MESSAGE} to Tensor"), original) is original


def test_unrelated_runtime_errors_are_left_alone():
    assert unwrap_hook_error(RuntimeError("CUDA out of memory"), None) is None


def test_watchdog_view_is_appended_and_type_kept():
    error = with_watchdog_view(PeerStallError(MESSAGE, [1]), ["rank 1 is not responding: no heartbeat for 12 s"])
    assert (
        isinstance(error, PeerStallError) and error.peers == [1] and "Watchdog: rank 1 is not responding" in str(error)
    )


# -- stragglers ----------------------------------------------------------------------------------------------
def test_straggler_is_named_with_its_ratio():
    report = straggler_report({0: 0.10, 1: 0.31, 2: 0.11})
    assert "rank 1 is a straggler" in report and "3.0x" in report


def test_balanced_ranks_have_no_straggler():
    assert "no straggler" in straggler_report({0: 0.10, 1: 0.11})
    assert straggler_report({0: 0.1}) is None


# -- the watchdog's actions ----------------------------------------------------------------------------------
class MemoryStore:
    def __init__(self):
        self.beats, self.up = {}, True

    def publish(self, beat):
        if self.up:
            self.beats[beat.rank] = beat
        return self.up

    def read(self):
        return dict(self.beats) if self.up else None


def make(rank, store, clock, phase, blocked=None, action="fail", exits=None):
    progress = Progress()
    progress.current = Phase(1, phase, "normal", 7, 0.0)
    return Watchdog(
        rank,
        2,
        store,
        Policy(10.0),
        action=action,
        grace_s=5.0,
        interval_s=1.0,
        progress=progress,
        exit=(exits if exits is not None else []).append,
        clock=lambda: clock[0],
        whereabouts=lambda: Whereabouts(blocked, "job.py:40 in validation_step"),
        kill=lambda spare, wait_s: None,
    )


def run(watchdogs, clock, seconds):
    for _ in range(seconds):
        clock[0] += 1.0
        for w in watchdogs:
            w.check()


def test_both_ranks_warn_then_exit_with_the_stall_code(caplog):
    store, clock, exits = MemoryStore(), [0.0], []
    waiting = make(0, store, clock, "validation epoch end", blocked="torch.distributed.all_reduce", exits=exits)
    stuck = make(1, store, clock, "validation batch 0 (validation_step)", exits=exits)
    stuck.interval_s = 0.0  # (no pause before a culprit's exit in a unit test)
    run([waiting, stuck], clock, 12)  # rank 0 first hears of rank 1 at t=2: stalled for 10 s at t=12
    assert waiting.stall is not None and waiting.stall.culprit_ranks == [1] and not exits
    assert "the job is stalled" in caplog.text and "every rank stops in 5 s" in caplog.text
    run([waiting, stuck], clock, 5)
    assert exits == [STALL_EXIT_CODE, STALL_EXIT_CODE]
    assert "stopping rank 0" in caplog.text and "stopping rank 1" in caplog.text and "(this rank)" in caplog.text


def test_warn_only_never_exits():
    store, clock, exits = MemoryStore(), [0.0], []
    ws = [
        make(0, store, clock, "x", blocked="torch.distributed.barrier", action="warn", exits=exits),
        make(1, store, clock, "y", action="warn", exits=exits),
    ]
    run(ws, clock, 60)
    assert ws[0].stall is not None and exits == []


def test_dead_store_host_makes_the_others_exit_naming_it():
    store, clock, exits = MemoryStore(), [0.0], []
    survivor = make(
        1, store, clock, "train batch 3 (backward)", blocked="backward (the gradient all-reduce)", exits=exits
    )
    run([survivor], clock, 2)
    store.up = False  # rank 0, the store's host, is gone
    run([survivor], clock, 16)
    assert exits == [STALL_EXIT_CODE] and survivor.stall.culprit_ranks == [0]


def test_describe_calls_a_silent_peer_not_responding():
    store, clock = MemoryStore(), [0.0]
    a, b = make(0, store, clock, "x"), make(1, store, clock, "train batch 3 (training_step)")
    run([a, b], clock, 2)
    run(
        [a], clock, 4
    )  # rank 1 frozen: no more heartbeats (rank 0 heard the last one at t=3), not yet for stall_timeout
    assert a.describe([1]) == [
        "rank 1 is not responding: no heartbeat for 3 s; last in 'train batch 3 (training_step)' at global step 7"
    ]


def test_describe_reads_the_beats_now_and_names_a_rank_whose_process_exited():
    store, clock = MemoryStore(), [0.0]
    a, b = make(0, store, clock, "train batch 3 (backward)"), make(1, store, clock, "starting")
    rank1 = subprocess.Popen(["sleep", "30"])  # stands for rank 1's process, on this machine
    b._process = identity(rank1.pid)
    run([a], clock, 1)
    b.check()  # rank 1's only beat, published after rank 0's watchdog last read the store
    rank1.kill()
    rank1.wait()
    assert a.describe([1]) == a.describe([1], closed=True)
    assert a.describe([1])[0].startswith("rank 1 has exited (its process is gone) without leaving the training")


def test_describe_a_closed_peer_on_another_machine_as_gone_not_alive():
    store, clock = MemoryStore(), [0.0]
    a, b = make(0, store, clock, "train batch 3 (backward)"), make(1, store, clock, "starting")
    b._process = None  # another machine: its process cannot be seen from here
    run([a, b], clock, 1)
    (line,) = a.describe([1], closed=True)
    assert line.startswith("rank 1 closed its connection: its process exited or its host went away"), line


def test_every_ranks_step_seconds_travel_in_the_beats():
    store, clock = MemoryStore(), [0.0]
    a, b = make(0, store, clock, "x"), make(1, store, clock, "y")
    a.progress.step_seconds, b.progress.step_seconds = 0.1, 0.3
    run([a, b], clock, 1)
    assert a.step_seconds() == {0: 0.1, 1: 0.3}
    b.stop(error=PeerStallError("FireCaffe all-reduce on rank 1: rank 0 did not answer\ndetails", [0]))
    assert (
        store.beats[1].finished
        and store.beats[1].error == "PeerStallError: FireCaffe all-reduce on rank 1: rank 0 did not answer"
    )


def test_describe_also_names_a_silent_rank_behind_the_awaited_one():
    store, clock = MemoryStore(), [0.0]

    def still():
        progress = Progress()
        progress.current = Phase(1, "train batch 4 (backward)", "normal", 4, 0.0)
        return progress

    dogs = [
        Watchdog(
            r,
            3,
            store,
            Policy(10.0),
            interval_s=1.0,
            progress=still(),
            clock=lambda: clock[0],
            whereabouts=lambda: Whereabouts("backward (the gradient all-reduce)", None),
            exit=print,
            kill=lambda *a: None,
        )
        for r in range(3)
    ]
    run(dogs, clock, 2)
    run(dogs[:2], clock, 5)  # rank 2's link is down: rank 1 waits for rank 0, which waits for rank 2
    lines = dogs[1].describe([0])
    assert lines[0].startswith("rank 0 is blocked in backward") and lines[1].startswith("rank 2 is not responding")


def test_a_store_call_that_blocks_past_its_deadline_counts_as_failed():
    from lightning_firecaffe.watchdog.transport import StoreBeats
    from lightning_firecaffe.watchdog.verdict import Beat

    release = threading.Event()

    class BlockingStore:  # as a TCPStore client behaves while its link is down
        def set(self, key, value):
            release.wait()

        def check(self, keys):
            release.wait()

    beats = StoreBeats(BlockingStore(), 2, reachable=lambda: False)
    beats.deadline_s = 0.2
    try:
        assert beats.publish(Beat(0, 1, 1, "x")) is False
        assert beats.read() is None  # and later calls do not block either: the store counts as broken
    finally:
        release.set()


def test_the_rank_behind_a_slow_link_is_named_by_its_fastest_transfer():
    """Host 2's link is 10x slower: every transfer touching it is slow, its peers still have a fast one."""
    fast, slow = 0.008, 0.080
    times = {(0, 1): fast, (1, 0): fast, (0, 2): slow, (2, 0): slow, (1, 2): slow, (2, 1): slow}
    rank, seconds, ratio, _ = slowest_links(times)
    assert (rank, seconds, ratio) == (2, slow, pytest.approx(10.0))
    assert "rank 2's links are the slowest" in link_report(times, 1 << 20) and "10.0x" in link_report(times, 1 << 20)
    even = {k: fast for k in times}
    assert "no slow link" in link_report(even, 1 << 20)
    assert link_report({}, 1 << 20) is None


def test_peer_stall_error_survives_pickling_with_its_peers():
    """Launchers and submitit hand the user's exception back through pickle."""
    import pickle

    from lightning_firecaffe import PeerStallError

    again = pickle.loads(pickle.dumps(PeerStallError("FireCaffe all-reduce on rank 0: rank 1 closed", [1])))
    assert type(again) is PeerStallError and again.peers == [1] and "rank 1 closed" in str(again)


def test_the_link_probe_reports_a_failure_with_an_empty_message(monkeypatch, caplog):
    from lightning_firecaffe.watchdog import link_probe

    class Failing:
        def wait(self, timeout):
            raise RuntimeError("")  # gloo sometimes says nothing

    monkeypatch.setattr(link_probe.dist, "barrier", lambda async_op: Failing())
    assert link_probe.probe_links(0, 2, timeout_s=1.0) is None  # was: IndexError from splitlines()[0]
    assert "the link probe for the straggler report failed (RuntimeError(''))" in caplog.text


def test_a_goodbye_after_an_error_without_text_names_its_type():
    store, clock = MemoryStore(), [0.0]
    make(1, store, clock, "x").stop(error=RuntimeError(""))
    assert store.beats[1].finished and store.beats[1].error == "RuntimeError"
