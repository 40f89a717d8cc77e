"""The DDP communication hook: one route per bucket, decided once, each route one named function.

Like torch's own hooks (``ddp_comm_hooks/default_hooks.py``) the hook is a function of (state, bucket).
Every bucket takes one of three routes (:func:`route_for`):

- ``WORKER``: a schedule (or one of ``auto``'s timed trials) runs on one FIFO worker thread per process
  (gloo): it overlaps backward while buckets keep their launch order on every rank; gloo's p2p Works have
  no futures, so the worker completes the bucket's Future itself.
- ``INLINE``: a schedule issued from the backward thread (NCCL: its batches are asynchronous on the GPU).
- ``COLLECTIVE``: the backend's own all-reduce, launched from the backward thread as DDP's own
  ``allreduce_hook`` does; its Work's future completes the bucket.

With compression (:mod:`.compression`) a bucket is prepared for the wire before its all-reduce and
checked after it; algorithm choices are keyed by the bytes on the wire. Failures become
:class:`~lightning_firecaffe.errors.PeerStallError` (kept on ``state.failure`` too: torch wraps the
Future's exception, and the strategy re-raises this one).

(No ``from __future__ import annotations`` here: DDP checks the hook's annotations at registration.)
"""

import concurrent.futures
import enum
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..errors import PeerStallError, peer_error
from ..process_groups import release_groups
from ..transport import Transport
from .compression import BucketLayout, GradientCompression, round_for_wire
from .cost_model import LinkModel, best_algorithm
from .executor import ScheduleExecutor
from .low_rank import LowRankBucket, LowRankState, ParameterShapes
from .schedules import Schedule, get_algorithm, schedule_for_bytes
from .telemetry import CommStats, describe_choice
from .tuner import AutoTuner

log = logging.getLogger(__name__)


class Route(enum.Enum):
    WORKER = "worker"
    INLINE = "inline"
    COLLECTIVE = "collective"


class Decision(NamedTuple):
    """The algorithm for one bucket, and whether this run of it is one of ``auto``'s timed trials."""

    algorithm: str
    trial: bool = False


def route_for(decision: Decision | None, lockstep: bool, exchange_follows: bool = False) -> Route:
    """The route table. A timed trial, or a bucket after which ``auto`` exchanges its measurements, runs
    where it can be timed and followed (worker, or inline on NCCL); the backend's all-reduce otherwise
    runs as a collective launched from backward; schedules run inline on NCCL, on the worker on gloo.
    A low-rank bucket (``decision`` None: each of its two messages decides for itself) runs its
    messages one after the other, where schedules run."""
    collective = decision is not None and get_algorithm(decision.algorithm).collective
    if collective and not (decision.trial or exchange_follows):
        return Route.COLLECTIVE
    return Route.INLINE if lockstep else Route.WORKER


@dataclass
class ScheduleSelector:
    """Picks the algorithm for a bucket size: a pinned one, or ``auto``: measured by ``tuner`` when it has
    one (the default), else the cost model under ``link``. ``auto`` starts trials only once the strategy
    has said that DDP rebuilt its buckets (:meth:`buckets_rebuilt`): before that, bucket sizes are not
    the ones training will use."""

    algorithm: str
    world_size: int
    arity: int = 2
    chunk_bytes: int = 1 << 20
    link: LinkModel = field(default_factory=LinkModel)
    tuner: AutoTuner | None = None
    candidates: tuple[str, ...] | None = None  # what ``auto`` may pick; None: the registry's
    rebuilt: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def buckets_rebuilt(self) -> None:
        self.rebuilt = True

    def model_choice(self, nbytes: int) -> str:
        if nbytes not in self._cache:
            self._cache[nbytes] = best_algorithm(
                nbytes,
                self.world_size,
                self.link,
                arity=self.arity,
                chunk_bytes=self.chunk_bytes,
                candidates=self.candidates,
            )
        return self._cache[nbytes]

    def decide(self, nbytes: int) -> Decision:
        if self.algorithm != "auto":
            return Decision(self.algorithm)
        settled = self.tuner.choice(nbytes) if self.tuner is not None else None
        if settled is not None:
            return Decision(settled)
        if self.tuner is None or not self.rebuilt:
            return Decision(self.model_choice(nbytes))
        algorithm = self.tuner.algorithm_for(nbytes)
        return Decision(algorithm, trial=not self.tuner.sizes[nbytes].measured)

    @property
    def tuning(self) -> bool:
        return self.tuner is not None and self.rebuilt and self.tuner.tuning

    def schedule_for(self, nbytes: int, algorithm: str) -> Schedule:
        return schedule_for_bytes(
            algorithm,
            nbytes,
            self.world_size,
            chunk_bytes=self.chunk_bytes,
            arity=self.arity,
            ranks_per_node=self.link.ranks_per_node,
        )


