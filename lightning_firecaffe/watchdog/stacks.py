"""Where the training thread is: inside a collective (waiting for peers) or in some other code.

The watchdog thread samples the training thread's Python stack (``sys._current_frames``, about a
microsecond) instead of wrapping every collective: it then also sees collectives that Lightning,
torchmetrics or the user's code issue directly. Only the innermost frame decides; outer frames merely
say who called. :func:`classify` is pure (frames as ``(file, line, function)``, innermost first).
"""

from __future__ import annotations

import re
import sys
import sysconfig
from typing import NamedTuple


class Frame(NamedTuple):
    file: str
    line: int
    function: str


class Whereabouts(NamedTuple):
    blocked_in: str | None  # the collective the thread waits in, None when it runs other code
    at: str | None  # the innermost frame outside torch and the standard library: "file.py:12 in fn"


def _norm(path: str) -> str:
    return path.replace("\\", "/")


def _short(frame: Frame, parts: int = 3) -> str:
    path = _norm(frame.file)
    path = path.split("site-packages/", 1)[1] if "site-packages/" in path else "/".join(path.split("/")[-parts:])
    return f"{path}:{frame.line} in {frame.function}"


_STDLIB = _norm(sysconfig.get_paths()["stdlib"])


def _is_library(path: str) -> bool:
    """torch or the standard library: frames that say little about what the training was doing."""
    p = _norm(path)
    if "site-packages/" in p:
        return "/site-packages/torch/" in p
    return (
        "/torch/" in p or p.startswith("<") or p.startswith(_STDLIB) or re.search(r"/lib/python3\.\d+/", p) is not None
    )


def classify(frames: list[Frame]) -> Whereabouts:
    """What a stack (innermost first) is blocked in, and the innermost frame of the user's or Lightning's code."""
    at = next((_short(f) for f in frames if not _is_library(f.file)), None)
    if not frames:
        return Whereabouts(None, at)
    inner = frames[0]
    path = _norm(inner.file)
    blocked = None
    if "/torch/distributed/" in path:
        caller = next((f for f in frames if "/torch/" not in _norm(f.file)), None)
        blocked = f"torch.distributed.{inner.function}" + (f" (called from {_short(caller)})" if caller else "")
    elif path.endswith("lightning_firecaffe/transport.py"):  # FireCaffe's own waits for a peer (census, inline)
        blocked = f"FireCaffe transport.{inner.function} (waiting for a peer)"
    elif path.endswith("torch/nn/parallel/distributed.py"):
        blocked = f"DistributedDataParallel.{inner.function} (a collective inside DDP)"
    elif "/torch/autograd/" in path or (path.endswith("torch/_tensor.py") and inner.function == "backward"):
        blocked = "backward (the gradient all-reduce)"
    return Whereabouts(blocked, at)


def stack_of(thread_ident: int, limit: int = 64) -> list[Frame]:
    """The current Python stack of a thread, innermost first (empty if the thread is gone)."""
    frame = sys._current_frames().get(thread_ident)
    frames: list[Frame] = []
    while frame is not None and len(frames) < limit:
        code = frame.f_code
        frames.append(Frame(code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return frames
