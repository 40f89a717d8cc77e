"""Give the user the comm hook's own error, not torch's wrapper around it.

DDP's reducer turns an exception set on a comm hook's future into ``RuntimeError("Unable to cast
<message> to Tensor")`` (or similar): the type is lost and the text garbled. The strategy catches
that in backward and raises the hook's original exception (kept on the hook state) or, failing that, a
:class:`PeerStallError` rebuilt from the wrapped text.
"""

from __future__ import annotations

import re

from ..comm.executor import PeerStallError

_WRAPPED = re.compile(
    r"Unable to cast (?:Python instance of type [^ ]+ )?(?P<inner>.*?)\s+to (?:C\+\+ type|Tensor)\b.*", re.S
)
_FIRECAFFE = re.compile(r"(FireCaffe .*)", re.S)


def unwrap_hook_error(exc: BaseException, original: BaseException | None = None) -> BaseException | None:
    """The exception to raise instead of ``exc`` (torch's wrapper of a failed comm hook), or None if
    ``exc`` is not one."""
    text = str(exc)
    if original is not None and str(original).strip() and str(original).strip().splitlines()[0] in text:
        return original
    match = _WRAPPED.search(text)
    inner = match.group("inner") if match else None
    if inner is None:
        found = _FIRECAFFE.search(text) if "FireCaffe" in text and isinstance(exc, RuntimeError) else None
        if found is None or isinstance(exc, PeerStallError):
            return None
        inner = found.group(1)
    inner = inner.strip().strip("'\"")
    peers = sorted({int(r) for r in re.findall(r"\brank (\d+)", inner.split(":", 1)[1] if ":" in inner else inner)})
    return PeerStallError(inner, peers)


def with_watchdog_view(error: BaseException, lines: list[str]) -> BaseException:
    """``error`` with what the watchdog knows about the peers it names appended (same type)."""
    if not lines or not isinstance(error, PeerStallError):
        return error
    enriched = PeerStallError(f"{error}\n  Watchdog: " + "\n  Watchdog: ".join(lines), error.peers)
    enriched.__cause__ = error.__cause__
    return enriched