class BucketJob(NamedTuple):
    """One gradient bucket, as the hook saw it when DDP handed it over."""

    buffer: torch.Tensor
    index: int
    is_last: bool
    step: int
    nbytes: int  # on the wire (a low-rank bucket: its gradient's own size)
    decision: Decision | None  # None: a low-rank bucket (its messages decide for themselves)
    layout: BucketLayout | None
    shapes: ParameterShapes | None = None  # a low-rank bucket's parameters (name, shape), in buffer order


class _FifoWorker:
    """One daemon thread running jobs in submission order (daemon: a stuck peer never blocks exit)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="firecaffe-comm", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` after the jobs already queued and wait for it; its exception is raised here.
        No deadline of its own: every wait inside a job has the stall deadline."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run_into() -> None:
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the waiting thread
                done.set_exception(exc)
            else:
                done.set_result(None)

        self._jobs.put(run_into)
        done.result()

    def stop(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


def _no_progress(bucket: int) -> None:
    pass


@dataclass
class FireCaffeHookState:
    """Everything the hook needs; runtime parts (thread, executor) are built lazily in the using process."""

    group: Any  # messages from lower to higher ranks
    group_reverse: Any  # the other direction, and ``auto``'s exchange (see Transport)
    rank: int
    world_size: int
    selector: ScheduleSelector
    stall_timeout: float = 60.0
    group_collective: Any = None  # COLLECTIVE-route buckets, issued by the backward thread only
    lockstep: bool = False  # NCCL: schedules run as rounds of batch_isend_irecv from the backward thread
    device: Any = "cpu"  # where the tuner's exchange tensor lives (the CUDA device on NCCL)
    stats: CommStats = field(default_factory=CommStats)
    current_step: Callable[[], int] = lambda: 0
    compression: GradientCompression | None = None  # 16-bit on the wire (with its scale and residuals)
    low_rank: LowRankState | None = None  # PowerSGD's Q factors and residuals (``compression="powersgd"``)
    low_rank_wire: torch.dtype | None = None  # the 16-bit dtype its messages travel in, or None
    parameter_names: dict = field(default_factory=dict)  # id(parameter) -> name, for error-feedback layouts
    on_bucket: Callable[[int], None] = _no_progress  # progress callback (the watchdog's beat), per bucket
    failure: BaseException | None = None  # the last failure, unwrapped (torch garbles the Future's)
    _executor: ScheduleExecutor | None = field(default=None, repr=False)
    _worker: _FifoWorker | None = field(default=None, repr=False)
    _pid: int | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_executor=None, _worker=None, _pid=None, group=None, group_reverse=None, group_collective=None)
        return state

    @property
    def executor(self) -> ScheduleExecutor:
        if self._pid != os.getpid():  # threads do not survive fork: rebuild in this process
            self._pid, self._worker = os.getpid(), None
            self._executor = ScheduleExecutor(
                self.rank, self.world_size, self.group, self.group_reverse, self.stall_timeout, self.lockstep
            )
        return self._executor

    @property
    def transport(self) -> Transport:
        return self.executor.transport

    @property
    def worker(self) -> _FifoWorker:
        self.executor  # noqa: B018 - (re)builds the runtime in this process first
        if self._worker is None:
            self._worker = _FifoWorker()
        return self._worker

    def close(self) -> None:
        """Stop the worker and release the dedicated process groups (all ranks call this at teardown)."""
        if self._pid == os.getpid():
            if self._worker is not None:
                self._worker.stop()
            if self._executor is not None:
                self._executor.close()
            release_groups((self.group, self.group_reverse, self.group_collective))
        self._worker = self._executor = None
        self.group = self.group_reverse = self.group_collective = None

    def wire_nbytes(self, buffer: torch.Tensor) -> int:
        """The bucket's size on the wire: what algorithm choices and schedules are keyed by."""
        if self.compression is not None and buffer.element_size() > self.compression.format.itemsize:
            return buffer.numel() * self.compression.format.itemsize
        return buffer.numel() * buffer.element_size()

    def layout_of(self, bucket: Any) -> BucketLayout | None:
        """The bucket's parameters by name, in buffer order (error feedback follows parameters, not bucket
        indices, across DDP's bucket rebuilds); None without error feedback."""
        if self.compression is None or self.compression.error_feedback is None:
            return None
        layout = tuple((self.parameter_names.get(id(p), f"#{id(p)}"), p.numel()) for p in bucket.parameters())
        if sum(n for _, n in layout) != bucket.buffer().numel():  # not a plain concatenation: key by bucket
            layout = ((f"bucket {bucket.index()}", bucket.buffer().numel()),)
        return layout

    def shapes_of(self, bucket: Any) -> ParameterShapes | None:
        """The bucket's parameters (name, shape) when it travels low-rank at this step, else None (before
        PowerSGD's start step, or a bucket that is not a plain concatenation of its parameters)."""
        if self.low_rank is None or not self.low_rank.config.active(self.current_step()):
            return None
        shapes = tuple((self.parameter_names.get(id(p), f"#{id(p)}"), tuple(p.shape)) for p in bucket.parameters())
        return shapes if sum(p.numel() for p in bucket.parameters()) == bucket.buffer().numel() else None

    def job_for(self, bucket: Any) -> BucketJob:
        buffer = bucket.buffer()
        nbytes = self.wire_nbytes(buffer)
        shapes = self.shapes_of(bucket)
        if shapes is not None:
            return BucketJob(buffer, bucket.index(), bucket.is_last(), self.current_step(), nbytes, None, None, shapes)
        decision = self.selector.decide(nbytes)
        self.stats.algorithms[nbytes] = decision.algorithm
        args = (buffer, bucket.index(), bucket.is_last(), self.current_step(), nbytes, decision)
        return BucketJob(*args, self.layout_of(bucket))

    def saved_bytes(self, buffer: torch.Tensor, sent: int) -> int:
        """Bytes the wire format saved against sending the gradient's own dtype."""
        wire = self.wire_nbytes(buffer)
        return sent * (buffer.numel() * buffer.element_size()) // wire - sent if wire else 0


