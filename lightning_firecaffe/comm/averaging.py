"""Local SGD (post-local SGD, Lin et al. 2020): when to average, what to average, and the comm hook.

Optimizer steps ``s < start`` synchronise gradients as ever (the FireCaffe hook). From ``start`` on the
hook sends nothing across nodes: each rank applies its own gradient (averaged inside its node when a
node holds several ranks, as torch's ``post_localSGD_hook`` does with its subgroup), and after every
``period``-th local step the parameters are averaged across all ranks (:class:`AveragingPlan`).

The average reduces the change since the last average, not the weights: every rank holds the same
``anchor`` (the last average), sends ``(param - anchor) / p`` and sets ``param = anchor + sum``. The
sum is identical on every rank (the registered algorithms leave every rank with the same bits; see
``Algorithm.identical_results``), so the replicas end bitwise identical, and a 16-bit wire rounds a
small delta instead of the weights. Optimizer state is not averaged (as torch's averagers).

An average does not overlap the next local steps: the next forward reads the parameters being
averaged, so an overlapped average would be applied one or more steps late, to weights that had moved
on - a different (stale-average) algorithm, not a faster run of this one. It runs after the optimizer
step, on the hook's worker thread where there is one (gloo), while no bucket is in flight.

(No ``from __future__ import annotations`` here: DDP checks the hook's annotations at registration.)
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerStallError, peer_error
from ..process_groups import release_groups
from .cost_model import best_algorithm
from .hook import FireCaffeHookState, ScheduleSelector, firecaffe_hook
from .schedules import auto_candidates, get_algorithm

log = logging.getLogger(__name__)

AVERAGE_BUCKET = 1023  # the message tags' bucket number of a parameter average (no gradient bucket is in flight)


@dataclass(frozen=True)
class AveragingPlan:
    """When local SGD synchronises gradients and when it averages parameters, by optimizer step."""

    period: int
    start: int

    def local(self, step: int) -> bool:
        """Step ``step`` applies each rank's own (in-node averaged) gradient."""
        return step >= self.start

    def averages_after(self, step: int) -> bool:
        """The parameters are averaged after optimizer step ``step``: every ``period``-th local step."""
        return step >= self.start and (step - self.start + 1) % self.period == 0


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A new flat copy of ``params`` (in order)."""
    return torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)


def unflatten_into(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Copy ``flat`` back into ``params`` (the inverse of :func:`flatten`)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def averaging_algorithm(selector: ScheduleSelector, nbytes: int) -> str:
    """The algorithm for the flat parameter buffer: a pinned one as is; for ``auto`` its measured choice
    for that size if it has one, else the cost model's best among the algorithms that end identical."""
    if selector.algorithm != "auto":
        return selector.algorithm
    settled = selector.tuner.choice(nbytes) if selector.tuner is not None else None
    if settled is not None and get_algorithm(settled).identical_results:
        return settled
    eligible = selector.candidates or auto_candidates(selector.world_size, selector.link.ranks_per_node)
    candidates = tuple(a for a in eligible if get_algorithm(a).identical_results)
    args = (nbytes, selector.world_size, selector.link)
    return best_algorithm(*args, arity=selector.arity, chunk_bytes=selector.chunk_bytes, candidates=candidates)


@dataclass
class ParameterAverager:
    """The trainable parameters of one replica, and the last average (``anchor``, the same on every rank)."""

    params: list[torch.Tensor]
    world_size: int
    anchor: torch.Tensor | None = None  # None: not yet captured (the replicas are identical then)
    averages: int = 0

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def capture(self) -> None:
        """Remember the current parameters as the last average (call only while the replicas agree)."""
        if self.anchor is None:
            self.anchor = flatten(self.params)

    def average(self, reduce: Callable[[torch.Tensor], Any]) -> None:
        """``param = anchor + sum_r (param_r - anchor) / p``; ``reduce`` sums a flat buffer across ranks
        in place (with the same bits on every rank)."""
        flat = flatten(self.params)
        if self.anchor is None:  # never captured: average the weights themselves
            self.anchor = torch.zeros_like(flat)
        delta = flat.sub_(self.anchor).div_(self.world_size)
        reduce(delta)
        self.anchor.add_(delta)
        unflatten_into(self.anchor, self.params)
        self.averages += 1

    def state_dict(self) -> dict[str, Any]:
        anchor = None if self.anchor is None else self.anchor.detach().cpu().clone()
        return {"anchor": anchor, "averages": self.averages, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's anchor and count (an anchor of another size, or none, is captured afresh)."""
        state = state or {}
        self.averages = int(state.get("averages") or 0)
        anchor = state.get("anchor")
        fits = anchor is not None and state.get("world_size") == self.world_size and anchor.numel() == self.numel()
        device = self.params[0].device if self.params else "cpu"
        self.anchor = anchor.to(device).clone() if fits else None


def trainable_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def node_groups(world_size: int, ranks_per_node: int) -> list[list[int]]:
    """The ranks of each node (Lightning numbers ranks node by node); empty with one rank per node."""
    if ranks_per_node <= 1:
        return []
    return [list(range(n, min(n + ranks_per_node, world_size))) for n in range(0, world_size, ranks_per_node)]


def reword(error: PeerStallError, rank: int, step: int, timeout_s: float) -> PeerStallError:
    """A failure inside an average, worded as one (the peers and closed/silent kept)."""
    cause = error.__cause__ or error
    return peer_error(
        rank,
        error.peers,
        "averaging parameters",
        bucket=None,
        step=step,
        timeout_s=timeout_s,
        exc=cause,
        what="parameter average",
        closed=error.closed,
    )


@dataclass
class LocalSGDHookState:
    """The local SGD hook's state: the FireCaffe hook's (used before ``plan.start``) and this rank's node group."""

    inner: FireCaffeHookState
    plan: AveragingPlan
    node_group: Any = None  # this rank's node (None: one rank per node)
    node_size: int = 1
    node_groups: list = field(default_factory=list)  # every node's group (created by every rank), to release

    def __getstate__(self) -> dict:
        return dict(self.__dict__, node_group=None, node_groups=[])

    def close(self) -> None:
        release_groups(self.node_groups)
        self.node_groups, self.node_group = [], None


def local_sgd_hook(state: LocalSGDHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Before ``plan.start``: the FireCaffe hook. From then on: this rank's gradient, averaged inside its
    node (the backend's all-reduce on the node's group, its timeout the stall deadline) or left as it is."""
    inner = state.inner
    step = inner.current_step()
    if not state.plan.local(step):
        return firecaffe_hook(inner, bucket)
    buffer = bucket.buffer()
    if state.node_group is None:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    buffer.div_(state.node_size)
    index = bucket.index()
    work = inner.transport.all_reduce(buffer, group=state.node_group)  # the package's one backend all-reduce

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        try:
            fut.value()
        except Exception as exc:
            error = peer_error(
                inner.rank,
                [],
                "averaging gradients inside the node",
                bucket=index,
                step=step,
                timeout_s=inner.stall_timeout,
                exc=exc,
            )
            inner.failure = error
            raise error from exc
        return buffer

    return work.get_future().then(finish)


__all__ = [
    "AveragingPlan",
    "LocalSGDHookState",
    "ParameterAverager",
    "averaging_algorithm",
    "flatten",
    "local_sgd_hook",
    "node_groups",
    "reword",
    "trainable_parameters",
    "unflatten_into",
]
