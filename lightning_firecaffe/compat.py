"""Every use of a Lightning-private attribute, in one place, tested against the pinned Lightning range.

Lightning has no public way to reach these; if a release renames one, ``tests/unit/test_compat.py`` fails
here instead of a training run failing somewhere else.
"""

from __future__ import annotations

from typing import Any


def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when detached)."""
    return getattr(module, "_trainer", None) if module is not None else None


def hpc_save_path(trainer: Any) -> str:
    """Where Lightning's SLURM auto-requeue looks for the checkpoint to resume from (``hpc_ckpt_<n>.ckpt``)."""
    return trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)


def launched_pids(strategy: Any) -> list[int]:
    """Process ids of the ranks this process started (the subprocess launcher's children), else []."""
    launcher = getattr(strategy, "_launcher", None)
    return [p.pid for p in getattr(launcher, "procs", None) or []]
