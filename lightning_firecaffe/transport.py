"""Messages between ranks and the backend's collectives, each under a deadline, with one error path.

Everything in the package that moves bytes between ranks goes through here: the schedule runners
(dataflow on gloo, lock-step rounds on NCCL), the backend's all-reduce (``native``), ``auto``'s exchange of
measured times, the preemption flag and the watchdog's link probe. So there is one place that posts a
message (group per direction, tag, byte count), one deadline-wait (:func:`wait_within`) and one wording of
a failure (:func:`lightning_firecaffe.errors.peer_error`): a peer that *closed* its connection is named as
such, a *silent* one as not answering.

A bottom layer: it imports only torch and :mod:`.errors`, so both ``comm`` and ``watchdog`` may use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import PeerStallError, closed_connection, peer_error

CENSUS_TAG = (1 << 30) + 11  # above every schedule tag (message tags are taken modulo 2^30)


def wait_within(work: Any, timeout_s: float) -> BaseException | None:
    """Wait for ``work`` at most ``timeout_s`` seconds: None when it completed, else what went wrong
    (gloo raises on a timeout and on a closed connection; a False result is a timeout too).

    The only deadline-wait in the package. An expired wait closes gloo's pair, so use it to detect a
    fatal stall, never to poll."""
    try:
        ok = work.wait(timeout=timedelta(seconds=max(timeout_s, 0.001)))
    except BaseException as exc:  # noqa: BLE001 - returned to the caller, who raises it with a name
        return exc
    return TimeoutError(f"timed out after {timeout_s:g} s") if ok is False else None


@dataclass
class TransferCounters:
    """Bytes this rank moved; only the transport adds to them."""

    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class Transport:
    """One rank's view of its dedicated groups: messages from lower to higher ranks travel on ``group``,
    the other direction on ``group_reverse`` (gloo keeps one TCP connection per pair and group; one
    connection carrying both directions at once moves about half as fast on a bandwidth-bound link)."""

    rank: int
    world_size: int
    group: Any = None
    group_reverse: Any = None
    stall_timeout: float = 60.0
    counters: TransferCounters = field(default_factory=TransferCounters)

    def group_between(self, source: int, destination: int) -> Any:
        return self.group if source < destination or self.group_reverse is None else self.group_reverse

    def count(self, tensor: torch.Tensor, is_send: bool) -> int:
        nbytes = tensor.numel() * tensor.element_size()
        if is_send:
            self.counters.bytes_sent += nbytes
        else:
            self.counters.bytes_received += nbytes
        return nbytes

    def post(
        self, is_send: bool, tensor: torch.Tensor, peer: int, tag: int, *, bucket: int | None = None, step: int = 0
    ) -> Any:
        """``isend``/``irecv`` of a contiguous tensor on the group of its direction; returns the Work. Posting
        to a pair whose peer is gone raises at once: that too names the peer."""
        self.count(tensor, is_send)
        try:
            if is_send:
                return dist.isend(tensor, dst=peer, group=self.group_between(self.rank, peer), tag=tag)
            return dist.irecv(tensor, src=peer, group=self.group_between(peer, self.rank), tag=tag)
        except RuntimeError as exc:
            doing = f"posting a {'send to' if is_send else 'receive from'} rank {peer}"
            raise self._error([peer], doing, bucket, step, exc) from exc

    def post_batch(
        self, messages: list[tuple[bool, torch.Tensor, int, int]], *, bucket: int | None = None, step: int = 0
    ) -> list[Any]:
        """``(is_send, tensor, peer, tag)`` messages as one ``batch_isend_irecv`` (what NCCL needs)."""
        ops = []
        for is_send, tensor, peer, tag in messages:
            self.count(tensor, is_send)
            group = self.group_between(self.rank, peer) if is_send else self.group_between(peer, self.rank)
            ops.append(dist.P2POp(dist.isend if is_send else dist.irecv, tensor, peer, group, tag))
        try:
            return dist.batch_isend_irecv(ops) if ops else []
        except RuntimeError as exc:
            peers = sorted({m[2] for m in messages})
            raise self._error(peers, f"posting a round with ranks {peers}", bucket, step, exc) from exc

    def _error(self, peers: list[int], doing: str, bucket: int | None, step: int, exc: BaseException) -> PeerStallError:
        return peer_error(self.rank, peers, doing, bucket=bucket, step=step, timeout_s=self.stall_timeout, exc=exc)

    def all_reduce(self, tensor: torch.Tensor, group: Any = None, op: Any = None) -> Any:
        """The backend's own all-reduce, asynchronous (the only one in the package); returns the Work."""
        return dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group or self.group, async_op=True)

    def wait(
        self,
        work: Any,
        peers: Sequence[int] | Callable[[], Sequence[int]],
        doing: str,
        *,
        step: int,
        bucket: int | None = None,
        what: str = "all-reduce",
        timeout_s: float | None = None,
    ) -> None:
        """Wait under the stall deadline; a failure raises :class:`PeerStallError` naming ``peers`` (or
        the peers a callable returns, asked only once the wait has failed)."""
        timeout_s = self.stall_timeout if timeout_s is None else timeout_s
        failure = wait_within(work, timeout_s)
        if failure is not None:
            peers = peers() if callable(peers) else peers
            error = peer_error(
                self.rank, peers, doing, bucket=bucket, step=step, timeout_s=timeout_s, exc=failure, what=what
            )
            raise error from failure

    def census(self, timeout_s: float = 5.0) -> dict[int, str]:
        """Who is there: every rank that runs this at about the same time (after a failure) sends one
        word to every peer and listens for theirs. Returns ``{peer: "alive" | "closed" | "silent"}``:
        a dead peer's connection is closed at once, a stopped one stays silent until the deadline.

        Used after the backend's collectives fail, whose errors do not say which peer went away."""
        peers = [r for r in range(self.world_size) if r != self.rank]
        mine = torch.ones(1)
        inbox = {p: torch.zeros(1) for p in peers}
        receives, sends = {}, []
        for p in peers:  # post everything before waiting on anything: no order between survivors matters
            try:
                receives[p] = dist.irecv(inbox[p], src=p, group=self.group_between(p, self.rank), tag=CENSUS_TAG)
                sends.append(dist.isend(mine, dst=p, group=self.group_between(self.rank, p), tag=CENSUS_TAG))
            except Exception as exc:  # noqa: BLE001 - a pair already known to be broken
                receives[p] = exc
        deadline = time.monotonic() + timeout_s
        verdict = {}
        for p, work in receives.items():
            failure = work if isinstance(work, BaseException) else wait_within(work, deadline - time.monotonic())
            verdict[p] = "alive" if failure is None else ("closed" if closed_connection(failure) else "silent")
        return verdict


def name_the_missing(
    census: dict[int, str],
    rank: int,
    doing: str,
    *,
    step: int,
    timeout_s: float,
    cause: BaseException | None,
    bucket: int | None = None,
) -> PeerStallError | None:
    """A :class:`PeerStallError` naming the peers a census found closed (dead), else the silent ones;
    None if every peer answered (the failure was not a missing peer)."""
    closed = sorted(p for p, s in census.items() if s == "closed")
    silent = sorted(p for p, s in census.items() if s == "silent")
    if not closed and not silent:
        return None
    return peer_error(
        rank, closed or silent, doing, bucket=bucket, step=step, timeout_s=timeout_s, exc=cause, closed=bool(closed)
    )
