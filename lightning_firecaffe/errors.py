"""The error a user catches when a peer fails the gradient path, and the helpers that word it.

A leaf module (it imports nothing of the package): the communication layer raises these and the watchdog
adds to them, and neither may import the other. Every message names the peer(s), the bucket and the step,
and says what happened: a connection the peer *closed* (it died or its host went away) is not a peer that
is *silent* (stopped, stuck, or behind a dead link). The backend's own text stays only as the ``cause``.
"""

from __future__ import annotations

import re

_CHECK_ONE, _CHECK_SEVERAL = "Check that rank's log: it", "Check those ranks' logs: they"
_CLOSED_WORDS = ("closed", "reset", "broken", "eof", "connection refused", "pair closure")


class PeerStallError(RuntimeError):
    """A peer did not answer within the stall timeout, or its connection broke (it probably died)."""

    def __init__(
        self,
        message: str,
        peers: list[int] = (),
        closed: bool = False,
        bucket: int | None = None,
        step: int | None = None,
    ):
        super().__init__(message)
        self.peers = list(peers)
        self.closed = bool(closed)  # True: the peer closed its connection; False: it was silent
        self.bucket, self.step = bucket, step  # where it happened, when known

    def during(self, context: str) -> PeerStallError:
        """The same error, saying what the failed reduction carried (e.g. "PowerSGD's Q factors")."""
        return PeerStallError(f"{self} (during {context})", self.peers, self.closed, self.bucket, self.step)

    def __reduce__(self):  # pickles whole (spawn launcher, submitit results): peers are not in ``args``
        return type(self), (str(self), self.peers, self.closed, self.bucket, self.step)


def first_line(exc: BaseException | None, default: str = "timed out") -> str:
    """The first non-empty line of an exception's text (gloo's messages run to many lines), or ``default``."""
    if exc is None:
        return default
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return repr(exc) if str(exc) == "" and type(exc) is not Exception else default


def closed_connection(exc: BaseException | None) -> bool:
    """True if ``exc`` says the connection was closed or reset (the peer's process or host went away),
    False for a timeout or no exception (the peer is silent)."""
    if exc is None:
        return False
    text = str(exc).lower()
    if "application timeout caused pair closure" in text or "timed out" in text or "timeout" in text:
        return False  # our own deadline expired and gloo then closed the pair: the peer was silent
    return any(w in text for w in _CLOSED_WORDS)


def peer_error(
    rank: int,
    peers: list[int] | tuple[int, ...],
    doing: str,
    *,
    bucket: int | None,
    step: int,
    timeout_s: float,
    exc: BaseException | None,
    what: str = "all-reduce",
    closed: bool | None = None,
) -> PeerStallError:
    """The one wording of a failed wait: who, what happened (closed vs silent), doing what, where.
    ``closed``: what a census found, when ``exc`` (a collective's error) cannot say."""
    peers = sorted(set(peers) - {rank, -1})
    closed = closed_connection(exc) if closed is None else closed
    several = len(peers) > 1
    if closed:
        happened = (
            "closed their connections (they probably died)" if several else "closed its connection (it probably died)"
        )
    else:
        happened = f"did not answer within {timeout_s:g} s"
    where = f"of gradient bucket {bucket} " if bucket is not None else ""
    return PeerStallError(
        f"FireCaffe {what} on rank {rank}: {name_ranks(peers)} {happened} while {doing} {where}at training step "
        f"{step}. {_CHECK_SEVERAL if several else _CHECK_ONE} may have crashed, been killed, or be stuck outside "
        f"training. (cause: {first_line(exc)})",
        peers,
        closed=closed,
        bucket=bucket,
        step=step,
    )


def name_ranks(ranks: list[int]) -> str:
    """``rank 2``, ``ranks 2 and 3``, ``ranks 1, 2 and 3``; ``a peer`` for none."""
    if not ranks:
        return "a peer"
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}"


_WRAPPED = re.compile(
    r"Unable to cast (?:Python instance of type [^ ]+ )?(?P<inner>.*?)\s+to (?:C\+\+ type|Tensor)\b.*", re.S
)
_FIRECAFFE = re.compile(r"(FireCaffe .*)", re.S)


def unwrap_hook_error(exc: BaseException, original: BaseException | None = None) -> BaseException | None:
    """The exception to raise instead of ``exc`` when ``exc`` is torch's wrapper of a failed comm hook.

    DDP's reducer turns an exception set on a comm hook's future into ``RuntimeError("Unable to cast
    <message> to Tensor")``: the type is lost and the text garbled. Returns ``original`` (the hook's own
    exception, when given) or a :class:`PeerStallError` rebuilt from the wrapped text; None if ``exc`` is
    not such a wrapper."""
    text = str(exc)
    if original is not None and str(original).strip() and first_line(original) in text:
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
    return PeerStallError(inner, peers, closed="closed its connection" in inner)
