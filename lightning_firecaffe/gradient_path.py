"""The gradient path's runtime, built once for any front door: the Trainer's strategy and Fabric's.

Both strategies are thin policies over their framework's ``DDPStrategy``; what they share lives here, in
one object each strategy owns (:class:`GradientPath`): the dedicated process groups, the link model,
``auto``'s selector and tuner, the wire format with its state, the hook's state and its registration on
a DDP module, what checkpoints keep (:class:`SavedCommState`), fp16's step skipping, the error a user
reads when a peer fails, the watchdog, and undoing what was changed in the process (gloo's interface
variable, threads, launched ranks). The strategies only decide *when* to call it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.nn.parallel import DistributedDataParallel

from .comm.averaging import (
    AVERAGE_BUCKET,
    AveragingPlan,
    LocalSGDHookState,
    ParameterAverager,
    averaging_algorithm,
    local_sgd_hook,
    node_groups,
    reword,
    trainable_parameters,
)
from .comm.calibration import measure_link
from .comm.compression import BucketLayout, GradientCompression
from .comm.cost_model import LinkModel
from .comm.hook import FireCaffeHookState, ScheduleSelector, firecaffe_hook
from .comm.low_rank import LowRankState
from .comm.saved_state import CHECKPOINT_KEY, SavedCommState
from .comm.schedules import auto_candidates, get_algorithm
from .comm.telemetry import AveragingTotals, CommStats
from .comm.tuner import AutoTuner
from .errors import PeerStallError, unwrap_hook_error
from .network import GlooInterface, configure_gloo_interface, needs_gloo_interface
from .options import require, require_choice
from .processes import stop
from .strategy_options import OWNER, FireCaffeOptions
from .transport import name_the_missing
from .watchdog import Policy, Watchdog, beat, start_watchdog
from .watchdog.errors import with_watchdog_view
from .watchdog.progress import bucket_beat

log = logging.getLogger(__name__)

START_METHODS = ("popen", "spawn", "fork", "forkserver")
OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(FireCaffeOptions))
CENSUS_TIMEOUT_S = 5.0  # how long survivors listen for each other after a collective failed


def options_from(arguments: dict[str, Any], start_method: str, **refused: Any) -> FireCaffeOptions:
    """A strategy constructor's FireCaffe options (from its ``locals()``), after the checks every front door
    makes: a known start method, and no comm hook of the user's (``refused``: name -> value)."""
    require_choice(OWNER, "start_method", start_method, START_METHODS)
    for option, value in refused.items():
        why = "is not supported: the strategy installs its own comm hook (use strategy='ddp' for a custom hook)"
        require(value is None, OWNER, option, value, why)
    return FireCaffeOptions(**{k: v for k, v in arguments.items() if k in OPTION_NAMES})


