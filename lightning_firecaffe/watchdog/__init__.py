"""Stall watchdog: nothing hangs, and the user learns which rank to look at and what it was doing.

Layers: :mod:`.progress` (this process's phase, written by Lightning hooks and the comm hook),
:mod:`.stacks` (is the training thread blocked in a collective?), :mod:`.verdict` (pure: dead / stuck /
waiting, from beats and one clock), :mod:`.stragglers` (pure: who is slowest), :mod:`.errors` (torch's
wrapper around a failed comm hook, undone), :mod:`.transport` (beats through the rendezvous store) and
:mod:`.monitor` (the thread that publishes, judges, warns and stops the rank).
"""

from .monitor import ACTIONS, STALL_EXIT_CODE, Watchdog, start_watchdog
from .progress import KINDS, PROGRESS, beat
from .verdict import DEFAULT_ALLOWANCES, Beat, Observer, Policy, Stall, judge

__all__ = [
    "ACTIONS",
    "DEFAULT_ALLOWANCES",
    "KINDS",
    "PROGRESS",
    "STALL_EXIT_CODE",
    "Beat",
    "Observer",
    "Policy",
    "Stall",
    "Watchdog",
    "beat",
    "judge",
    "start_watchdog",
]