def firecaffe_hook(state: FireCaffeHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket across ranks along the route its algorithm takes.

    Args:
        state: the strategy's :class:`FireCaffeHookState` (groups, selector, deadline, stats).
        bucket: DDP's gradient bucket; its flat buffer is averaged in place.

    Returns:
        A future completed with the averaged buffer, or with the :class:`PeerStallError` that names the
        peer that failed (raised in the training thread's backward).
    """
    job = state.job_for(bucket)
    state.stats.bucket_ready(job.is_last)
    state.on_bucket(job.index)
    job.buffer.div_(state.world_size)  # DDP's own convention: average = sum of grad / world size
    exchange_follows = job.is_last and state.selector.tuning
    return ROUTES[route_for(job.decision, state.lockstep, exchange_follows)](state, job)


def run_on_worker(state: FireCaffeHookState, job: BucketJob) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    state.worker.submit(lambda: _complete(state, job, future))
    return future


def run_inline(state: FireCaffeHookState, job: BucketJob) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    _complete(state, job, future)
    return future


def launch_collective(state: FireCaffeHookState, job: BucketJob) -> torch.futures.Future[torch.Tensor]:
    """The backend's all-reduce on the collective group (its timeout is the stall deadline); with
    compression it reduces a 16-bit copy of its own (a worker's staging buffer may be in flight)."""
    buffer = job.buffer
    prepared = state.compression.begin(buffer, job.layout) if state.compression is not None else None
    reduced = buffer
    if prepared is not None and prepared.wire_dtype is not None:
        reduced = torch.empty_like(buffer, dtype=prepared.wire_dtype)
        round_for_wire(buffer, reduced, prepared.residual, keep=False)  # the result replaces the buffer
    schedule = state.selector.schedule_for(job.nbytes, job.decision.algorithm)
    sent, received = state.executor.modelled_bytes(schedule, reduced)
    started = time.perf_counter()
    work = state.transport.all_reduce(reduced, group=state.group_collective)

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        try:
            fut.value()
        except Exception as exc:
            t = state.transport
            error = peer_error(
                t.rank,
                [],
                "in the backend's all_reduce",
                bucket=job.index,
                step=job.step,
                timeout_s=t.stall_timeout,
                exc=exc,
            )
            state.failure = error
            raise error from exc
        if reduced is not buffer:
            buffer.copy_(reduced)
        if prepared is not None:
            state.compression.finish(buffer, prepared, job.index)
        elapsed = time.perf_counter() - started
        state.stats.bucket_done(sent, received, elapsed, job.is_last, saved=state.saved_bytes(buffer, sent))
        return buffer

    return work.get_future().then(finish)


ROUTES = {Route.WORKER: run_on_worker, Route.INLINE: run_inline, Route.COLLECTIVE: launch_collective}


def _complete(state: FireCaffeHookState, job: BucketJob, future: torch.futures.Future) -> None:
    try:
        (reduce_bucket if job.shapes is None else reduce_low_rank)(state, job)
    except BaseException as exc:  # noqa: BLE001 - surfaces in the training thread's backward
        state.failure = exc
        future.set_exception(exc)
    else:
        future.set_result(job.buffer)


def reduce_bucket(state: FireCaffeHookState, job: BucketJob) -> None:
    """Average ``job.buffer`` in place with its schedule, record what it cost and, while tuning, the
    trial's time; after the last bucket of a tuning step, exchange the measurements."""
    executor, buffer = state.executor, job.buffer
    counters = executor.counters
    sent0, received0 = counters.bytes_sent, counters.bytes_received
    prepared = state.compression.begin(buffer, job.layout) if state.compression is not None else None
    started = time.perf_counter()
    executor.all_reduce_(
        buffer,
        state.selector.schedule_for(job.nbytes, job.decision.algorithm),
        bucket=job.index,
        step=job.step,
        wire=prepared.wire_dtype if prepared else None,
        residual=prepared.residual if prepared else None,
    )
    elapsed = time.perf_counter() - started
    if prepared is not None:
        state.compression.finish(buffer, prepared, job.index)
    if job.decision.trial:
        state.selector.tuner.record(job.nbytes, job.decision.algorithm, elapsed)
    if job.is_last and state.selector.tuning:
        exchange_measurements(state, job.step)
    sent = counters.bytes_sent - sent0
    saved = state.saved_bytes(buffer, sent)
    state.stats.bucket_done(sent, counters.bytes_received - received0, elapsed, job.is_last, saved=saved)


def reduce_low_rank(state: FireCaffeHookState, job: BucketJob) -> None:
    """PowerSGD on one bucket (:mod:`.low_rank`): its two messages (uncompressed tensors + P factors, then
    Q factors) each summed in one all-reduce by the algorithm the selector picks for that message's size
    (so ``auto`` tunes them like any bucket), in the low-rank wire format if one is set."""
    counters = state.executor.counters
    sent0, received0 = counters.bytes_sent, counters.bytes_received
    started = time.perf_counter()
    bucket = LowRankBucket(state.low_rank, job.buffer, job.shapes, state.world_size)
    first = bucket.first_message()
    wire = reduce_message(state, first, job, "P")
    second = bucket.second_message(first)
    wire += reduce_message(state, second, job, "Q")
    bucket.finish(second)
    elapsed = time.perf_counter() - started
    if job.is_last and state.selector.tuning:
        exchange_measurements(state, job.step)
    sent = counters.bytes_sent - sent0
    full = job.buffer.numel() * job.buffer.element_size()
    saved = sent * full // wire - sent if wire else 0
    state.stats.bucket_done(sent, counters.bytes_received - received0, elapsed, job.is_last, saved=saved)


def reduce_message(state: FireCaffeHookState, message: torch.Tensor, job: BucketJob, what: str) -> int:
    """Sum one low-rank message across ranks in place; ``what`` names it in a stall's error. Returns its
    size on the wire."""
    if message.numel() == 0:
        return 0
    itemsize = message.element_size() if state.low_rank_wire is None else state.low_rank_wire.itemsize
    nbytes = message.numel() * itemsize
    decision = state.selector.decide(nbytes)
    state.stats.algorithms[nbytes] = decision.algorithm
    started = time.perf_counter()
    try:
        state.executor.all_reduce_(
            message,
            state.selector.schedule_for(nbytes, decision.algorithm),
            bucket=job.index,
            step=job.step,
            wire=state.low_rank_wire,
        )
    except PeerStallError as exc:
        raise exc.during(f"PowerSGD's {what} message, {nbytes} bytes, {decision.algorithm}") from exc.__cause__
    if decision.trial:
        state.selector.tuner.record(nbytes, decision.algorithm, time.perf_counter() - started)
    return nbytes


def exchange_measurements(state: FireCaffeHookState, step: int) -> None:
    """End of a tuning step: every rank's slowest time per candidate, then the same choice everywhere.
    On the reverse group: it carries no other collective, so no ordering across threads matters."""
    tuner, transport = state.selector.tuner, state.transport

    def slowest(times: list) -> list:
        mine = torch.tensor([t if t == t else float("inf") for t in times], dtype=torch.float64, device=state.device)
        work = transport.all_reduce(mine, group=state.group_reverse, op=dist.ReduceOp.MAX)
        transport.wait(work, [], "exchanging auto's measured times", step=step, what="auto-tuning")
        return mine.cpu().tolist()

    decided = tuner.exchange(slowest)
    if decided:
        state.stats.tuning = tuner.report()
        fit = tuner.fitted_link()
        if fit is not None:
            link, rms = fit
            state.stats.fitted_link = {
                "gbit_per_s": link.bandwidth_Bps * 8 / 1e9,
                "latency_us": link.latency_s * 1e6,
                "rms_error": rms,
            }
        if state.rank == 0:
            for row in state.stats.tuning:
                if row["bytes"] in decided:
                    log.info("FireCaffe auto: %s", describe_choice(row))
