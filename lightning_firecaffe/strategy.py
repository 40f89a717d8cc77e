"""``FireCaffeStrategy``: Lightning's DDP with the gradient all-reduce replaced by a reduction tree.

A thin policy over torch DDP, like Lightning's own ``DDPStrategy``: it only swaps the communication hook
(the stock strategy silently skips hooks on CPU), gives the hook a dedicated process group so tree traffic
never interleaves with Lightning's own collectives, and adds a telemetry callback. Its positional
parameters are ``DDPStrategy``'s, in ``DDPStrategy``'s order; every FireCaffe option is keyword-only.
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
from .comm.compression import BucketLayout, GradientCompression, check_compression
from .comm.cost_model import LinkModel
from .comm.hook import FireCaffeHookState, ScheduleSelector, firecaffe_hook
from .comm.schedules import algorithm_names, auto_candidates, get_algorithm, on_register
from .comm.telemetry import CommStats
from .comm.tuner import AutoTuner
from .errors import unwrap_hook_error
from .network import configure_gloo_interface, needs_gloo_interface
from .options import is_int, require, require_choice
from .watchdog import ACTIONS, Policy, Watchdog, beat, start_watchdog
from .watchdog.errors import with_watchdog_view
from .watchdog.monitor import kill_children
from .watchdog.verdict import bad_allowances, merge_allowances

log = logging.getLogger(__name__)

_OWNER = "FireCaffeStrategy"
_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_SUBSCRIBED: set[int] = set()  # strategy registries that already hear of new algorithms


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
        require_choice(_OWNER, "algorithm", algorithm, ("auto", *algorithm_names()))
        require(is_int(arity) and arity >= 2, _OWNER, "arity", arity, "must be an integer >= 2 (2 = binary tree)")
        require(
            is_int(chunk_bytes) and chunk_bytes > 0,
            _OWNER,
            "chunk_bytes",
            chunk_bytes,
            "must be a positive integer number of bytes",
        )
        require(
            isinstance(stall_timeout, (int, float))
            and not isinstance(stall_timeout, bool)
            and math.isfinite(stall_timeout)
            and stall_timeout > 0,
            _OWNER,
            "stall_timeout",
            stall_timeout,
            "must be a positive, finite number of seconds",
        )
        require(
            link is None or link == "measure" or isinstance(link, LinkModel),
            _OWNER,
            "link",
            link,
            "must be a LinkModel, 'measure' or None",
        )
        require_choice(_OWNER, "start_method", start_method, _START_METHODS)
        require(isinstance(watchdog, bool), _OWNER, "watchdog", watchdog, "must be True or False")
        require_choice(_OWNER, "stall_action", stall_action, ACTIONS)
        require(
            stall_grace is None
            or (
                isinstance(stall_grace, (int, float))
                and not isinstance(stall_grace, bool)
                and math.isfinite(stall_grace)
                and stall_grace >= 0
            ),
            _OWNER,
            "stall_grace",
            stall_grace,
            "must be None or a finite number of seconds >= 0",
        )
        problem = bad_allowances(stall_allowance)
        require(problem is None, _OWNER, "stall_allowance", stall_allowance, problem or "")
        require(
            is_int(auto_repetitions) and auto_repetitions >= 1,
            _OWNER,
            "auto_repetitions",
            auto_repetitions,
            "must be an integer >= 1",
        )
        self.wire_format = check_compression(compression, compression_error_feedback)
        require(
            not (compression_error_feedback and algorithm != "auto" and get_algorithm(algorithm).collective),
            _OWNER,
            "compression_error_feedback",
            compression_error_feedback,
            f"cannot be exact with algorithm={algorithm!r}: the backend's all-reduce adds in 16 bits, out of the "
            "feedback's reach (pick a scheduled algorithm, or auto, which then skips it)",
        )
        for option, value in (("ddp_comm_hook", ddp_comm_hook), ("ddp_comm_state", ddp_comm_state)):
            require(
                value is None,
                _OWNER,
                option,
                value,
                "is not supported: the strategy installs its own comm hook (use strategy='ddp' for a custom hook)",
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            ddp_comm_wrapper=ddp_comm_wrapper,
            model_averaging_period=model_averaging_period,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self.algorithm = algorithm
        self.arity = arity
        self.chunk_bytes = chunk_bytes
        self.stall_timeout = float(stall_timeout)
        self.link = link or LinkModel()
        self.tunes = algorithm == "auto" and link is None  # measure the candidates on the real buckets
        self.auto_repetitions = auto_repetitions
        self.measured_link: LinkModel | None = None
        self.restored_choices: dict[int, str] = {}  # from a checkpoint: bucket bytes -> algorithm
        self.compression = compression
        self.compression_error_feedback = compression_error_feedback
        self.restored_compression: dict | None = None  # from a checkpoint: scale and every rank's residual
        self.comm_stats = CommStats()
        self._hook_state: FireCaffeHookState | None = None
        self.watchdog_enabled, self.stall_action = watchdog, stall_action
        self.stall_grace = self.stall_timeout / 2 if stall_grace is None else float(stall_grace)
        self.stall_allowance = merge_allowances(stall_allowance)
        self.watchdog: Watchdog | None = None  # the running one, in the process that trains

    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        backend = self._get_process_group_backend()
        # Collective calls: every rank reaches configure_ddp in the same order, so group creation matches.
        # Two groups: one TCP connection per direction of each pair (see ScheduleExecutor); each group's
        # collectives are issued by one thread only, so their order is the same on every rank.
        group, group_reverse = dist.new_group(backend=backend), dist.new_group(backend=backend)
        # settled ``native`` buckets launch from the backward thread on a third group (timeout = stall deadline)
        group_collective = dist.new_group(backend=backend, timeout=timedelta(seconds=self.stall_timeout))
        world_size = dist.get_world_size(group)
        ranks_per_node = max(1, self.num_processes)
        if self.link == "measure":
            rank = dist.get_rank(group)
            self.measured_link = link = measure_link(
                rank, world_size, ranks_per_node, group=group, device=self.root_device
            )
            if rank_zero_only.rank == 0:
                log.info(
                    "FireCaffe: measured links %.2f Gbit/s, %.0f us latency; `auto` picks algorithms for them",
                    link.bandwidth_Bps * 8 / 1e9,
                    link.latency_s * 1e6,
                )
        else:
            link = dataclasses.replace(self.link, ranks_per_node=ranks_per_node)
        candidates = None
        if self.compression_error_feedback:  # feedback is exact only where sums accumulate in fp32
            eligible = auto_candidates(world_size, link.ranks_per_node)
            candidates = tuple(a for a in eligible if not get_algorithm(a).collective)
        selector = ScheduleSelector(
            self.algorithm, world_size, self.arity, self.chunk_bytes, link, candidates=candidates
        )
        if self.tunes:
            restored = {n: a for n, a in self.restored_choices.items() if candidates is None or a in candidates}
            selector.tuner = AutoTuner.restored(
                restored,
                world_size=world_size,
                link=link,
                fallback=selector.model_choice,
                arity=self.arity,
                chunk_bytes=self.chunk_bytes,
                repetitions=self.auto_repetitions,
                candidates=candidates,
            )
        compression = self._build_compression(dist.get_rank(group), world_size)
        self._hook_state = FireCaffeHookState(
            group=group,
            group_reverse=group_reverse,
            group_collective=group_collective,
            rank=dist.get_rank(group),
            world_size=world_size,
            selector=selector,
            stall_timeout=self.stall_timeout,
            inline=backend == "nccl",
            device=self.root_device if backend == "nccl" else "cpu",
            stats=self.comm_stats,
            current_step=self._current_step,
            compression=compression,
            parameter_names={id(p): name for name, p in self.model.module.named_parameters()},
        )
        hook = firecaffe_hook if self._ddp_comm_wrapper is None else self._ddp_comm_wrapper(firecaffe_hook)
        self.model.register_comm_hook(self._hook_state, hook)

    def _model_layout(self) -> BucketLayout:
        """Every trainable parameter by name, in the module's order: how error-feedback state is saved."""
        module = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        return tuple((name, p.numel()) for name, p in module.named_parameters() if p.requires_grad)

    def _build_compression(self, rank: int, world_size: int) -> GradientCompression | None:
        """The wire format with its state, restored from a checkpoint when there is one."""
        if self.wire_format is None:
            return None
        compression = GradientCompression(self.wire_format, self.compression_error_feedback)
        self.comm_stats.wire_format = self.wire_format.name
        restored = self.restored_compression or {}
        compression.load_state_dict(restored)
        saved = restored.get("error_feedback")
        if saved is not None and compression.error_feedback is not None:
            if saved["world_size"] == world_size:
                residual = saved["residuals"][rank].to(self.root_device)
                compression.error_feedback.load_state_dict(residual, self._model_layout())
            else:
                log.warning(
                    "FireCaffe: the checkpoint's error-feedback residuals are from %d ranks, this run has %d; "
                    "starting without them (at most one step's rounding is not carried over)",
                    saved["world_size"],
                    world_size,
                )
        return compression

    def compression_state(self) -> dict | None:
        """What checkpoints keep of compression: fp16's scale and, with error feedback, every rank's
        residual (a collective: every rank calls it while the checkpoint is assembled)."""
        state = self._hook_state
        compression = state.compression if state is not None else None
        if compression is None:
            return self.restored_compression
        out = compression.state_dict()
        if compression.error_feedback is not None:
            layout = self._model_layout()
            flat = compression.error_feedback.state_dict(layout)
            if flat is None:
                flat = torch.zeros(sum(n for _, n in layout), device=self.root_device)
            gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(gathered, flat)
            out["error_feedback"] = {"world_size": self.world_size, "residuals": [g.cpu() for g in gathered]}
        return out

    @override
    def optimizer_step(
        self,
        optimizer: Any,
        closure: Callable[[], Any],
        model: Any | None = None,
        **kwargs: Any,
    ) -> Any:
        """With fp16 on the wire, run the closure (backward and the all-reduce) first: if a bucket
        overflowed - on every rank alike, the reduced values are identical - skip this step."""
        compression = self._hook_state.compression if self._hook_state is not None else None
        if compression is None or compression.scale is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        result = closure()
        overflowed = compression.end_step()
        if overflowed:
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
        return super().optimizer_step(optimizer, lambda: result, model, **kwargs)

    def _current_step(self) -> int:
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        return trainer.global_step if trainer is not None else 0

    def auto_choices(self) -> dict[int, str]:
        """``auto``'s measured choice per bucket size so far (checkpointed by CommTelemetry)."""
        state = self._hook_state
        tuner = state.selector.tuner if state is not None else None
        return tuner.choices() if tuner is not None else dict(self.restored_choices)

    @override
    def setup_environment(self) -> None:
        # gloo's interface: the one routing to MASTER_ADDR, or a clear error for a wrong GLOO_SOCKET_IFNAME
        if needs_gloo_interface(self._get_process_group_backend(), self.world_size):
            configure_gloo_interface(self.cluster_environment.main_address, announce=self.local_rank == 0)
        super().setup_environment()
        # Before the checkpoint is restored (Lightning restores callbacks before strategy.setup), so that
        # CommTelemetry's state - auto's choices - comes back with it.
        from .callbacks.comm_telemetry import CommTelemetry

        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        if trainer is not None:
            telemetry = next((cb for cb in trainer.callbacks if isinstance(cb, CommTelemetry)), None)
            if telemetry is None:
                trainer.callbacks.append(telemetry := CommTelemetry())
            telemetry.strategy = self
            self._start_watchdog(trainer)

    def _start_watchdog(self, trainer: Any) -> None:
        """Phase beats from Lightning's hooks, and the watchdog thread (here: after launch, in the process
        that trains)."""
        from .callbacks.phase_beats import PhaseBeats

        if not self.watchdog_enabled or self.world_size < 2 or self.watchdog is not None:
            return
        if not any(isinstance(cb, PhaseBeats) for cb in trainer.callbacks):
            trainer.callbacks.append(PhaseBeats())
        launcher = self._launcher
        self.watchdog = start_watchdog(
            self.global_rank,
            self.world_size,
            Policy(self.stall_timeout, self.stall_allowance),
            action=self.stall_action,
            grace_s=self.stall_grace,
            launched_ranks=lambda: [p.pid for p in getattr(launcher, "procs", [])],
        )
        beat("setup", "setup")

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """torch wraps the comm hook's error ("Unable to cast ... to Tensor"): raise the hook's own."""
        try:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        except RuntimeError as exc:
            error = unwrap_hook_error(exc, getattr(self._hook_state, "failure", None))
            if error is None:
                raise
            if self.watchdog is not None:
                error = with_watchdog_view(error, self.watchdog.describe(getattr(error, "peers", [])))
            raise error from error.__cause__

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._failed_with = exception  # teardown tells the other ranks, and stops launched ranks that hang

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        beat("checkpoint save", "checkpoint")  # its own allowance: slow disks are no stall
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        beat("checkpoint load", "checkpoint")
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    @override
    def teardown(self) -> None:
        if self._hook_state is not None:
            self._hook_state.close()
            self._hook_state = None
        super().teardown()
        failed, self._failed_with = getattr(self, "_failed_with", None), None
        if self.watchdog is not None:  # last: a teardown that hangs is still watched
            self.watchdog.stop(error=failed)
            self.watchdog = None
        if failed is not None and getattr(self._launcher, "procs", None):  # ranks this process started must not
            kill_children([p.pid for p in self._launcher.procs], min(10.0, self.stall_timeout))  # outlive it (frozen)

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

        on_register(register_algorithm_name)
