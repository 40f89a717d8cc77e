"""``FireCaffeStrategy``: Lightning's DDP with the gradient all-reduce replaced by a reduction tree.

A thin policy over torch DDP, like Lightning's own ``DDPStrategy``: it swaps the communication hook (the
stock strategy silently skips hooks on CPU), gives the hook dedicated process groups so tree traffic never
interleaves with Lightning's own collectives, keeps the gradient path's state in checkpoints, and turns a
failed peer into an error that names it. Its positional parameters are ``DDPStrategy``'s, in
``DDPStrategy``'s order; every FireCaffe option is keyword-only and lives in :class:`FireCaffeOptions`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from .comm.cost_model import LinkModel
from .comm.hook import FireCaffeHookState
from .comm.saved_state import SavedCommState
from .comm.telemetry import CommStats
from .compat import launched_pids, trainer_of
from .errors import PeerStallError, closed_connection
from .gradient_path import GradientPath, options_from
from .process_groups import end_process_groups_at_exit, training_failed
from .strategy_names import register_names
from .watchdog import Watchdog, beat

log = logging.getLogger(__name__)


class FireCaffeStrategy(DDPStrategy):
    """Data-parallel training whose gradient all-reduce is a reduction tree over point-to-point ops.

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            ddp_comm_wrapper, process_group_backend, timeout, start_method: as for ``DDPStrategy`` (same
            positions). ``ddp_comm_state``/``ddp_comm_hook`` must stay ``None``: this strategy installs its
            own hook.
        model_averaging_period: ``None`` (default) or ``H >= 1``: post-local SGD (Lin et al. 2020), never
            turned on by ``auto``. After ``averaging_start_step`` optimizer steps of full gradient
            synchronisation, each rank applies its own gradient (averaged inside its node every step when
            a node runs several ranks) and every ``H`` optimizer steps (not micro-batches) the parameters
            are averaged across all ranks by the chosen algorithm (``auto``: the cost model's or its measured
            pick for that size). The average sends the change since the last one, and every rank ends with
            the same bits. Optimizer state is not averaged; checkpoints keep every rank's weights and
            optimizer state, so a run resumed between two averages continues exactly. An average does not
            overlap the next steps (they read the weights being averaged: the result would change).
        averaging_start_step: optimizer steps that synchronise gradients before local steps begin (>= 1;
            default 8: past DDP's bucket rebuild after step 1 and the first, largest updates).
        averaging_wire: ``None`` or ``"bf16"``: the averages' deltas travel in bf16 (half the bytes;
            fp16 is refused: small deltas fall below its range).
        algorithm: ``"auto"`` or any registered algorithm (``lightning_firecaffe.algorithm_names()``:
            FireCaffe's ``"tree"``, ``"ring"``, the backend's own ``"native"``, ...). ``auto`` measures:
            during the first optimizer steps after DDP has rebuilt its buckets it times the candidates
            (the cost model's best few, plus ``native``) on every real bucket size and keeps the fastest
            per size (the slowest rank's time counts; all ranks choose alike); the choices are logged,
            summarised and checkpointed, so a resumed run does not re-tune. With ``link`` given it picks
            by the cost model alone.
        arity: children per tree node (2 = binary).
        chunk_bytes: piece size streamed by the pipelined algorithms.
        stall_timeout: seconds a rank waits for a silent peer before failing with an error naming it; also
            the watchdog's limit for a rank whose progress does not move while others wait for it.
        watchdog: run the stall watchdog (:mod:`lightning_firecaffe.watchdog`) on every rank: it watches
            every collective, not just the gradient all-reduce, and names the rank that holds the job up.
        stall_action: ``"fail"``: after ``stall_grace`` more seconds every rank exits with status 70 and the
            verdict as the last lines of its log; ``"warn"``: only warn.
        stall_grace: seconds between the watchdog's warning and ``"fail"`` (default ``stall_timeout / 2``).
        stall_allowance: seconds a phase kind may stand still, where longer than ``stall_timeout``
            (defaults: ``setup`` 300, ``warmup`` 300 - first step, first batch of each DataLoader pass -
            and ``checkpoint`` 600).
        link: ``None`` (default): ``auto`` measures the candidates; a ``LinkModel`` or ``"measure"`` (a
            ping-pong at start-up) makes ``auto`` pick by the cost model under that link instead, without
            tuning. Ranks per node come from ``devices``. (Different choices add in different orders, so
            at more than 2 ranks results are reproducible to rounding, not bitwise, across runs.)
        auto_repetitions: timed trials per candidate and bucket size while ``auto`` tunes.
        compression: ``None`` (gradients travel in their own dtype), ``"bf16"`` or ``"fp16"``: every algorithm
            sends 16-bit values (half the bytes) while each rank accumulates in fp32; ``auto`` tunes within
            that format and never turns compression on by itself. fp16 travels scaled by a dynamic power of
            two; a bucket that overflows anyway makes every rank skip that optimizer step, with a warning
            naming the bucket (the weights never see an inf). See ``comm/compression.py`` for the error bound.
        compression_error_feedback: add each step's rounding residual to the next step's gradient, so the
            applied updates stay within one step's rounding of full precision over any number of steps.
            Costs one gradient-sized fp32 buffer per rank; checkpoints hold every rank's residual (gathered
            to rank 0), so a resumed run continues exactly.
        powersgd_rank, powersgd_start_step, powersgd_min_compression_rate, powersgd_wire: with
            ``compression="powersgd"``, low-rank gradients (PowerSGD, :mod:`lightning_firecaffe.comm.low_rank`):
            each weight travels as two rank-``powersgd_rank`` factors (default 4) whose messages any algorithm
            (or ``auto``) sums, with error feedback and warm start; full gradients until optimizer step
            ``powersgd_start_step`` (default 10); tensors that would save less than
            ``powersgd_min_compression_rate`` (default 2) travel uncompressed; ``powersgd_wire="bf16"``
            sends the factors in bf16. It changes convergence: ``auto`` never turns it on. Checkpoints hold
            the factors and every rank's residuals, so a resumed run continues exactly.
        **kwargs: forwarded to ``DDPStrategy`` and on to torch's ``DistributedDataParallel``
            (``bucket_cap_mb``, ``find_unused_parameters``, ``gradient_as_bucket_view``, ...).

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
        precision_plugin: Any | None = None,
        ddp_comm_state: object | None = None,
        ddp_comm_hook: Callable | None = None,
        ddp_comm_wrapper: Callable | None = None,
        model_averaging_period: int | None = None,
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
        averaging_start_step: int = 8,
        averaging_wire: str | None = None,
        **kwargs: Any,
    ) -> None:
        refused = {"ddp_comm_hook": ddp_comm_hook, "ddp_comm_state": ddp_comm_state}
        self.options = options_from(locals(), start_method, **refused)
        super().__init__(
            accelerator,
            parallel_devices,
            cluster_environment,
            checkpoint_io,
            precision_plugin,
            ddp_comm_wrapper=ddp_comm_wrapper,
            model_averaging_period=model_averaging_period,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self.gradient_path = GradientPath(self.options)  # everything of the gradient path, shared with Fabric's

    _failed_with: BaseException | None = None

    # The gradient path's parts, read where the strategy used to keep them.
    comm_stats: CommStats = property(lambda self: self.gradient_path.stats)
    saved_comm: SavedCommState = property(lambda self: self.gradient_path.saved)
    measured_link: LinkModel | None = property(lambda self: self.gradient_path.measured_link)
    watchdog: Watchdog | None = property(lambda self: self.gradient_path.watchdog)
    _hook_state: FireCaffeHookState | None = property(lambda self: self.gradient_path.hook_state)
    selected_gloo_interface: str | None = property(lambda self: self.gradient_path.selected_gloo_interface)

    # The options, read where the strategy used to keep them as attributes.
    algorithm = property(lambda self: self.options.algorithm)
    stall_timeout = property(lambda self: float(self.options.stall_timeout))
    compression = property(lambda self: self.options.compression)
    wire_format = property(lambda self: self.options.wire_format)

    # ------------------------------------------------------------------ the hook
    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        self.gradient_path.install(
            self.model,
            backend=self._get_process_group_backend(),
            device=self.root_device,
            ranks_per_node=self.num_processes,
            current_step=self._current_step,
            wrapper=self._ddp_comm_wrapper,
        )

    # ------------------------------------------------------------------ checkpointed state
    def auto_choices(self) -> dict[int, str]:
        """``auto``'s measured choice per bucket size so far (or the checkpoint's, before the hook exists)."""
        return self.gradient_path.auto_choices()

    def comm_state(self) -> SavedCommState:
        """What checkpoints keep of the gradient path (a collective with error feedback: every rank)."""
        return self.gradient_path.state(self.world_size)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        replicas = ("state_dict", "optimizer_states")  # local SGD: every rank's, between averages
        self.gradient_path.save_into(checkpoint, self.world_size, replicas)  # every rank: Trainer.save_checkpoint
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        beat("checkpoint load", "checkpoint")
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        self.gradient_path.restore(checkpoint)  # before the hook is built: Lightning restores before setup
        self.gradient_path.own_replica(checkpoint, self.global_rank, self.world_size, "state_dict")
        return checkpoint

    # ------------------------------------------------------------------ training
    @override
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any | None = None, **kwargs: Any
    ) -> Any:
        """With fp16 on the wire, run the closure (backward and the all-reduce) first: if a bucket
        overflowed - on every rank alike, the reduced values are identical - skip this step. With local
        SGD, average the parameters after every ``model_averaging_period``-th local step."""
        if not self.gradient_path.scaled:
            step = self._current_step()
            self.gradient_path.before_optimizer_step(step)
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
            self.gradient_path.after_optimizer_step(step, self.global_rank)
            return output
        result = closure()
        if self.gradient_path.step_overflowed(self._current_step()):
            return result
        return super().optimizer_step(optimizer, lambda: result, model, **kwargs)

    def _current_step(self) -> int:
        trainer = trainer_of(self.lightning_module)
        return trainer.global_step if trainer is not None else 0

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """DDP's forward may run a collective of its own (the bucket rebuild after the first step): a dead
        peer there is named like one in the hook."""
        try:
            return super().training_step(*args, **kwargs)
        except RuntimeError as exc:
            if isinstance(exc, PeerStallError) or not closed_connection(exc):
                raise
            raise self.explain_failure(PeerStallError(str(exc), closed=True), "in DDP's forward") from exc

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """torch wraps the comm hook's error ("Unable to cast ... to Tensor"): raise the hook's own, with
        the peer named. After the first backward that reduced gradients, DDP rebuilds its buckets: from
        then on ``auto`` may time its candidates on the sizes training will use."""
        synced = getattr(self.model, "require_backward_grad_sync", True)
        try:
            loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        except RuntimeError as exc:
            error = self.gradient_path.hook_error(exc)
            if error is None:
                raise
            raise self.explain_failure(error, "reducing gradients") from error.__cause__
        self.gradient_path.after_backward(synced)
        return loss

    def explain_failure(self, error: BaseException, doing: str) -> BaseException:
        """The error a user reads, the failed peer named (see ``GradientPath.explain_failure``)."""
        return self.gradient_path.explain_failure(error, doing, rank=self.global_rank, step=self._current_step())

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup_environment(self) -> None:
        # gloo's interface: the one routing to MASTER_ADDR, or a clear error for a wrong GLOO_SOCKET_IFNAME
        # (undone at teardown: a later Trainer in this process, or the user's own code, finds os.environ as it was)
        main_address, announce = self.cluster_environment.main_address, self.local_rank == 0
        self.gradient_path.configure_gloo(self._get_process_group_backend(), self.world_size, main_address, announce)
        super().setup_environment()
        end_process_groups_at_exit()  # Lightning leaves the group alive, and gloo may abort the exit then
        trainer = trainer_of(self.lightning_module)
        if trainer is not None:
            self._add_callbacks(trainer)
            self._start_watchdog()

    def _add_callbacks(self, trainer: Any) -> None:
        """Telemetry (metrics, end-of-fit summary) and, with the watchdog, phase beats from Lightning's hooks."""
        from .callbacks.comm_telemetry import CommTelemetry
        from .callbacks.phase_beats import PhaseBeats

        if not any(isinstance(cb, CommTelemetry) for cb in trainer.callbacks):
            trainer.callbacks.append(CommTelemetry())
        watched = self.options.watchdog and self.world_size > 1
        if watched and not any(isinstance(cb, PhaseBeats) for cb in trainer.callbacks):
            trainer.callbacks.append(PhaseBeats())

    def _start_watchdog(self) -> None:
        """The watchdog thread (here: after launch, in the process that trains)."""
        self.gradient_path.start_watchdog(self.global_rank, self.world_size, lambda: launched_pids(self))

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._failed_with = exception  # teardown tells the other ranks, and stops launched ranks that hang
        training_failed()  # the groups stay for the exit to drop (a destroy could wait on a dead peer)

    @override
    def teardown(self) -> None:
        self.gradient_path.close_hook()
        super().teardown()
        failed, self._failed_with = self._failed_with, None
        self.gradient_path.restore_process(failed, launched_pids(self))  # watchdog last: a hanging teardown is watched

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """``firecaffe``, ``firecaffe_spawn``, ``firecaffe_fork`` and ``firecaffe_<algorithm>`` (see strategy_names)."""
        register_names(cls, strategy_registry)
