"""Parsing and printing of byte sizes and link rates (``25MB``, ``1MiB``, ``1gbit``)."""

from __future__ import annotations

import re

_SIZE = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_RATE = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE:
        raise ValueError(f"bad size {text!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB")
    return int(float(m.group(1)) * _SIZE[m.group(2).lower()])


def parse_rate_bytes_per_s(text: str) -> float:
    """``1gbit`` -> 1.25e8 bytes/s."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _RATE:
        raise ValueError(f"bad rate {text!r}: use e.g. 100mbit, 1gbit, 10gbit")
    return float(m.group(1)) * _RATE[m.group(2).lower()] / 8


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}B"
