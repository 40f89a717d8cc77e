"""One error type for a bad constructor argument, so each setting has exactly one owner.

Every public constructor (the strategy, the callbacks, the models) checks its own arguments and raises
:class:`InvalidOption` naming the option; the Hydra app builds those objects before any process starts
and only prefixes the config group it came from (``strategy.arity=1 must be an integer >= 2``), so no
check is written twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class InvalidOption(ValueError):
    """``owner``'s argument ``option`` has a bad ``value``; ``requirement`` says what is allowed."""

    def __init__(self, owner: str, option: str, value: Any, requirement: str) -> None:
        self.owner, self.option, self.value, self.requirement = owner, option, value, requirement
        super().__init__(f"{owner}: {option}={value!r} {requirement}")

    def under(self, prefix: str) -> str:
        """The message with the option as a config key, e.g. ``strategy.arity=1 must be ...``."""
        return f"{prefix}.{self.option}={self.value!r} {self.requirement}"


def require(condition: bool, owner: str, option: str, value: Any, requirement: str) -> None:
    """Raise :class:`InvalidOption` unless ``condition`` holds."""
    if not condition:
        raise InvalidOption(owner, option, value, requirement)


def require_choice(owner: str, option: str, value: Any, allowed: Iterable[str]) -> Any:
    """Return ``value`` if it is one of ``allowed``; otherwise raise naming the choices."""
    allowed = tuple(allowed)
    require(value in allowed, owner, option, value, f"is not one of {', '.join(allowed)}")
    return value


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