def model_layout(model: Any) -> BucketLayout:
    """Every trainable parameter by name, in the module's order: how error-feedback state is saved."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return tuple((name, p.numel()) for name, p in module.named_parameters() if p.requires_grad)


class GradientPath:
    """One training's gradient path: options in, hook state, checkpointed state and failures out.

    Picklable before :meth:`install` (the spawn launcher pickles the strategy that owns it); runtime parts
    are built after launch, in the process that trains.
    """

    def __init__(self, options: FireCaffeOptions) -> None:
        self.options = options
        self.stats = CommStats()
        self.saved = SavedCommState()  # from a checkpoint: auto's choices, compression's state
        self.hook_state: FireCaffeHookState | None = None
        self.measured_link: LinkModel | None = None  # link="measure": what the start-up ping-pong found
        self.watchdog: Watchdog | None = None
        self.gloo_interface: GlooInterface | None = None  # what interface selection set, to undo at the end
        self.selected_gloo_interface: str | None = None  # the interface FireCaffe chose (None: the user's)
        self._model: DistributedDataParallel | None = None
        self._device: torch.device | str = "cpu"
        self._link_model: LinkModel | None = None
        self.local_sgd: LocalSGDHookState | None = None  # model_averaging_period: the hook's local-step state
        self.averager: ParameterAverager | None = None
        self._own_module_state: dict[str, Any] | None = None  # local SGD resume: this rank's weights, after DDP

    @property
    def stall_timeout(self) -> float:
        return float(self.options.stall_timeout)

    # ------------------------------------------------------------------ the hook, in named steps
    def install(
        self,
        model: DistributedDataParallel,
        *,
        backend: str,
        device: torch.device,
        ranks_per_node: int,
        current_step: Callable[[], int],
        wrapper: Callable | None = None,
    ) -> FireCaffeHookState:
        """Build the hook's state on ``model`` (a collective: every rank, same order) and register the hook."""
        self._model, self._device = model, device
        groups = self.create_groups(backend)
        rank, world_size = dist.get_rank(groups[0]), dist.get_world_size(groups[0])
        self._link_model = self.link(groups[0], rank, world_size, max(1, ranks_per_node))
        self.hook_state = FireCaffeHookState(
            *groups[:2],
            rank,
            world_size,
            self.build_selector(world_size, self._link_model),
            stall_timeout=self.stall_timeout,
            group_collective=groups[2],
            lockstep=backend == "nccl",
            device=device if backend == "nccl" else "cpu",
            stats=self.stats,
            current_step=current_step,
            compression=self.build_compression(rank, world_size),
            low_rank=self.build_low_rank(rank, world_size),
            low_rank_wire=self.options.low_rank_wire.dtype if self.options.low_rank_wire else None,
            parameter_names={id(p): name for name, p in model.module.named_parameters()},
            on_bucket=bucket_beat,
        )
        hook, hook_state = firecaffe_hook, self.hook_state
        if self.options.local_sgd:
            hook, hook_state = local_sgd_hook, self.build_local_sgd(model, backend, rank, world_size, ranks_per_node)
        model.register_comm_hook(hook_state, hook if wrapper is None else wrapper(hook))
        return self.hook_state

    def build_local_sgd(
        self, model: DistributedDataParallel, backend: str, rank: int, world_size: int, ranks_per_node: int
    ) -> LocalSGDHookState:
        """Local SGD's parts (a collective: one group per node, every rank creates all, in order): the
        plan, the averager with a checkpoint's anchor and, on a resume between averages, this rank's own
        weights (DDP has just broadcast rank 0's)."""
        o = self.options
        plan = AveragingPlan(o.model_averaging_period, o.averaging_start_step)
        if ranks_per_node >= world_size and rank_zero_only.rank == 0:
            log.warning(
                "FireCaffe local SGD: all %d ranks are on one node, so their gradients are averaged together every "
                "step (as torch's post-local SGD does inside a node): model_averaging_period=%d saves no "
                "communication here; it pays off across nodes",
                world_size,
                plan.period,
            )
        groups, mine, size = [], None, 1
        for ranks in node_groups(world_size, ranks_per_node):
            group = dist.new_group(ranks, backend=backend, timeout=timedelta(seconds=self.stall_timeout))
            groups.append(group)
            if rank in ranks:
                mine, size = group, len(ranks)
        if self._own_module_state is not None:
            model.module.load_state_dict(self._own_module_state)
            self._own_module_state = None
        self.averager = ParameterAverager(trainable_parameters(model.module), world_size)
        self.averager.load_state_dict(self.saved.local_sgd)
        self.stats.averaging = AveragingTotals(plan.period, plan.start, o.averaging_wire)
        self.local_sgd = LocalSGDHookState(self.hook_state, plan, mine, size, groups)
        return self.local_sgd

    def create_groups(self, backend: str) -> tuple[Any, Any, Any]:
        """Collective calls, in the same order on every rank: one group per message direction (one TCP
        connection each, see Transport) and one for backend all-reduces launched from backward, whose
        timeout is the stall deadline. Each group's collectives are issued by one thread only."""
        forward, reverse = dist.new_group(backend=backend), dist.new_group(backend=backend)
        collective = dist.new_group(backend=backend, timeout=timedelta(seconds=self.stall_timeout))
        return forward, reverse, collective

    def link(self, group: Any, rank: int, world_size: int, ranks_per_node: int) -> LinkModel:
        """The link model ``auto``'s cost model prices with: given, measured at start-up, or the default."""
        if self.options.link != "measure":
            return dataclasses.replace(self.options.link or LinkModel(), ranks_per_node=ranks_per_node)
        link = measure_link(rank, world_size, ranks_per_node, group, self._device, self.stall_timeout)
        self.measured_link = link
        if rank_zero_only.rank == 0:
            gbit, latency_us = link.bandwidth_Bps * 8 / 1e9, link.latency_s * 1e6
            log.info("FireCaffe: measured links %.2f Gbit/s, %.0f us latency; `auto` picks for them", gbit, latency_us)
        return link

    def build_selector(self, world_size: int, link: LinkModel) -> ScheduleSelector:
        """The algorithm per bucket size; ``auto`` with a tuner that starts from a checkpoint's choices.
        With error feedback ``auto`` weighs only algorithms that sum in fp32 (not the backend's)."""
        o, candidates = self.options, None
        if o.compression_error_feedback:
            eligible = auto_candidates(world_size, link.ranks_per_node)
            candidates = tuple(a for a in eligible if not get_algorithm(a).collective)
        selector = ScheduleSelector(o.algorithm, world_size, o.arity, o.chunk_bytes, link, candidates=candidates)
        if o.tunes:
            choices = self.saved.auto_choices
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

    def build_compression(self, rank: int, world_size: int) -> GradientCompression | None:
        """The wire format with its state, restored from a checkpoint when there is one."""
        fmt = self.options.wire_format
        if fmt is None:
            return None
        compression = GradientCompression(fmt, self.options.compression_error_feedback)
        self.stats.wire_format = fmt.name
        restored = self.saved.compression or {}
        compression.load_state_dict(restored)
        saved = restored.get("error_feedback")
        if saved is None or compression.error_feedback is None:
            return compression
        if saved["world_size"] == world_size:
            residual = saved["residuals"][rank].to(self._device)
            compression.error_feedback.load_state_dict(residual, model_layout(self._model))
        else:
            log.warning(
                "FireCaffe: the checkpoint's error-feedback residuals are from %d ranks, this run has %d; starting "
                "without them (at most one step's rounding is not carried over)",
                saved["world_size"],
                world_size,
            )
        return compression

    def build_low_rank(self, rank: int, world_size: int) -> LowRankState | None:
        """PowerSGD's state, restored from a checkpoint when there is one (this rank's residuals; from a
        checkpoint of another world size only the Q factors, which are the same on every rank)."""
        config = self.options.low_rank
        if config is None:
            return None
        self.stats.wire_format = f"powersgd rank {config.rank}" + (
            f" ({self.options.powersgd_wire})" if self.options.powersgd_wire else ""
        )
        state = LowRankState(config)
        saved = self.saved.low_rank
        if saved is None:
            return state
        residuals = saved["residuals"][rank] if saved["world_size"] == world_size else {}
        if saved["world_size"] != world_size:
            log.warning(
                "FireCaffe: the checkpoint's PowerSGD residuals are from %d ranks, this run has %d; starting "
                "without them (one step's approximation error is not carried over)",
                saved["world_size"],
                world_size,
            )
        state.load_state_dict({"qs": saved["qs"], "residuals": residuals}, self._device)
        return state

    # ------------------------------------------------------------------ checkpointed state
    def auto_choices(self) -> dict[int, str]:
        """``auto``'s measured choice per bucket size so far (or the checkpoint's, before the hook exists)."""
        tuner = self.hook_state.selector.tuner if self.hook_state is not None else None
        return tuner.choices() if tuner is not None else dict(self.saved.auto_choices)

    def state(self, world_size: int) -> SavedCommState:
        """What checkpoints keep of the gradient path. A collective with error feedback or PowerSGD (every
        rank's residuals are gathered): every rank calls it while the checkpoint is assembled."""
        local_sgd = self.averager.state_dict() if self.averager is not None else self.saved.local_sgd
        compression = self.hook_state.compression if self.hook_state is not None else None
        low_rank = self.low_rank_state(world_size)
        if compression is None:
            return SavedCommState(self.auto_choices(), self.saved.compression, low_rank, local_sgd)
        state = compression.state_dict()
        if compression.error_feedback is not None:
            layout = model_layout(self._model)
            flat = compression.error_feedback.state_dict(layout)
            if flat is None:
                flat = torch.zeros(sum(n for _, n in layout), device=self._device)
            gathered = [torch.empty_like(flat) for _ in range(world_size)]
            dist.all_gather(gathered, flat)
            state["error_feedback"] = {"world_size": world_size, "residuals": [g.cpu() for g in gathered]}
        return SavedCommState(self.auto_choices(), state, low_rank, local_sgd)

    def low_rank_state(self, world_size: int) -> dict[str, Any] | None:
        """PowerSGD's Q factors and every rank's residuals (gathered: a collective), or what a checkpoint
        gave when the hook is not built yet."""
        low_rank = self.hook_state.low_rank if self.hook_state is not None else None
        if low_rank is None:
            return self.saved.low_rank
        mine = low_rank.state_dict()
        every = [None] * world_size
        dist.all_gather_object(every, mine["residuals"])
        return {"world_size": world_size, "qs": mine["qs"], "residuals": every}

    def save_into(self, checkpoint: dict[str, Any], world_size: int, replica_keys: Sequence[str] = ()) -> None:
        """Put the gradient path's state into ``checkpoint`` (every rank). Between local SGD's averages the
        replicas differ: ``replica_keys`` of every rank's ``checkpoint`` (its weights, optimizer state) are
        gathered to rank 0 too (a collective)."""
        beat("checkpoint save", "checkpoint")  # its own allowance: slow disks are no stall
        state = self.state(world_size)
        if replica_keys and self.averager is not None and self.averager.anchor is not None:
            mine = move_data_to_device({k: checkpoint.get(k) for k in replica_keys}, "cpu")
            first = dist.get_rank() == 0
            gathered: list[Any] | None = [None] * world_size if first else None
            dist.gather_object(None if first else mine, gathered, dst=0)  # rank 0's own is the checkpoint's
            state.local_sgd = dict(state.local_sgd, replicas=gathered)
        checkpoint[CHECKPOINT_KEY] = state.to_dict()

    def own_replica(self, checkpoint: dict[str, Any], rank: int, world_size: int, module_key: str) -> None:
        """Local SGD, resumed between averages: put this rank's own saved keys into ``checkpoint`` (the
        optimizer state is restored from there) and keep its weights for after DDP's broadcast. From
        another world size every rank continues from rank 0's (with a warning)."""
        local = self.saved.local_sgd or {}
        replicas = local.get("replicas")
        if not replicas:
            return
        self.saved.local_sgd = {k: v for k, v in local.items() if k != "replicas"}
        if local.get("world_size") != world_size:
            log.warning(
                "FireCaffe local SGD: the checkpoint holds %d ranks' replicas, this run has %d; every rank continues "
                "from rank 0's weights and optimizer state",
                local.get("world_size"),
                world_size,
            )
            return
        if rank and replicas[rank] is not None:
            checkpoint.update(replicas[rank])
            self._own_module_state = replicas[rank].get(module_key)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Take the gradient path's state from a loaded checkpoint. Before :meth:`install` (the Trainer
        restores first) it is kept for the build; after it (Fabric loads after ``setup``) the selector and
        the wire format are rebuilt from it in place."""
        saved = SavedCommState.from_checkpoint(checkpoint)
        if saved is None:
            return
        self.saved = saved
        state = self.hook_state
        if state is not None:
            rebuilt = state.selector.rebuilt
            state.selector = self.build_selector(state.world_size, self._link_model)
            state.selector.rebuilt = rebuilt
            state.compression = self.build_compression(state.rank, state.world_size)
            state.low_rank = self.build_low_rank(state.rank, state.world_size)

    # ------------------------------------------------------------------ local SGD
    def before_optimizer_step(self, step: int) -> None:
        """Local SGD: the first local step's weights are the anchor (the replicas still agree here)."""
        if self.averager is not None and self.local_sgd.plan.local(step):
            self.averager.capture()

    def after_optimizer_step(self, step: int, rank: int) -> None:
        """Local SGD: average the parameters after every ``period``-th local step (see comm.averaging),
        with the algorithm ``auto`` or the user picked for the flat buffer's size, on the hook's worker
        (gloo) or inline (NCCL). A failed peer is named like one in the hook."""
        local, state = self.local_sgd, self.hook_state
        if local is None or not local.plan.averages_after(step):
            return
        fmt, averager = self.options.averaging_wire_format, self.averager
        wire = fmt.dtype if fmt is not None else None
        element = averager.params[0].element_size() if averager.params else 4
        nbytes = averager.numel() * (min(element, fmt.itemsize) if fmt is not None else element)
        algorithm = averaging_algorithm(state.selector, nbytes)
        schedule = state.selector.schedule_for(nbytes, algorithm)

        def average() -> None:
            executor = state.executor
            sent, received, started = (
                executor.counters.bytes_sent,
                executor.counters.bytes_received,
                time.perf_counter(),
            )
            averager.average(
                lambda flat: executor.all_reduce_(flat, schedule, bucket=AVERAGE_BUCKET, step=step, wire=wire)
            )
            busy = time.perf_counter() - started
            counters = executor.counters
            self.stats.average_done(
                nbytes, algorithm, counters.bytes_sent - sent, counters.bytes_received - received, busy
            )

        try:
            if state.lockstep:
                average()
            else:
                state.worker.run(average)
        except PeerStallError as exc:
            error = self.explain_failure(
                reword(exc, rank, step, self.stall_timeout), "averaging parameters", rank=rank, step=step
            )
            raise error from exc.__cause__

    # ------------------------------------------------------------------ training
    @property
    def scaled(self) -> bool:
        """fp16 on the wire: a step whose buckets overflowed must be skipped."""
        state = self.hook_state
        return state is not None and state.compression is not None and state.compression.scale is not None

    def step_overflowed(self, step: int) -> bool:
        """End an optimizer step on the wire format (every rank alike): True if fp16 overflowed and the
        optimizer step must be skipped (recorded and warned about, naming the buckets)."""
        compression = self.hook_state.compression
        overflowed = compression.end_step()
        if not overflowed:
            return False
        self.stats.skipped_steps.append((step, overflowed))
        log.warning(
            "FireCaffe fp16 compression: gradient bucket(s) %s overflowed (inf/NaN after the all-reduce) at "
            "training step %d; the optimizer step is skipped on every rank and the scale lowered to 2^%d",
            ", ".join(map(str, overflowed)),
            step,
            int(math.log2(compression.scale.scale)),
        )
        return True

    def after_backward(self, synced: bool) -> None:
        """After the first backward that reduced gradients, DDP rebuilds its buckets: from then on ``auto``
        may time its candidates on the sizes training will use."""
        if synced and self.hook_state is not None and not self.hook_state.selector.rebuilt:
            self.hook_state.selector.buckets_rebuilt()

    def hook_error(self, exc: BaseException) -> BaseException | None:
        """The hook's own error behind torch's wrapper ("Unable to cast ... to Tensor"), or None."""
        return unwrap_hook_error(exc, self.hook_state.failure if self.hook_state is not None else None)

    def explain_failure(self, error: BaseException, doing: str, *, rank: int, step: int) -> BaseException:
        """The error a user reads: a backend collective's failure names no peer, so the survivors take a
        census (dead peers closed their connections, stopped ones stay silent). For a silent peer the
        watchdog adds what it knows; a peer that closed its connection is dead, and that is the whole story."""
        if isinstance(error, PeerStallError) and not error.peers and self.hook_state is not None:
            census = self.hook_state.transport.census(min(CENSUS_TIMEOUT_S, self.stall_timeout))
            cause = error.__cause__ or error
            named = name_the_missing(census, rank, doing, step=step, timeout_s=self.stall_timeout, cause=cause)
            if named is not None:
                named.__cause__, error = cause, named
        if self.watchdog is not None:
            peers, closed = getattr(error, "peers", []), getattr(error, "closed", False)
            error = with_watchdog_view(error, self.watchdog.describe(peers, closed=closed))
        return error

    # ------------------------------------------------------------------ process lifecycle
    def configure_gloo(self, backend: str, world_size: int, main_address: str, announce: bool) -> None:
        """gloo's interface: the one routing to MASTER_ADDR, or a clear error for a wrong GLOO_SOCKET_IFNAME
        (undone by :meth:`restore_process`: later code in this process finds os.environ as it was)."""
        if needs_gloo_interface(backend, world_size):
            self.gloo_interface = configure_gloo_interface(main_address, announce=announce)
            self.selected_gloo_interface = self.gloo_interface.name if self.gloo_interface.chosen else None

    def start_watchdog(self, rank: int, world_size: int, launched_ranks: Callable[[], list[int]]) -> None:
        """The watchdog thread (after launch, in the process that trains)."""
        o = self.options
        if not o.watchdog or world_size < 2 or self.watchdog is not None:
            return
        self.watchdog = start_watchdog(
            rank,
            world_size,
            Policy(self.stall_timeout, o.allowances),
            action=o.stall_action,
            grace_s=o.grace_s,
            launched_ranks=launched_ranks,
        )
        beat("setup", "setup")

    def close_hook(self) -> None:
        """Stop the hook's worker and release its process groups (every rank, at the end)."""
        if self.local_sgd is not None:
            self.local_sgd.close()
            self.local_sgd = None
        if self.hook_state is not None:
            self.hook_state.close()
            self.hook_state = None

    def restore_process(self, failed: BaseException | None, launched: Sequence[int]) -> None:
        """Leave the process as it was found: the watchdog says goodbye (and why, if training failed here),
        ranks this process launched do not outlive a failure, gloo's interface variable is restored."""
        if self.watchdog is not None:  # first: a wait below is still watched
            self.watchdog.stop(error=failed)
            self.watchdog = None
        if failed is not None and launched:  # only their trees: this rank's DataLoader workers end with their
            stop(launched, min(10.0, self.stall_timeout), terminate=False)  # loader (a kill would raise on top)
        if self.gloo_interface is not None:
            self.gloo_interface.restore()
            self.gloo_interface = None


__all__ = ["CHECKPOINT_KEY", "GradientPath", "model_layout", "options_from"]
