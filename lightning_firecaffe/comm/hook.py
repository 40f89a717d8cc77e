"""The DDP communication hook: hand each gradient bucket to the executor and return a Future.

Like torch's own hooks (``ddp_comm_hooks/default_hooks.py``) it is a function of (state, bucket). On
gloo the work runs on one FIFO worker thread per process so that it overlaps backward while buckets keep
their launch order on every rank; gloo Works have no futures, so the worker completes our own Future. On
NCCL the ops are enqueued inline (they are asynchronous on the GPU anyway). With compression
(:mod:`.compression`) each bucket is prepared for the wire before its all-reduce (error-feedback residual
added, fp16 scale applied) and checked after it; algorithm choices are keyed by the bytes on the wire.

(No ``from __future__ import annotations`` here: DDP checks the hook's annotations at registration.)
"""

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerStallError
from ..watchdog.progress import bucket_beat
from .compression import BucketLayout, GradientCompression, round_for_wire
from .cost_model import LinkModel, best_algorithm
from .executor import ScheduleExecutor
from .schedules import Schedule, get_algorithm, schedule_for_bytes
from .telemetry import CommStats, describe_choice
from .tuner import AutoTuner

log = logging.getLogger(__name__)


@dataclass
class ScheduleSelector:
    """Picks the algorithm for a bucket size: a pinned one, or ``auto``: measured by ``tuner`` when it has
    one (the default), else the cost model under ``link``."""

    algorithm: str
    world_size: int
    arity: int = 2
    chunk_bytes: int = 1 << 20
    link: LinkModel = field(default_factory=LinkModel)
    tuner: AutoTuner | None = None
    candidates: tuple[str, ...] | None = None  # what ``auto`` may pick; None: the registry's
    _cache: dict = field(default_factory=dict, repr=False)

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

    def runs_collective_inline(self, nbytes: int) -> str | None:
        """The collective (backend all-reduce) algorithm this bucket size is settled on, if any: pinned, or
        chosen by ``auto``. Such buckets are launched straight from the hook, as DDP's own allreduce_hook
        does, so the backend overlaps them itself."""
        name = self.algorithm if self.algorithm != "auto" else self.settled(nbytes)
        return name if name is not None and get_algorithm(name).collective else None

    def settled(self, nbytes: int) -> str | None:
        """``auto``'s measured (or restored) choice for this size, if there is one yet."""
        return self.tuner.choice(nbytes) if self.tuner is not None else None

    def algorithm_for(self, nbytes: int, measuring: bool = True) -> str:
        """``measuring=False`` (DDP's first step, before it rebuilds its buckets): ``auto`` runs a settled
        choice or the cost model's, and starts no trial."""
        if self.algorithm != "auto":
            return self.algorithm
        if self.tuner is not None and (measuring or self.settled(nbytes) is not None):
            return self.tuner.algorithm_for(nbytes)
        return self.model_choice(nbytes)

    def schedule_for(self, nbytes: int, algorithm: str | None = None) -> Schedule:
        return schedule_for_bytes(
            algorithm or self.algorithm_for(nbytes),
            nbytes,
            self.world_size,
            chunk_bytes=self.chunk_bytes,
            arity=self.arity,
            ranks_per_node=self.link.ranks_per_node,
        )


