"""Who sets the learning rate: one owner per run.

Why here and not in the callbacks: models ask this question (``ImageClassifier`` must not schedule the LR
when something else does), and models must not import callbacks. A callback claims the LR by declaring
``owns_learning_rate = True``; this module only reads that declaration, so it needs no Lightning import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def lr_owner(callbacks: Iterable[Any]) -> Any | None:
    """The first of ``callbacks`` that sets the learning rate every step (declares ``owns_learning_rate``),
    if any: it owns the LR (and logs it), so a model must not schedule the LR itself."""
    return next((c for c in callbacks if getattr(c, "owns_learning_rate", False) is True), None)
