"""Run an all-reduce schedule on a torch.distributed process group, with a deadline on every wait.

The executor picks the runner and owns what they share; it does not post messages itself (that is the
:class:`~lightning_firecaffe.transport.Transport`'s job). On gloo a schedule runs as dataflow
(:mod:`.dataflow_runner`); on NCCL as lock-step rounds of ``batch_isend_irecv`` (:mod:`.lockstep`).
Algorithms registered as ``collective`` call the backend's own ``all_reduce`` through the transport.

Scratch memory is bounded and reused across steps: receives that add (or that a send of the same
round still reads) land in one of three arenas: a bucket-sized one for rounds whose receives exceed
``overlap_bytes`` (such a round starts only when the previous one has completed) and two of at most
``overlap_bytes`` that alternate between the other rounds, so at most two rounds' receives are
outstanding. A silent peer becomes a ``PeerStallError`` that names the peer, the bucket and the
training step instead of a hang until the process group's 30-minute timeout.

With a 16-bit ``wire`` dtype (:mod:`.compression`) every algorithm sends 16-bit bytes: a send rounds its
chunks into a bucket-sized 16-bit staging buffer (and the rank keeps the rounded value), receives land
in 16-bit scratch (or the staging buffer) and are added into the gradient's own dtype; ``native`` reduces
the staging buffer itself. Extra memory: half a bucket for the staging buffer.
"""

from __future__ import annotations

import torch

from ..transport import TransferCounters, Transport
from .compression import round_for_wire
from .dataflow_runner import DataflowRunner
from .lockstep import LockstepRunner
from .schedules import Schedule, get_algorithm
from .scratch import Scratch


class ScheduleExecutor:
    """Executes schedules for one rank of ``group`` (a dedicated group whose ranks equal global ranks).

    Messages from a lower to a higher rank travel on ``group``, the other direction on ``group_reverse``
    (see :class:`~lightning_firecaffe.transport.Transport`). ``lockstep=True`` runs rounds of
    ``batch_isend_irecv`` (NCCL needs it); otherwise dataflow with ``isend``/``irecv``.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        group=None,
        group_reverse=None,
        stall_timeout: float = 60.0,
        lockstep: bool = False,
        overlap_bytes: int = 4 << 20,  # receives of rounds up to this size may overlap the previous round's
    ) -> None:
        self.transport = Transport(rank, world_size, group, group_reverse, stall_timeout)
        self.rank, self.world_size, self.lockstep, self.overlap_bytes = rank, world_size, lockstep, overlap_bytes
        self.scratch = Scratch()
        self.dataflow = DataflowRunner(self.transport, self.scratch, overlap_bytes)
        self.rounds = LockstepRunner(self.transport, self.scratch, overlap_bytes)

    @property
    def counters(self) -> TransferCounters:
        return self.transport.counters

    @property
    def scratch_bytes(self) -> int:
        """Bytes held in reusable receive buffers (the executor's extra memory)."""
        return self.scratch.nbytes

    def close(self) -> None:
        """Stop the dataflow runner's waiter threads (before the groups are destroyed)."""
        self.dataflow.close()

    def all_reduce_(
        self,
        buffer: torch.Tensor,
        schedule: Schedule,
        *,
        bucket: int = 0,
        step: int = 0,
        wire: torch.dtype | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum ``buffer`` (1-D, contiguous) across all ranks in place, following ``schedule``.

        Args:
            wire: a 16-bit dtype to send in (see :mod:`.compression`); None: the buffer's own.
            residual: with ``wire``, a tensor like ``buffer`` that accumulates what this rank's roundings
                lost (error feedback).
        """
        wire = self._check(buffer, schedule, wire)
        if self.world_size == 1 or buffer.numel() == 0:
            return buffer  # nothing travels, nothing is rounded
        staging = None if wire is None else self.scratch.get(buffer.new_empty(0, dtype=wire), buffer.numel(), "wire")
        staging = None if staging is None else staging[: buffer.numel()]
        if get_algorithm(schedule.algorithm).collective:
            return self._run_collective(buffer, schedule, bucket, step, staging, residual)
        runner = self.rounds if self.lockstep else self.dataflow
        return runner.run(buffer, schedule, bucket, step, staging, residual)

    def _check(self, buffer: torch.Tensor, schedule: Schedule, wire: torch.dtype | None) -> torch.dtype | None:
        if schedule.world_size != self.world_size:
            raise ValueError(f"schedule is for {schedule.world_size} ranks, group has {self.world_size}")
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("all_reduce_ needs a flat contiguous buffer")
        if wire is not None and not buffer.dtype.is_floating_point:
            raise ValueError(f"compression applies to floating-point buffers only, not {buffer.dtype}")
        return None if wire == buffer.dtype else wire

    def _run_collective(
        self, buffer: torch.Tensor, schedule: Schedule, bucket: int, step: int, wire=None, residual=None
    ) -> torch.Tensor:
        """The backend's all-reduce on the dedicated group under the stall deadline (``auto``'s timed trials
        and pinned ``native`` on a worker thread); bytes counted are those of the schedule that models it."""
        reduced = buffer
        if wire is not None:
            round_for_wire(buffer, wire, residual, keep=False)  # the result replaces the buffer
            reduced = wire
        work = self.transport.all_reduce(reduced)  # on ``group``: issued by this thread only
        self.transport.wait(work, [], "in the backend's all_reduce", step=step, bucket=bucket)
        if wire is not None:
            buffer.copy_(wire)
        self.modelled_bytes(schedule, reduced)
        return buffer

    def modelled_bytes(self, schedule: Schedule, buffer: torch.Tensor) -> tuple[int, int]:
        """Count (and return) the bytes the schedule that models a collective sends and receives here."""
        plan = self.dataflow.layout(schedule, buffer.numel(), buffer.element_size()).plan
        sent = buffer.element_size() * sum(e.numel for e in plan.events if e.is_send)
        received = buffer.element_size() * sum(e.numel for e in plan.events if not e.is_send)
        self.counters.bytes_sent += sent
        self.counters.bytes_received += received
        return sent, received
