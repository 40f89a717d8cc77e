"""``FireCaffeStrategy``: Lightning's DDP with the gradient all-reduce replaced by a reduction tree.

A thin policy over torch DDP, like Lightning's own ``DDPStrategy``: it only swaps the communication hook
(the stock strategy silently skips hooks on CPU), gives the hook a dedicated process group so tree traffic
never interleaves with Lightning's own collectives, and adds a telemetry callback.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.fabric.strategies.registry import _StrategyRegistry
from torch.nn.parallel import DistributedDataParallel

from lightning.pytorch.utilities import rank_zero_info

from .calibration import measure_link
from .comm_hook import FireCaffeHookState, ScheduleSelector, firecaffe_hook
from .cost_model import LinkModel
from .schedules import ALGORITHMS
from .telemetry import CommStats

ALGORITHM_CHOICES: tuple[str, ...] = ("auto",) + ALGORITHMS


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class FireCaffeStrategy(DDPStrategy):
    """Data-parallel training whose gradient all-reduce is a reduction tree over point-to-point ops.

    Args:
        algorithm: ``"auto"`` (per bucket size, the fastest under the cost model ``link``), ``"tree"``
            (FireCaffe's reduction tree), ``"pipelined_tree"``, ``"double_tree"``, ``"two_level"``,
            ``"ring"`` or ``"parameter_server"``.
        arity: children per tree node (2 = binary).
        chunk_bytes: piece size streamed by the pipelined algorithms.
        stall_timeout: seconds a rank waits for a silent peer before failing with an error naming it.
        link: what ``auto`` assumes about the network: a ``LinkModel`` (default: 10 Gbit/s, 30 us), or
            ``"measure"`` to time it with a ping-pong at start-up (adapts to the real links, but a
            different measurement may pick a different algorithm, so results are not bitwise
            reproducible from run to run at more than 2 ranks). Ranks per node come from ``devices``.
        **kwargs: every ``DDPStrategy`` argument (``bucket_cap_mb``, ``find_unused_parameters``,
            ``process_group_backend``, ``timeout``, ``start_method``, ...).
    """

    strategy_name = "firecaffe"

    def __init__(
        self,
        algorithm: str = "auto",
        arity: int = 2,
        chunk_bytes: int = 1 << 20,
        stall_timeout: float = 60.0,
        link: Union[LinkModel, str, None] = None,
        ddp_comm_wrapper: Optional[Callable] = None,
        **kwargs: Any,
    ) -> None:
        _check(
            algorithm in ALGORITHM_CHOICES,
            f"FireCaffeStrategy: algorithm={algorithm!r} is not one of {', '.join(ALGORITHM_CHOICES)}",
        )
        _check(
            isinstance(arity, int) and not isinstance(arity, bool) and arity >= 2,
            f"FireCaffeStrategy: arity={arity!r} must be an integer >= 2 (2 = binary tree)",
        )
        _check(
            isinstance(chunk_bytes, int) and not isinstance(chunk_bytes, bool) and chunk_bytes > 0,
            f"FireCaffeStrategy: chunk_bytes={chunk_bytes!r} must be a positive integer number of bytes",
        )
        _check(
            isinstance(stall_timeout, (int, float)) and math.isfinite(stall_timeout) and stall_timeout > 0,
            f"FireCaffeStrategy: stall_timeout={stall_timeout!r} must be a positive, finite number of seconds",
        )
        _check(
            link is None or link == "measure" or isinstance(link, LinkModel),
            f"FireCaffeStrategy: link={link!r} must be a LinkModel, 'measure' or None",
        )
        for taken in ("ddp_comm_hook", "ddp_comm_state"):
            _check(
                kwargs.get(taken) is None,
                f"FireCaffeStrategy: {taken} is not supported: the strategy installs its own comm hook "
                f"(use strategy='ddp' for a custom hook)",
            )
            kwargs.pop(taken, None)
        super().__init__(ddp_comm_wrapper=ddp_comm_wrapper, **kwargs)
        self.algorithm = algorithm
        self.arity = arity
        self.chunk_bytes = chunk_bytes
        self.stall_timeout = float(stall_timeout)
        self.link = link or LinkModel()
        self.measured_link: Optional[LinkModel] = None
        self.comm_stats = CommStats()
        self._hook_state: Optional[FireCaffeHookState] = None

    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        backend = self._get_process_group_backend()
        # Collective calls: every rank reaches configure_ddp in the same order, so group creation matches.
        # Two groups: one TCP connection per direction of each pair (see ScheduleExecutor).
        group, group_reverse = dist.new_group(backend=backend), dist.new_group(backend=backend)
        world_size = dist.get_world_size(group)
        ranks_per_node = max(1, self.num_processes)
        if self.link == "measure":
            rank = dist.get_rank(group)
            self.measured_link = link = measure_link(rank, world_size, ranks_per_node, group=group, device=self.root_device)
            rank_zero_info(
                f"FireCaffe: measured links {link.bandwidth_Bps * 8 / 1e9:.2f} Gbit/s, {link.latency_s * 1e6:.0f} us "
                "latency; `auto` picks algorithms for them"
            )
        else:
            link = dataclasses.replace(self.link, ranks_per_node=ranks_per_node)
        self._hook_state = FireCaffeHookState(
            group=group,
            group_reverse=group_reverse,
            rank=dist.get_rank(group),
            world_size=world_size,
            selector=ScheduleSelector(self.algorithm, world_size, self.arity, self.chunk_bytes, link),
            stall_timeout=self.stall_timeout,
            inline=backend == "nccl",
            stats=self.comm_stats,
            current_step=self._current_step,
        )
        hook = firecaffe_hook if self._ddp_comm_wrapper is None else self._ddp_comm_wrapper(firecaffe_hook)
        self.model.register_comm_hook(self._hook_state, hook)

    def _current_step(self) -> int:
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        return trainer.global_step if trainer is not None else 0

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        from .callbacks.comm_telemetry import CommTelemetry

        if not any(isinstance(cb, CommTelemetry) for cb in trainer.callbacks):
            trainer.callbacks.append(CommTelemetry())

    def teardown(self) -> None:
        if self._hook_state is not None:
            self._hook_state.close()
            self._hook_state = None
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Lowercase names, registered idempotently: launchers like ``ddp``, plus one name per algorithm."""
        entries = [
            ("firecaffe", "popen", {}),
            ("firecaffe_spawn", "spawn", {}),
            ("firecaffe_fork", "fork", {}),
        ] + [(f"firecaffe_{name}", "popen", {"algorithm": name}) for name in ALGORITHMS]
        for name, start_method, extra in entries:
            strategy_registry.register(
                name,
                cls,
                description=f"FireCaffe reduction-tree all-reduce, start_method '{start_method}' {extra or ''}".strip(),
                override=True,
                start_method=start_method,
                **extra,
            )
