"""The comm hook's hot path, in-process: the route table, the selector, wire sizes, layouts and errors.

A fake ``GradBucket`` and a fake executor/transport stand in for DDP and the network; the executor's
own behaviour is tested against real process groups in tests/integration.
"""

import os

import pytest
import torch

from lightning_firecaffe.comm.compression import WIRE_FORMATS, GradientCompression
from lightning_firecaffe.comm.cost_model import LinkModel
from lightning_firecaffe.comm.hook import (
    Decision,
    FireCaffeHookState,
    Route,
    ScheduleSelector,
    _FifoWorker,
    firecaffe_hook,
    route_for,
)
from lightning_firecaffe.comm.tuner import AutoTuner
from lightning_firecaffe.errors import PeerStallError
from lightning_firecaffe.transport import TransferCounters

WORLD = 4


class FakeBucket:
    def __init__(self, values, index=0, is_last=True, parameters=None):
        self._buffer = torch.as_tensor(values, dtype=torch.float32).clone()
        self._index, self._last = index, is_last
        self._parameters = parameters if parameters is not None else [torch.nn.Parameter(self._buffer.clone())]

    def buffer(self):
        return self._buffer

    def index(self):
        return self._index

    def is_last(self):
        return self._last

    def parameters(self):
        return self._parameters


class FakeWork:
    def __init__(self, failure=None):
        self.failure = failure

    def get_future(self):
        future = torch.futures.Future()
        if self.failure is None:
            future.set_result(None)
        else:
            future.set_exception(self.failure)
        return future


class FakeTransport:
    """World-size-many identical ranks: a sum is the buffer times WORLD, a MAX is the buffer itself."""

    rank, stall_timeout = 0, 60.0

    def __init__(self, failure=None):
        self.failure, self.collectives = failure, []

    def all_reduce(self, tensor, group=None, op=None):
        self.collectives.append((group, op))
        if op is None and self.failure is None:
            tensor.mul_(WORLD)
        return FakeWork(self.failure)

    def wait(self, work, peers, doing, **_):
        pass


class FakeExecutor:
    """Records which algorithm ran each bucket; sums like WORLD identical ranks; may raise instead."""

    def __init__(self, failure=None):
        self.ran, self.failure = [], failure
        self.counters = TransferCounters()
        self.transport = FakeTransport()

    def all_reduce_(self, buffer, schedule, *, bucket=0, step=0, wire=None, residual=None):
        if self.failure is not None:
            raise self.failure
        self.ran.append((bucket, schedule.algorithm, wire))
        self.counters.bytes_sent += buffer.numel() * (2 if wire is not None else buffer.element_size())
        buffer.mul_(WORLD)
        return buffer

    def modelled_bytes(self, schedule, buffer):
        return buffer.numel() * buffer.element_size(), buffer.numel() * buffer.element_size()

    def close(self):
        pass


def make_state(algorithm="tree", lockstep=False, executor=None, compression=None, tuner=False, beats=None):
    selector = ScheduleSelector(algorithm, WORLD, link=LinkModel())
    if tuner:
        selector.tuner = AutoTuner(WORLD, selector.link, selector.model_choice, repetitions=1)
    state = FireCaffeHookState(
        None,
        None,
        0,
        WORLD,
        selector,
        lockstep=lockstep,
        compression=compression,
        on_bucket=(beats.append if beats is not None else lambda index: None),
    )
    state._executor, state._pid = executor or FakeExecutor(), os.getpid()
    return state


class InlineWorker:
    def submit(self, job):
        job()


@pytest.fixture
def inline_worker(monkeypatch):
    """The worker thread, run in the caller: the route is the same, the test deterministic."""
    monkeypatch.setattr(FireCaffeHookState, "worker", property(lambda self: InlineWorker()))


# ------------------------------------------------------------------ the route table
@pytest.mark.parametrize(
    "decision, lockstep, exchange_follows, route",
    [
        (Decision("tree"), False, False, Route.WORKER),
        (Decision("tree"), True, False, Route.INLINE),
        (Decision("ring", trial=True), False, False, Route.WORKER),
        (Decision("native"), False, False, Route.COLLECTIVE),
        (Decision("native"), True, False, Route.COLLECTIVE),
        (Decision("native", trial=True), False, False, Route.WORKER),  # a trial is timed where it runs
        (Decision("native", trial=True), True, False, Route.INLINE),
        (Decision("native"), False, True, Route.WORKER),  # auto's exchange follows this bucket
    ],
)
def test_route_table(decision, lockstep, exchange_follows, route):
    assert route_for(decision, lockstep, exchange_follows) is route


# ------------------------------------------------------------------ the selector
def test_a_pinned_algorithm_is_never_a_trial():
    selector = ScheduleSelector("ring", WORLD)
    selector.buckets_rebuilt()
    assert selector.decide(1 << 20) == Decision("ring", False)


def test_auto_runs_the_cost_models_choice_until_ddp_has_rebuilt_its_buckets_then_times_every_candidate():
    selector = ScheduleSelector("auto", WORLD, link=LinkModel())
    selector.tuner = AutoTuner(WORLD, selector.link, selector.model_choice, repetitions=1)
    nbytes = 64 << 10
    assert selector.decide(nbytes) == Decision(selector.model_choice(nbytes), False)
    assert not selector.tuner.sizes and not selector.tuning  # nothing was started
    selector.buckets_rebuilt()
    trials = []
    for _ in range(len(selector.tuner.candidates_for(nbytes))):
        decision = selector.decide(nbytes)
        assert decision.trial
        trials.append(decision.algorithm)
        selector.tuner.record(nbytes, decision.algorithm, 0.01 if decision.algorithm == "native" else 0.02)
    assert trials == list(selector.tuner.candidates_for(nbytes)) and "native" in trials
    assert selector.decide(nbytes).trial is False  # measured: waiting for the exchange
    selector.tuner.exchange(lambda times: times)
    assert selector.decide(nbytes) == Decision("native", False) and not selector.tuning


