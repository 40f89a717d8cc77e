"""``FireCaffeStrategy``: Lightning's DDP with the gradient all-reduce replaced by a reduction tree.

A thin policy over torch DDP, like Lightning's own ``DDPStrategy``: it swaps the communication hook (the
stock strategy silently skips hooks on CPU), gives the hook dedicated process groups so tree traffic never
interleaves with Lightning's own collectives, keeps the gradient path's state in checkpoints, and turns a
failed peer into an error that names it. Its positional parameters are ``DDPStrategy``'s, in
``DDPStrategy``'s order; every FireCaffe option is keyword-only and lives in :class:`FireCaffeOptions`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from .comm.calibration import measure_link
from .comm.compression import BucketLayout, GradientCompression
from .comm.cost_model import LinkModel
from .comm.hook import FireCaffeHookState, ScheduleSelector, firecaffe_hook
from .comm.saved_state import CHECKPOINT_KEY, SavedCommState
from .comm.schedules import auto_candidates, get_algorithm, on_register
from .comm.telemetry import CommStats
from .comm.tuner import AutoTuner
from .compat import launched_pids, trainer_of
from .errors import PeerStallError, closed_connection, unwrap_hook_error
from .network import GlooInterface, configure_gloo_interface, needs_gloo_interface
from .options import require, require_choice
from .processes import stop_descendants
from .strategy_options import OWNER, FireCaffeOptions
from .transport import name_the_missing
from .watchdog import Policy, Watchdog, beat, start_watchdog
from .watchdog.errors import with_watchdog_view
from .watchdog.progress import bucket_beat

log = logging.getLogger(__name__)

_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_SUBSCRIBED: set[int] = set()  # strategy registries that already hear of new algorithms
_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(FireCaffeOptions))
CENSUS_TIMEOUT_S = 5.0  # how long survivors listen for each other after a collective failed


class FireCaffeStrategy(DDPStrategy):
    """Data-parallel training whose gradient all-reduce is a reduction tree over point-to-point ops.

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            ddp_comm_wrapper, model_averaging_period, process_group_backend, timeout, start_method: as
            for ``DDPStrategy`` (same positions). ``ddp_comm_state``/``ddp_comm_hook`` must stay ``None``:
            this strategy installs its own hook.
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
        watchdog: bool = True,
        stall_action: str = "fail",
        stall_grace: float | None = None,
        stall_allowance: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        require_choice(OWNER, "start_method", start_method, _START_METHODS)
        for option, value in (("ddp_comm_hook", ddp_comm_hook), ("ddp_comm_state", ddp_comm_state)):
            why = "is not supported: the strategy installs its own comm hook (use strategy='ddp' for a custom hook)"
            require(value is None, OWNER, option, value, why)
        self.options = FireCaffeOptions(**{k: v for k, v in locals().items() if k in _OPTION_NAMES})
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
        self.comm_stats = CommStats()
        self.saved_comm = SavedCommState()  # from a checkpoint: auto's choices, compression's state

    # Runtime state, built after launch in the process that trains.
    measured_link: LinkModel | None = None  # link="measure": what the start-up ping-pong found
    watchdog: Watchdog | None = None  # the running one
    _hook_state: FireCaffeHookState | None = None
    _failed_with: BaseException | None = None
    _gloo_interface: GlooInterface | None = None  # what interface selection set, to undo at teardown
    selected_gloo_interface: str | None = None  # the interface FireCaffe chose for gloo (None: the user's)

    # The options, read where the strategy used to keep them as attributes.
    algorithm = property(lambda self: self.options.algorithm)
    stall_timeout = property(lambda self: float(self.options.stall_timeout))
    compression = property(lambda self: self.options.compression)
    wire_format = property(lambda self: self.options.wire_format)

    # ------------------------------------------------------------------ the hook, in named steps
    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        backend = self._get_process_group_backend()
        groups = self._create_groups(backend)
        rank, world_size = dist.get_rank(groups[0]), dist.get_world_size(groups[0])
        selector = self._build_selector(world_size, self._link(groups[0], rank, world_size))
        self._hook_state = FireCaffeHookState(
            *groups[:2],
            rank,
            world_size,
            selector,
            stall_timeout=self.stall_timeout,
            group_collective=groups[2],
            lockstep=backend == "nccl",
            device=self.root_device if backend == "nccl" else "cpu",
            stats=self.comm_stats,
            current_step=self._current_step,
            compression=self._build_compression(rank, world_size),
            parameter_names={id(p): name for name, p in self.model.module.named_parameters()},
            on_bucket=bucket_beat,
        )
        hook = firecaffe_hook if self._ddp_comm_wrapper is None else self._ddp_comm_wrapper(firecaffe_hook)
        self.model.register_comm_hook(self._hook_state, hook)

    def _create_groups(self, backend: str) -> tuple[Any, Any, Any]:
        """Collective calls, in the same order on every rank: one group per message direction (one TCP
        connection each, see Transport) and one for backend all-reduces launched from backward, whose
        timeout is the stall deadline. Each group's collectives are issued by one thread only."""
        forward, reverse = dist.new_group(backend=backend), dist.new_group(backend=backend)
        collective = dist.new_group(backend=backend, timeout=timedelta(seconds=self.stall_timeout))
        return forward, reverse, collective

    def _link(self, group: Any, rank: int, world_size: int) -> LinkModel:
        """The link model ``auto``'s cost model prices with: given, measured at start-up, or the default."""
        ranks_per_node = max(1, self.num_processes)
        if self.options.link != "measure":
            return dataclasses.replace(self.options.link or LinkModel(), ranks_per_node=ranks_per_node)
        link = measure_link(rank, world_size, ranks_per_node, group, self.root_device, self.stall_timeout)
        self.measured_link = link
        if rank_zero_only.rank == 0:
            gbit, latency_us = link.bandwidth_Bps * 8 / 1e9, link.latency_s * 1e6
            log.info("FireCaffe: measured links %.2f Gbit/s, %.0f us latency; `auto` picks for them", gbit, latency_us)
        return link

    def _build_selector(self, world_size: int, link: LinkModel) -> ScheduleSelector:
        """The algorithm per bucket size; ``auto`` with a tuner that starts from a checkpoint's choices.
        With error feedback ``auto`` weighs only algorithms that sum in fp32 (not the backend's)."""
        o, candidates = self.options, None
        if o.compression_error_feedback:
            eligible = auto_candidates(world_size, link.ranks_per_node)
            candidates = tuple(a for a in eligible if not get_algorithm(a).collective)
        selector = ScheduleSelector(o.algorithm, world_size, o.arity, o.chunk_bytes, link, candidates=candidates)
        if o.tunes:
            choices = self.saved_comm.auto_choices
            restored = {n: a for n, a in choices.items() if candidates is None or a in candidates}
            selector.tuner = AutoTuner.restored(
                restored,
                world_size=world_size,
                link=link,
                fallback=selector.model_choice,
                arity=o.arity,
                chunk_bytes=o.chunk_bytes,
                repetitions=o.auto_repetitions,
                candidates=candidates,
            )
        return selector

    def _build_compression(self, rank: int, world_size: int) -> GradientCompression | None:
        """The wire format with its state, restored from a checkpoint when there is one."""
        if self.wire_format is None:
            return None
        compression = GradientCompression(self.wire_format, self.options.compression_error_feedback)
        self.comm_stats.wire_format = self.wire_format.name
        restored = self.saved_comm.compression or {}
        compression.load_state_dict(restored)
        saved = restored.get("error_feedback")
        if saved is None or compression.error_feedback is None:
            return compression
        if saved["world_size"] == world_size:
            residual = saved["residuals"][rank].to(self.root_device)
            compression.error_feedback.load_state_dict(residual, self._model_layout())
        else:
            log.warning(
                "FireCaffe: the checkpoint's error-feedback residuals are from %d ranks, this run has %d; starting "
                "without them (at most one step's rounding is not carried over)",
                saved["world_size"],
                world_size,
            )
        return compression

    def _model_layout(self) -> BucketLayout:
        """Every trainable parameter by name, in the module's order: how error-feedback state is saved."""
        module = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        return tuple((name, p.numel()) for name, p in module.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------ checkpointed state
    def auto_choices(self) -> dict[int, str]:
        """``auto``'s measured choice per bucket size so far (or the checkpoint's, before the hook exists)."""
        tuner = self._hook_state.selector.tuner if self._hook_state is not None else None
        return tuner.choices() if tuner is not None else dict(self.saved_comm.auto_choices)

    def comm_state(self) -> SavedCommState:
        """What checkpoints keep of the gradient path. A collective with error feedback (every rank's
        residual is gathered): every rank calls it, from :meth:`save_checkpoint`."""
        compression = self._hook_state.compression if self._hook_state is not None else None
        if compression is None:
            return SavedCommState(self.auto_choices(), self.saved_comm.compression)
        state = compression.state_dict()
        if compression.error_feedback is not None:
            layout = self._model_layout()
            flat = compression.error_feedback.state_dict(layout)
            if flat is None:
                flat = torch.zeros(sum(n for _, n in layout), device=self.root_device)
            gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(gathered, flat)
            state["error_feedback"] = {"world_size": self.world_size, "residuals": [g.cpu() for g in gathered]}
        return SavedCommState(self.auto_choices(), state)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        beat("checkpoint save", "checkpoint")  # its own allowance: slow disks are no stall
        checkpoint[CHECKPOINT_KEY] = self.comm_state().to_dict()  # every rank: Trainer.save_checkpoint
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        beat("checkpoint load", "checkpoint")
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        saved = SavedCommState.from_checkpoint(checkpoint)
        if saved is not None:  # before the hook is built: Lightning restores before strategy.setup
            self.saved_comm = saved
        return checkpoint

    # ------------------------------------------------------------------ training
    @override
    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any | None = None, **kwargs: Any
    ) -> Any:
        """With fp16 on the wire, run the closure (backward and the all-reduce) first: if a bucket
        overflowed - on every rank alike, the reduced values are identical - skip this step."""
        compression = self._hook_state.compression if self._hook_state is not None else None
        if compression is None or compression.scale is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        result = closure()
        overflowed = compression.end_step()
        if not overflowed:
            return super().optimizer_step(optimizer, lambda: result, model, **kwargs)
        step = self._current_step()
        self.comm_stats.skipped_steps.append((step, overflowed))
        log.warning(
            "FireCaffe fp16 compression: gradient bucket(s) %s overflowed (inf/NaN after the all-reduce) at "
            "training step %d; the optimizer step is skipped on every rank and the scale lowered to 2^%d",
            ", ".join(map(str, overflowed)),
            step,
            int(math.log2(compression.scale.scale)),
        )
        return result

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
            error = unwrap_hook_error(exc, self._hook_state.failure if self._hook_state is not None else None)
            if error is None:
                raise
            raise self.explain_failure(error, "reducing gradients") from error.__cause__
        if synced and self._hook_state is not None and not self._hook_state.selector.rebuilt:
            self._hook_state.selector.buckets_rebuilt()
        return loss

    def explain_failure(self, error: BaseException, doing: str) -> BaseException:
        """The error a user reads: a backend collective's failure names no peer, so the survivors take a
        census (dead peers closed their connections, stopped ones stay silent). For a silent peer the
        watchdog adds what it knows; a peer that closed its connection is dead, and that is the whole story."""
        if isinstance(error, PeerStallError) and not error.peers and self._hook_state is not None:
            census = self._hook_state.transport.census(min(CENSUS_TIMEOUT_S, self.stall_timeout))
            cause = error.__cause__ or error
            step = self._current_step()
            named = name_the_missing(
                census, self.global_rank, doing, step=step, timeout_s=self.stall_timeout, cause=cause
            )
            if named is not None:
                named.__cause__, error = cause, named
        if self.watchdog is not None:
            peers, closed = getattr(error, "peers", []), getattr(error, "closed", False)
            error = with_watchdog_view(error, self.watchdog.describe(peers, closed=closed))
        return error

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup_environment(self) -> None:
        # gloo's interface: the one routing to MASTER_ADDR, or a clear error for a wrong GLOO_SOCKET_IFNAME
        # (undone at teardown: a later Trainer in this process, or the user's own code, finds os.environ as it was)
        if needs_gloo_interface(self._get_process_group_backend(), self.world_size):
            self._gloo_interface = configure_gloo_interface(
                self.cluster_environment.main_address, announce=self.local_rank == 0
            )
            self.selected_gloo_interface = self._gloo_interface.name if self._gloo_interface.chosen else None
        super().setup_environment()
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
        if not self.options.watchdog or self.world_size < 2 or self.watchdog is not None:
            return
        o = self.options
        self.watchdog = start_watchdog(
            self.global_rank,
            self.world_size,
            Policy(self.stall_timeout, o.allowances),
            action=o.stall_action,
            grace_s=o.grace_s,
            launched_ranks=lambda: launched_pids(self),
        )
        beat("setup", "setup")

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._failed_with = exception  # teardown tells the other ranks, and stops launched ranks that hang

    @override
    def teardown(self) -> None:
        if self._hook_state is not None:
            self._hook_state.close()
            self._hook_state = None
        super().teardown()
        failed, self._failed_with = self._failed_with, None
        if self.watchdog is not None:  # last: a teardown that hangs is still watched
            self.watchdog.stop(error=failed)
            self.watchdog = None
        if failed is not None and launched_pids(self):  # ranks this process started must not outlive it
            stop_descendants(launched_pids(self), min(10.0, self.stall_timeout))
        if self._gloo_interface is not None:
            self._gloo_interface.restore()
            self._gloo_interface = None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Lowercase names, registered idempotently: launchers like ``ddp`` (``firecaffe``,
        ``firecaffe_spawn``, ``firecaffe_fork``), plus ``firecaffe_<algorithm>`` for every algorithm of the
        registry, including those registered later."""
        for name, start_method in (("firecaffe", "popen"), ("firecaffe_spawn", "spawn"), ("firecaffe_fork", "fork")):
            strategy_registry.register(
                name,
                cls,
                description=f"FireCaffe all-reduce (auto), start_method '{start_method}'",
                override=True,
                start_method=start_method,
            )
        if id(strategy_registry) in _SUBSCRIBED:
            return
        _SUBSCRIBED.add(id(strategy_registry))

        def register_algorithm_name(algorithm: Any) -> None:
            strategy_registry.register(
                f"firecaffe_{algorithm.name}",
                cls,
                description=f"FireCaffe all-reduce '{algorithm.name}': {algorithm.summary}",
                override=True,
                start_method="popen",
                algorithm=algorithm.name,
            )

        on_register(
            register_algorithm_name, lambda algorithm: strategy_registry.pop(f"firecaffe_{algorithm.name}", None)
        )
