"""Parsing and printing of byte sizes and link rates (``25MB``, ``1MiB``, ``1gbit``): the one parser of each,
shared by the benchmarks, the planner and the emulated cluster (standard library only)."""

from __future__ import annotations

import re

_SIZE = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE:
        raise ValueError(f"bad size {text!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB")
    return int(float(m.group(1)) * _SIZE[m.group(2).lower()])


def parse_rate(rate: str | int | float | None) -> int | None:
    """``"1gbit"``, ``"200mbit"``, ``"10gbit"``, ``1e9`` (bits/s) -> bits/s; ``None``/``"none"`` -> None.

    Units are bits per second as in tc (``kbit``, ``mbit``, ``gbit``, decimal); tc's ``bps`` means *bytes*
    per second and is refused here to avoid an 8x mistake.
    """
    if rate is None:
        return None
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        return int(rate)
    text = str(rate).strip().lower()
    if text in ("", "none", "unshaped", "0"):
        return None
    match = _RATE_RE.match(text)
    if not match:
        raise ValueError(f"rate {rate!r}: expected e.g. '100mbit', '1gbit', '10gbit' (bits/s) or None")
    value = float(match.group(1)) * _RATE_UNITS[(match.group(2) or "bit").lower()]
    if value < 8000:
        raise ValueError(f"rate {rate!r} is below 8kbit")
    return int(value)


def format_rate(bits_per_s: int | None) -> str:
    if bits_per_s is None:
        return "unshaped"
    for unit, factor in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits_per_s >= factor and bits_per_s % factor == 0:
            return f"{bits_per_s // factor}{unit}"
    return f"{bits_per_s}bit"


def parse_rate_bytes_per_s(text: str) -> float:
    """``1gbit`` -> 1.25e8 bytes/s (a rate is required here: ``none`` is refused)."""
    bits = parse_rate(text)
    if bits is None:
        raise ValueError(f"bad rate {text!r}: use e.g. 100mbit, 1gbit, 10gbit")
    return bits / 8


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}B"