class _FifoWorker:
    """One daemon thread running jobs in submission order (daemon: a stuck peer never blocks exit)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="firecaffe-comm", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


@dataclass
class FireCaffeHookState:
    """Everything the hook needs; runtime parts (thread, scratch) are built lazily in the using process."""

    group: Any  # messages from lower to higher ranks
    group_reverse: Any  # the other direction (see ScheduleExecutor)
    rank: int
    world_size: int
    selector: ScheduleSelector
    stall_timeout: float = 60.0
    group_collective: Any = None  # settled ``native`` buckets, issued by the backward thread only; timeout = stall
    inline: bool = False  # True on NCCL: enqueue on the GPU stream from the backward thread
    device: Any = "cpu"  # where the tuner's exchange tensor lives (the CUDA device on NCCL)
    stats: CommStats = field(default_factory=CommStats)
    current_step: Callable[[], int] = lambda: 0
    compression: GradientCompression | None = None  # 16-bit on the wire (with its scale and residuals)
    parameter_names: dict = field(default_factory=dict)  # id(parameter) -> name, for error-feedback layouts
    _executor: ScheduleExecutor | None = field(default=None, repr=False)
    _worker: _FifoWorker | None = field(default=None, repr=False)
    _pid: int | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_executor=None, _worker=None, _pid=None, group=None, group_reverse=None, group_collective=None)
        return state

    @property
    def executor(self) -> ScheduleExecutor:
        self._ensure_runtime()
        assert self._executor is not None
        return self._executor

    @property
    def worker(self) -> _FifoWorker:
        self._ensure_runtime()
        if self._worker is None:
            self._worker = _FifoWorker()
        return self._worker

    def _ensure_runtime(self) -> None:
        if self._pid != os.getpid():  # threads do not survive fork: rebuild in this process
            self._pid = os.getpid()
            self._worker = None
            self._executor = ScheduleExecutor(
                self.rank,
                self.world_size,
                group=self.group,
                group_reverse=self.group_reverse,
                stall_timeout=self.stall_timeout,
                batched=self.inline,
            )

    def close(self) -> None:
        """Stop the worker and release the dedicated process group (all ranks call this at teardown)."""
        if self._pid == os.getpid():
            if self._worker is not None:
                self._worker.stop()
            if self._executor is not None:
                self._executor.close()
            for group in (self.group, self.group_reverse, self.group_collective):
                if group is not None and dist.is_initialized():
                    try:
                        dist.destroy_process_group(group)
                    except Exception:  # already gone (e.g. after a failure): nothing left to release
                        pass
        self._worker = None
        self._executor = None
        self.group = self.group_reverse = self.group_collective = None

    def wire_nbytes(self, buffer: torch.Tensor) -> int:
        """The bucket's size on the wire: what algorithm choices and schedules are keyed by."""
        if self.compression is not None and buffer.element_size() > self.compression.format.itemsize:
            return buffer.numel() * self.compression.format.itemsize
        return buffer.numel() * buffer.element_size()

    def layout_of(self, bucket: dist.GradBucket) -> BucketLayout | None:
        """The bucket's parameters by name, in buffer order (error feedback follows parameters, not bucket
        indices, across DDP's bucket rebuilds); None without error feedback."""
        if self.compression is None or self.compression.error_feedback is None:
            return None
        layout = tuple((self.parameter_names.get(id(p), f"#{id(p)}"), p.numel()) for p in bucket.parameters())
        if sum(n for _, n in layout) != bucket.buffer().numel():  # not a plain concatenation: key by bucket
            layout = ((f"bucket {bucket.index()}", bucket.buffer().numel()),)
        return layout

    def reduce_bucket(
        self, buffer: torch.Tensor, index: int, is_last: bool, step: int, layout: BucketLayout | None = None
    ) -> None:
        """Average ``buffer`` across ranks in place and record what it cost (and, while tuning, the time of
        the candidate that ran)."""
        executor = self.executor
        nbytes = self.wire_nbytes(buffer)
        measuring = self.stats.completed_steps > 0  # DDP rebuilds its buckets after the first step
        algorithm = self.selector.algorithm_for(nbytes, measuring)
        schedule = self.selector.schedule_for(nbytes, algorithm)
        self.stats.algorithms[nbytes] = algorithm
        sent0, recv0 = executor.counters.bytes_sent, executor.counters.bytes_received
        prepared = self.compression.begin(buffer, layout) if self.compression is not None else None
        started = time.perf_counter()
        executor.all_reduce_(
            buffer,
            schedule,
            bucket=index,
            step=step,
            wire=prepared.wire_dtype if prepared else None,
            residual=prepared.residual if prepared else None,
        )
        elapsed = time.perf_counter() - started
        if prepared is not None:
            self.compression.finish(buffer, prepared, index)
        tuner = self.selector.tuner if measuring else None  # only ``auto`` has a tuner
        if tuner is not None:
            tuner.record(nbytes, algorithm, elapsed)
            if is_last and tuner.tuning:
                self._exchange_measurements(tuner, step)
        sent = executor.counters.bytes_sent - sent0
        self.stats.bucket_done(
            sent, executor.counters.bytes_received - recv0, elapsed, is_last, saved=self._saved(buffer, sent)
        )

    def _saved(self, buffer: torch.Tensor, sent: int) -> int:
        """Bytes the wire format saved against sending the gradient's own dtype."""
        wire = self.wire_nbytes(buffer)
        return sent * (buffer.numel() * buffer.element_size()) // wire - sent if wire else 0

    def _exchange_measurements(self, tuner: AutoTuner, step: int) -> None:
        """End of a tuning step: every rank's slowest time per candidate, then the same choice everywhere."""

        def slowest(times: list) -> list:
            mine = torch.tensor([t if t == t else float("inf") for t in times], dtype=torch.float64, device=self.device)
            # on the reverse group: it carries no other collective, so no ordering across threads matters
            work = dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group_reverse, async_op=True)
            try:
                ok = work.wait(timeout=timedelta(seconds=self.stall_timeout))
            except Exception as exc:
                raise PeerStallError(
                    f"FireCaffe auto-tuning on rank {self.rank}: a peer did not join the exchange of measured "
                    f"times within {self.stall_timeout:g} s at training step {step} (cause: {exc})",
                    [],
                ) from exc
            if ok is False:
                raise PeerStallError(f"FireCaffe auto-tuning on rank {self.rank}: exchange timed out", [])
            return mine.cpu().tolist()

        decided = tuner.exchange(slowest)
        if decided:
            self.stats.tuning = tuner.report()
            fit = tuner.fitted_link()
            if fit is not None:
                self.stats.fitted_link = {
                    "gbit_per_s": fit[0].bandwidth_Bps * 8 / 1e9,
                    "latency_us": fit[0].latency_s * 1e6,
                    "rms_error": fit[1],
                }
            if self.rank == 0:
                for row in self.stats.tuning:
                    if row["bytes"] in decided:
                        log.info("FireCaffe auto: %s", describe_choice(row))


