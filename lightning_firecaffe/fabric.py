"""``Fabric(strategy="firecaffe")``: Fabric's DDP with the gradient all-reduce replaced by a reduction tree.

The Fabric twin of :class:`lightning_firecaffe.strategy.FireCaffeStrategy`, as thin over Fabric's
``DDPStrategy`` as that one is over the Trainer's: the same options object, the same
:class:`~lightning_firecaffe.gradient_path.GradientPath` (hook, ``auto``, 16-bit wire, checkpointed state,
failures that name the peer, watchdog). Fabric has no callbacks and no teardown, so this strategy takes
its cues from Fabric's own entry points (``setup``, ``backward``, ``optimizer.step``, ``save``/``load``):
they are the watchdog's progress beats, and the process is restored at exit.
"""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from .comm.cost_model import LinkModel
from .comm.saved_state import CHECKPOINT_KEY
from .comm.telemetry import CommStats, step_metrics
from .compat import launched_pids
from .gradient_path import GradientPath, options_from
from .options import require
from .process_groups import end_process_groups_at_exit, training_failed
from .strategy_names import register_names
from .strategy_options import OWNER, TRAINER_ONLY
from .watchdog import beat

log = logging.getLogger(__name__)


class FireCaffeStrategy(DDPStrategy):
    """Fabric's data-parallel strategy whose gradient all-reduce is a reduction tree over point-to-point ops.

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision, process_group_backend,
            timeout, start_method: as for Fabric's ``DDPStrategy`` (same positions).
        algorithm, arity, chunk_bytes, stall_timeout, link, auto_repetitions, compression,
            compression_error_feedback, powersgd_rank, powersgd_start_step, powersgd_min_compression_rate,
            powersgd_wire, watchdog, stall_action, stall_grace, stall_allowance: keyword-only,
            the same options with the same meaning as the Trainer's ``FireCaffeStrategy``
            (:class:`~lightning_firecaffe.FireCaffeOptions`).
        **kwargs: forwarded to torch's ``DistributedDataParallel`` (``bucket_cap_mb``, ...).

    The hook goes on the first module set up (a second one keeps DDP's own all-reduce, with a warning).
    ``strategy.comm_metrics()`` gives the last step's figures for ``fabric.log_dict``; rank 0 prints the
    end-of-run summary at exit (``strategy.comm_summary()``).

    Raises:
        InvalidOption: (a ``ValueError``) naming the option and what it allows.
    """

    strategy_name = "firecaffe"

    def __init__(
        self,
        accelerator: Any | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any | None = None,
        checkpoint_io: Any | None = None,
        precision: Any | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        *,
        algorithm: str = "auto",
        arity: int = 2,
        chunk_bytes: int = 1 << 20,
        stall_timeout: float = 60.0,
        link: LinkModel | str | None = None,
        auto_repetitions: int = 2,
        compression: str | None = None,
        compression_error_feedback: bool = False,
        powersgd_rank: int | None = None,
        powersgd_start_step: int | None = None,
        powersgd_min_compression_rate: float | None = None,
        powersgd_wire: str | None = None,
        watchdog: bool = True,
        stall_action: str = "fail",
        stall_grace: float | None = None,
        stall_allowance: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        for option in TRAINER_ONLY:  # not DDP keywords either: refused here, not by torch at setup
            why = "is the Trainer's FireCaffeStrategy's only (local SGD; Fabric's checkpoints keep no step count)"
            require(option not in kwargs, OWNER, option, kwargs.get(option), why)
        self.options = options_from(locals(), start_method)
        super().__init__(
            accelerator,
            parallel_devices,
            cluster_environment,
            checkpoint_io,
            precision,
            process_group_backend,
            timeout,
            start_method,
            **kwargs,
        )
        self.gradient_path = GradientPath(self.options)
        self._ddp: DistributedDataParallel | None = None  # the module with the hook (not ``model``: see Fabric)
        self._steps = 0  # optimizer steps taken: Fabric keeps no step count
        self._exit_hook: Callable[[], None] | None = None

    algorithm = property(lambda self: self.options.algorithm)
    stall_timeout = property(lambda self: float(self.options.stall_timeout))
    comm_stats: CommStats = property(lambda self: self.gradient_path.stats)
    watchdog = property(lambda self: self.gradient_path.watchdog)

    def auto_choices(self) -> dict[int, str]:
        """``auto``'s measured choice per bucket size so far (or the checkpoint's)."""
        return self.gradient_path.auto_choices()

    def comm_metrics(self) -> dict[str, float]:
        """The last optimizer step's communication figures, for ``fabric.log_dict`` (the Trainer's names)."""
        return step_metrics(self.comm_stats)

    def comm_summary(self) -> str:
        """The end-of-run summary the Trainer prints at the end of fit."""
        return self.comm_stats.summary(self.algorithm)

    # ------------------------------------------------------------------ setup
    @override
    def setup_environment(self) -> None:
        main_address, announce = self.cluster_environment.main_address, self.local_rank == 0
        self.gradient_path.configure_gloo(self._get_process_group_backend(), self.world_size, main_address, announce)
        super().setup_environment()
        self.gradient_path.start_watchdog(self.global_rank, self.world_size, lambda: launched_pids(self))
        end_process_groups_at_exit()  # after teardown (atexit runs in reverse), if the run succeeded
        if self._exit_hook is None:  # Fabric has no teardown: the process is restored when it exits
            self._exit_hook = self.teardown
            atexit.register(self._exit_hook)

    @override
    def setup_module(self, module: Module) -> DistributedDataParallel:
        beat("setup: wrapping the model in DDP", "setup", self._steps)
        ddp = super().setup_module(module)
        if self._ddp is not None:
            log.warning(
                "FireCaffe: the gradient path serves the first module set up; %s keeps DDP's own all-reduce",
                type(module).__name__,
            )
            return ddp
        if not dist.is_initialized():  # one process set up without launch(): nobody to reduce with, no hook
            log.debug("FireCaffe: no process group, so no gradient path to install on %s", type(module).__name__)
            return ddp
        self._ddp = ddp
        self.gradient_path.install(
            ddp,
            backend=self._get_process_group_backend(),
            device=self.root_device,
            ranks_per_node=self.num_processes,
            current_step=lambda: self._steps,
        )
        beat(f"step {self._steps}: user code (forward)", "warmup", self._steps)
        return ddp

    # ------------------------------------------------------------------ training: Fabric's entry points
    def _kind(self) -> str:
        return "warmup" if self._steps == 0 else "normal"  # the first step may compile, allocate, rebuild

    @override
    def backward(self, tensor: torch.Tensor, module: Module | None, *args: Any, **kwargs: Any) -> None:
        """The hook's error, unwrapped and with the peer named; after the first synced backward ``auto``
        may time its candidates (DDP has rebuilt its buckets)."""
        synced = getattr(self._ddp, "require_backward_grad_sync", True)  # False under fabric.no_backward_sync
        beat(f"step {self._steps} (backward)", self._kind(), self._steps)
        try:
            super().backward(tensor, module, *args, **kwargs)
        except RuntimeError as exc:
            error = self.gradient_path.hook_error(exc)
            if error is None:
                raise
            error = self.explain_failure(error, "reducing gradients")
            self._failed(error)
            raise error from error.__cause__
        self.gradient_path.after_backward(synced)
        beat(f"step {self._steps}: after backward (user code)", self._kind(), self._steps)

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """With fp16 on the wire, a step whose buckets overflowed is skipped on every rank alike."""
        beat(f"optimizer step {self._steps}", self._kind(), self._steps)
        skip = self.gradient_path.scaled and self.gradient_path.step_overflowed(self._steps)
        result = None if skip else super().optimizer_step(optimizer, **kwargs)
        self._steps += 1
        beat(f"after optimizer step {self._steps - 1}: user code (next batch, forward)", "normal", self._steps)
        return result

    def explain_failure(self, error: BaseException, doing: str) -> BaseException:
        """The error a user reads, the failed peer named (see ``GradientPath.explain_failure``)."""
        return self.gradient_path.explain_failure(error, doing, rank=self.global_rank, step=self._steps)

    def _failed(self, error: BaseException) -> None:
        """Training failed here: the others hear why, and ranks this process launched do not outlive it."""
        training_failed()
        self.gradient_path.restore_process(error, launched_pids(self))

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """Adds the gradient path's state (a collective with error feedback: ``fabric.save`` runs on every rank)."""
        state = dict(state)  # the user's dict is left as it was
        self.gradient_path.save_into(state, self.world_size)
        super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)
        beat(f"after saving a checkpoint at step {self._steps} (user code)", "normal", self._steps)

    @override
    def load_checkpoint(
        self, path: Any, state: Any | None = None, strict: bool = True, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Restores the gradient path's state too (``auto``'s choices, compression's scale and residuals);
        the remainder handed back to the user no longer holds it."""
        beat("checkpoint load", "checkpoint", self._steps)
        remainder = super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        if not isinstance(state, (Module, torch.optim.Optimizer)):
            self.gradient_path.restore(remainder)
            if state:
                remainder.pop(CHECKPOINT_KEY, None)
        beat(f"after loading a checkpoint (user code) at step {self._steps}", "warmup", self._steps)
        return remainder

    # ------------------------------------------------------------------ the end
    @override
    def teardown(self) -> None:
        """At exit (or when called): the summary on rank 0, the hook's threads and groups released, the
        watchdog's goodbye (with the error, if the run died of one), the process as it was found."""
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
            self._exit_hook = None
        if self.comm_stats.completed_steps:
            rank_zero_info(self.comm_summary())
        failed = getattr(sys, "last_value", None)  # set by the interpreter for an exception nobody caught
        self.gradient_path.close_hook()
        self._ddp = None
        super().teardown()
        self.gradient_path.restore_process(failed, launched_pids(self))

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """``firecaffe``, ``firecaffe_spawn``, ``firecaffe_fork`` and ``firecaffe_<algorithm>`` (see strategy_names)."""
        register_names(cls, strategy_registry)
