"""Preemption under SLURM: checkpoint at a point every rank agrees on, requeue, resume exactly.

SLURM warns a job before preempting it (``sbatch --signal=USR1@120``, or ``scancel --signal=USR1 <job>``).
Lightning's own SLURM handler saves and requeues *inside the signal handler*, wherever the main thread is:
mid-backward on one rank while its peers wait for that rank's gradients in the all-reduce, and with the
checkpoint's step counters possibly one optimizer step apart from its weights. :class:`RequeueOnSignal`
only records the signal; at the next train-batch end (``at="step"``) or train-epoch end (``at="epoch"``)
the ranks agree (one max-all-reduce of a flag), save ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir``
and rank 0 runs ``scontrol requeue``; then every rank waits to be stopped by SLURM. On restart Lightning
resumes from the newest ``hpc_ckpt_*`` by itself (SLURM jobs only, when no ``ckpt_path`` is given).

Exact resume: the checkpoint also holds every rank's random number generators (torch, numpy, Python;
Lightning's checkpoints do not), restored on that rank: dropout and the seeds of new DataLoader iterators
continue as if uninterrupted. At ``at="epoch"`` the resumed run is bitwise the uninterrupted one when the
loaders start each epoch afresh (same algorithms; ``data.persistent_workers=false`` for the shard loaders,
whose persistent workers carry state across epochs that no checkpoint holds). At ``at="step"`` (the default: it meets any signal lead time) weights, optimizer and
step count are exact, but an iterable dataset restarts its epoch's stream (Lightning cannot skip into it).
The flag's all-reduce (once per step or epoch) runs on a group of its own whose timeout is the strategy's
``stall_timeout``: a peer that dies there fails the step within that deadline (with gloo's error, which does
not name the rank as FireCaffe's all-reduce does). Outside SLURM the callback does nothing.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from .compat import hpc_save_path
from .errors import PeerStallError
from .options import require_choice
from .transport import Transport

log = logging.getLogger(__name__)


class RequeueOnSignal(Callback):
    """Checkpoint and requeue the SLURM job when ``signal_name`` arrives, at the next ``at`` boundary.

    Args:
        at: ``"step"`` (next train-batch end) or ``"epoch"`` (next train-epoch end: exact data order on resume).
        signal_name: the signal SLURM sends ahead of preemption (``sbatch --signal=USR1@<seconds>``).
        stop_timeout: seconds to wait for SLURM to stop the job after the requeue before exiting with an error.
    """

    def __init__(self, at: str = "step", signal_name: str = "SIGUSR1", stop_timeout: float = 120.0) -> None:
        require_choice("RequeueOnSignal", "at", at, ("step", "epoch"))
        require_choice("RequeueOnSignal", "signal_name", signal_name, ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT"))
        self.at = at
        self.signal = signal.Signals[signal_name]
        self.stop_timeout = float(stop_timeout)
        self.received = False
        self._previous: Any = None
        self._active = False
        self._rank = 0
        self._rng_states: list | None = None  # every rank's generators, gathered just before the checkpoint
        self._group: Any = None  # the flag's own group, with the strategy's stall deadline
        self._deadline = 60.0

    def _on_signal(self, signum: int, frame: Any) -> None:  # only a flag: the main thread may be anywhere
        self.received = True

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # before Lightning's signal connector: it then keeps this handler instead of installing its own
        if stage != "fit" or not isinstance(trainer.strategy.cluster_environment, SLURMEnvironment):
            return
        self._previous = signal.signal(self.signal, self._on_signal)
        self._active = True
        self._rank = trainer.global_rank
        if dist.is_available() and dist.is_initialized():  # every rank gets here: group creation matches
            deadline = self._deadline = float(getattr(trainer.strategy, "stall_timeout", 60.0))
            self._group = dist.new_group(backend=dist.get_backend(), timeout=timedelta(seconds=deadline))
        log.info(
            "[rank %d] preemption: on %s the job checkpoints at the next %s end and requeues (job %s)",
            trainer.global_rank,
            self.signal.name,
            self.at,
            os.environ.get("SLURM_JOB_ID"),
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._active:
            signal.signal(self.signal, self._previous if self._previous is not None else signal.SIG_DFL)
            self._active = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng_states": self._rng_states} if self._rng_states is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng_states")
        if not states:
            return
        if len(states) <= self._rank:
            log.warning(
                "preemption: the checkpoint holds random states of %d ranks, not of rank %d: not restored",
                len(states),
                self._rank,
            )
            return
        set_rng_state(states[self._rank])

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.at == "step":
            self._maybe_requeue(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at == "epoch":
            self._maybe_requeue(trainer)

    def _agreed(self, trainer: Trainer) -> bool:
        """Whether any rank got the signal: the same answer on every rank at the same boundary."""
        flag = torch.tensor([float(self.received)], device=trainer.strategy.root_device)
        if self._group is None:
            return bool(flag.item() > 0)
        transport = Transport(trainer.global_rank, trainer.world_size, self._group, stall_timeout=self._deadline)
        work = transport.all_reduce(flag, op=dist.ReduceOp.MAX)
        try:
            transport.wait(work, [], "agreeing on a requeue signal", step=trainer.global_step, what="preemption check")
        except PeerStallError as error:  # the strategy names the peer that went away, where it can
            explain = getattr(trainer.strategy, "explain_failure", None)
            raise (explain(error, "agreeing on a requeue signal") if explain else error) from error.__cause__
        return bool(flag.item() > 0)

    def _maybe_requeue(self, trainer: Trainer) -> None:
        if not self._active or not self._agreed(trainer):
            return
        path = hpc_save_path(trainer)
        self._rng_states = gather_rng_states()
        trainer.save_checkpoint(path)  # every rank (collective state), rank 0 writes
        if trainer.is_global_zero:
            job = _job_id()
            log.info("preemption: saved %s at step %d; requeueing SLURM job %s", path, trainer.global_step, job)
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise RuntimeError(
                    f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()} "
                    "(submit with --requeue, or JobRequeue=1 in slurm.conf)"
                )
        trainer.strategy.barrier("firecaffe_requeue")
        _wait_to_be_stopped(self.stop_timeout)


def rng_state() -> dict[str, Any]:
    """This process's generators as tensors, ints and tuples only (checkpoints load with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(state["python"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's generator states, in rank order (a collective on the default group)."""
    own = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    return states


def _job_id() -> str:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def _wait_to_be_stopped(timeout: float, poll: float | None = 0.5) -> None:
    """SLURM stops the job (SIGTERM, then SIGKILL after KillWait); training must not go on meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(poll)
    raise SystemExit(f"preemption: SLURM did not stop the requeued job within {timeout:.0f} s")
