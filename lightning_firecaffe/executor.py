"""Run an all-reduce schedule on a torch.distributed process group, with a deadline on every wait.

The executor is the only layer that talks to the network. It reuses one scratch buffer per dtype and
device (at most one bucket, or a few chunks for pipelined schedules), and turns a silent peer into a
``PeerStallError`` that names the peer, the bucket and the training step instead of hanging until the
process group's 30-minute timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .schedules import Op, Schedule, chunk_offsets

_TAG_SPACE = 1 << 30


class PeerStallError(RuntimeError):
    """A peer did not answer within the stall timeout, or its connection broke (it probably died)."""

    def __init__(self, message: str, peers: list[int]):
        super().__init__(message)
        self.peers = peers


@dataclass
class TransferCounters:
    """Bytes this rank moved; the executor only ever adds to them."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0


@dataclass
class _Pending:
    work: Any
    step_desc: str
    peer: int


@dataclass
class ScheduleExecutor:
    """Executes schedules for one rank of ``group`` (a dedicated group whose ranks equal global ranks).

    ``batched=True`` posts each round with ``batch_isend_irecv`` (needed by NCCL); otherwise plain
    ``isend``/``irecv`` with tags derived from (bucket, round, chunk), which gloo matches per peer.
    """

    rank: int
    world_size: int
    group: Any = None
    stall_timeout: float = 60.0
    batched: bool = False
    counters: TransferCounters = field(default_factory=TransferCounters)
    _scratch: dict = field(default_factory=dict, repr=False)

    @property
    def scratch_bytes(self) -> int:
        """Bytes held in reusable receive buffers (the executor's extra memory)."""
        return sum(t.numel() * t.element_size() for t in self._scratch.values())

    def _scratch_for(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        key = (like.dtype, like.device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._scratch[key] = buf
        return buf

    def all_reduce_(self, buffer: torch.Tensor, schedule: Schedule, *, bucket: int = 0, step: int = 0) -> torch.Tensor:
        """Sum ``buffer`` (1-D, contiguous) across all ranks in place, following ``schedule``."""
        if schedule.world_size != self.world_size:
            raise ValueError(f"schedule is for {schedule.world_size} ranks, group has {self.world_size}")
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("all_reduce_ needs a flat contiguous buffer")
        offsets = chunk_offsets(buffer.numel(), schedule.num_chunks)
        my_rounds = schedule.steps_of(self.rank)
        for t, steps in enumerate(my_rounds):
            if steps:
                self._run_round(buffer, steps, offsets, schedule, t, bucket, step)
        return buffer

    def _run_round(self, buffer, steps, offsets, schedule, t, bucket, step) -> None:
        live = [s for s in steps if offsets[s.hi] > offsets[s.lo]]
        if not live:
            return
        sent_ranges = [(offsets[s.lo], offsets[s.hi]) for s in live if s.op is Op.SEND]
        scratch_need = 0
        plan = []  # (step, destination view, view to apply into or None)
        for s in live:
            lo, hi = offsets[s.lo], offsets[s.hi]
            view = buffer[lo:hi]
            overlaps_send = any(a < hi and lo < b for a, b in sent_ranges)
            if s.op is Op.RECV_ADD or (s.op is Op.RECV_COPY and overlaps_send):
                plan.append((s, (scratch_need, scratch_need + hi - lo), view))
                scratch_need += hi - lo
            else:
                plan.append((s, None, view))
        scratch = self._scratch_for(buffer, scratch_need) if scratch_need else None

        ops, pending = [], []
        for s, span, view in plan:
            target = view if span is None else scratch[span[0] : span[1]]
            tag = ((bucket % 1024) * (schedule.num_rounds + 1) + t) * (schedule.num_chunks + 1) + s.lo
            tag %= _TAG_SPACE
            verb = "sending to" if s.op is Op.SEND else "receiving from"
            desc = f"{verb} rank {s.peer} chunks [{s.lo}, {s.hi}) of round {t}"
            if self.batched:
                fn = dist.isend if s.op is Op.SEND else dist.irecv
                ops.append(dist.P2POp(fn, target, s.peer, self.group, tag))
            elif s.op is Op.SEND:
                pending.append(_Pending(dist.isend(target, dst=s.peer, group=self.group, tag=tag), desc, s.peer))
            else:
                pending.append(_Pending(dist.irecv(target, src=s.peer, group=self.group, tag=tag), desc, s.peer))
            nbytes = target.numel() * target.element_size()
            if s.op is Op.SEND:
                self.counters.bytes_sent += nbytes
            else:
                self.counters.bytes_received += nbytes
            self.counters.messages += 1
        if self.batched:
            works = dist.batch_isend_irecv(ops)
            pending = [
                _Pending(w, f"round {t} with ranks {sorted({s.peer for s, _, _ in plan})}", -1) for w in works
            ]
        self._wait_all(pending, bucket, step)

        for s, span, view in plan:
            if span is None:
                continue
            received = scratch[span[0] : span[1]]
            if s.op is Op.RECV_ADD:
                view.add_(received)
            else:
                view.copy_(received)

    def _wait_all(self, pending: list[_Pending], bucket: int, step: int) -> None:
        deadline = time.monotonic() + self.stall_timeout
        for i, p in enumerate(pending):
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                ok = p.work.wait(timeout=timedelta(seconds=remaining))
            except Exception as exc:  # gloo raises on timeout and on a closed connection
                raise self._stall_error(pending[i:], p, bucket, step, exc) from exc
            if ok is False:
                raise self._stall_error(pending[i:], p, bucket, step, None)

    def _stall_error(self, unfinished, first, bucket, step, exc) -> PeerStallError:
        silent = sorted({p.peer for p in unfinished if p.peer >= 0 and not _done(p.work)} | {first.peer} - {-1})
        cause = str(exc).strip().splitlines()[0] if exc is not None else "timed out"
        closed = exc is not None and any(w in str(exc).lower() for w in ("closed", "reset", "broken", "eof"))
        what = "closed its connection (it probably died)" if closed else f"did not answer within {self.stall_timeout:g} s"
        names = ", ".join(f"rank {r}" for r in silent) or "a peer"
        return PeerStallError(
            f"FireCaffe all-reduce on rank {self.rank}: {names} {what} while {first.step_desc} "
            f"of gradient bucket {bucket} at training step {step}. Check that rank's log: it may have crashed, "
            f"been killed, or be stuck outside training. (cause: {cause})",
            silent,
        )


def _done(work: Any) -> bool:
    try:
        return bool(work.is_completed())
    except Exception:
        return False