def firecaffe_hook(state: FireCaffeHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket with a reduction-tree (or other scheduled) all-reduce.

    Args:
        state: the strategy's :class:`FireCaffeHookState` (groups, schedule selector, deadline, stats).
        bucket: DDP's gradient bucket; its flat buffer is averaged in place.

    Returns:
        A future completed with the averaged buffer, or with the :class:`PeerStallError` that names a
        silent peer (raised in the training thread's backward).
    """
    buffer = bucket.buffer()
    index, is_last = bucket.index(), bucket.is_last()
    step = state.current_step()
    layout = state.layout_of(bucket)
    state.stats.bucket_ready(is_last)
    bucket_beat(index)  # the stall watchdog: backward is moving
    buffer.div_(state.world_size)  # DDP's own convention: average = sum of grad / world size
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def job() -> None:
        try:
            state.reduce_bucket(buffer, index, is_last, step, layout)
        except BaseException as exc:  # surfaces in the backward pass of the training thread
            state.failure = exc  # torch wraps it ("Unable to cast ..."): the strategy re-raises this one
            future.set_exception(exc)
        else:
            future.set_result(buffer)

    nbytes = state.wire_nbytes(buffer)
    collective = None if state.inline else state.selector.runs_collective_inline(nbytes)
    if collective is not None:
        return _launch_collective(state, buffer, collective, index, is_last, step, layout)
    if state.inline:
        job()
    else:
        state.worker.submit(job)
    return future


def _launch_collective(
    state: FireCaffeHookState,
    buffer: torch.Tensor,
    algorithm: str,
    index: int,
    is_last: bool,
    step: int,
    layout: BucketLayout | None = None,
) -> torch.futures.Future[torch.Tensor]:
    """The backend's all-reduce, launched now from the backward thread like DDP's own hook; its group's
    timeout is the stall timeout, and a failure reads as a PeerStallError. With compression the backend
    reduces a 16-bit copy (its own, not the worker's staging buffer: both may be in flight at once)."""
    nbytes = state.wire_nbytes(buffer)
    state.stats.algorithms[nbytes] = algorithm
    prepared = state.compression.begin(buffer, layout) if state.compression is not None else None
    reduced = buffer
    if prepared is not None and prepared.wire_dtype is not None:
        reduced = torch.empty_like(buffer, dtype=prepared.wire_dtype)
        round_for_wire(buffer, reduced, prepared.residual, keep=False)  # the result replaces the buffer
    sent, received = state.executor.modelled_bytes(state.selector.schedule_for(nbytes, algorithm), reduced)
    started = time.perf_counter()
    work = dist.all_reduce(reduced, group=state.group_collective, async_op=True)

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        try:
            fut.value()
        except Exception as exc:
            raise PeerStallError(
                f"FireCaffe all-reduce on rank {state.rank}: the backend's all_reduce of gradient bucket {index} "
                f"at training step {step} did not finish within {state.stall_timeout:g} s: a peer is stuck, dead "
                f"or unreachable (cause: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})",
                [],
            ) from exc
        if reduced is not buffer:
            buffer.copy_(reduced)
        if prepared is not None:
            state.compression.finish(buffer, prepared, index)
        state.stats.bucket_done(
            sent, received, time.perf_counter() - started, is_last, saved=state._saved(buffer, sent)
        )
        return buffer

    return work.get_future().then(finish)
