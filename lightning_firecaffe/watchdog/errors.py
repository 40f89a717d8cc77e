"""Add what the watchdog knows to the comm hook's error (same type, same peers, same cause)."""

from __future__ import annotations

from ..errors import PeerStallError


def with_watchdog_view(error: BaseException, lines: list[str]) -> BaseException:
    """``error`` with what the watchdog knows about the peers it names appended (same type)."""
    if not lines or not isinstance(error, PeerStallError):
        return error
    enriched = PeerStallError(f"{error}\n  Watchdog: " + "\n  Watchdog: ".join(lines), error.peers, error.closed)
    enriched.__cause__ = error.__cause__
    return enriched
