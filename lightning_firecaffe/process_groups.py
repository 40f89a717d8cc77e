"""Ending torch.distributed's process groups before the interpreter does.

A process that exits with a gloo group alive may abort on its way out: a gloo worker thread can still hold
the last collective's work (and its tensors) while Python finalizes, and the process dies of SIGABRT
("terminate called without an active exception"; pytorch#179291, whose fix in torch was abandoned). Run
bare (two ranks: five all-reduces, a barrier, exit) it happened in 13 of 117 runs here, and in CI after a
run that had passed. Lightning's Trainer and Fabric leave the group alive for a later ``fit`` or
``test``, and few user scripts end it, so the strategies do it at exit, after a run that succeeded.

Not after a failure: a destroy joins gloo's threads, and one blocked on a dead peer would hold the exit
until the backend's timeout. Such a process exits non-zero anyway.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Iterable
from typing import Any

import torch.distributed as dist


def end_process_groups() -> None:
    """Destroy the process groups, if any: how a distributed script should end after a run that succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_groups(groups: Iterable[Any]) -> None:
    """Destroy the subgroups a component created (its own, at its teardown), skipping those already gone
    (after a failure, or once the default group was destroyed)."""
    for group in groups:
        if group is not None and dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - already released: nothing to do
                pass


class _AtExit:
    registered = False
    failed = False  # training failed in this process (an exception the user may have caught)


def end_process_groups_at_exit() -> None:
    """Have this process end its groups when the interpreter exits, unless training failed in it
    (:func:`training_failed`) or an uncaught exception ends the script. Registered once per process, before
    anything that must run earlier at exit (atexit runs in reverse order)."""
    if not _AtExit.registered:
        atexit.register(_end_at_exit)
        _AtExit.registered = True


def training_failed() -> None:
    """This process's training failed: leave the groups for the exit to drop."""
    _AtExit.failed = True


def _end_at_exit() -> None:
    if not _AtExit.failed and getattr(sys, "last_value", None) is None:  # set for an exception nobody caught
        end_process_groups()