def test_a_restored_choice_is_used_from_the_first_step():
    selector = ScheduleSelector("auto", WORLD, link=LinkModel())
    selector.tuner = AutoTuner.restored({4096: "tree"}, world_size=WORLD, link=selector.link, fallback=str)
    assert selector.decide(4096) == Decision("tree", False)


# ------------------------------------------------------------------ sizes and layouts
def test_wire_nbytes_is_what_travels():
    state = make_state()
    assert state.wire_nbytes(torch.zeros(10)) == 40
    state.compression = GradientCompression(WIRE_FORMATS["bf16"])
    assert state.wire_nbytes(torch.zeros(10)) == 20
    assert state.wire_nbytes(torch.zeros(10, dtype=torch.float16)) == 20  # already 16-bit: as it is
    assert state.wire_nbytes(torch.zeros(10, dtype=torch.float64)) == 20


def test_layout_follows_parameter_names_and_falls_back_to_the_bucket():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    state = make_state(compression=GradientCompression(WIRE_FORMATS["bf16"], error_feedback=True))
    state.parameter_names = {id(a): "a", id(b): "b"}
    assert state.layout_of(FakeBucket(torch.zeros(5), parameters=[a, b])) == (("a", 3), ("b", 2))
    padded = FakeBucket(torch.zeros(8), index=3, parameters=[a, b])
    assert state.layout_of(padded) == (("bucket 3", 8),)
    assert make_state().layout_of(FakeBucket(torch.zeros(5), parameters=[a, b])) is None  # no feedback


# ------------------------------------------------------------------ the hook on each route
def test_worker_route_averages_and_reports_progress(inline_worker):
    beats = []
    state = make_state("tree", beats=beats)
    future = firecaffe_hook(state, FakeBucket([4.0, 8.0], index=2))
    assert torch.equal(future.wait(), torch.tensor([4.0, 8.0]))  # (x / WORLD) summed over WORLD ranks
    assert state.executor.ran == [(2, "tree", None)] and beats == [2]
    assert state.stats.completed_steps == 1 and state.stats.totals.bytes_sent == 8


def test_inline_route_runs_in_the_calling_thread_on_nccl():
    state = make_state("tree", lockstep=True)
    future = firecaffe_hook(state, FakeBucket([1.0]))
    assert future.done() and state.executor.ran == [(0, "tree", None)]


def test_collective_route_uses_the_backends_all_reduce_on_its_own_group():
    state = make_state("native")
    state.group_collective = "collective-group"
    future = firecaffe_hook(state, FakeBucket([2.0, 6.0]))
    assert torch.equal(future.wait(), torch.tensor([2.0, 6.0]))
    assert state.executor.ran == [] and state.transport.collectives == [("collective-group", None)]


def test_a_failed_schedule_reaches_the_future_and_the_state_as_the_same_error(inline_worker):
    error = PeerStallError("FireCaffe all-reduce on rank 0: rank 3 closed its connection", [3], closed=True)
    state = make_state("tree", executor=FakeExecutor(failure=error))
    future = firecaffe_hook(state, FakeBucket([1.0]))
    with pytest.raises(PeerStallError):
        future.wait()
    assert state.failure is error


def test_a_failed_backend_all_reduce_becomes_a_peer_stall_error_that_says_closed():
    state = make_state("native")
    state.executor.transport.failure = RuntimeError("[pair.cc:537] Read error: Connection reset by peer")
    future = firecaffe_hook(state, FakeBucket([1.0], index=5))
    with pytest.raises(Exception) as caught:
        future.wait()
    failure = state.failure
    assert isinstance(failure, PeerStallError) and failure.closed and failure.peers == []
    assert "closed its connection" in str(failure) and "bucket 5" in str(failure)
    assert "Connection reset by peer" in str(caught.value)


def test_auto_tunes_through_the_hook_and_settles_every_rank_alike(inline_worker):
    state = make_state("auto", tuner=True)
    state.selector.buckets_rebuilt()
    nbytes = 16 * 4
    for _ in range(10):
        firecaffe_hook(state, FakeBucket(torch.ones(16))).wait()
        if state.selector.tuner.choice(nbytes) is not None:
            break
    tuner = state.selector.tuner
    assert tuner.choice(nbytes) is not None and not state.selector.tuning
    assert [a for _, a, _ in state.executor.ran] == list(tuner.candidates_for(nbytes))
    assert state.stats.tuning and state.stats.tuning[0]["algorithm"] == tuner.choice(nbytes)


def test_the_worker_runs_a_job_after_those_queued_and_raises_its_error_in_the_caller():
    """Local SGD's average waits on the hook's worker: after any bucket still queued, its error surfaced."""
    worker, done = _FifoWorker(), []
    try:
        worker.submit(lambda: done.append("bucket"))
        worker.run(lambda: done.append("average"))
        assert done == ["bucket", "average"]

        def fails() -> None:
            raise PeerStallError("rank 1 is not answering", [1])

        with pytest.raises(PeerStallError, match="rank 1 is not answering"):
            worker.run(fails)
        worker.run(lambda: done.append("still running"))  # a failed job does not stop the worker
        assert done[-1] == "still running"
    finally:
        worker.stop()
