"""Reusable receive buffers: bounded extra memory that lives across steps instead of an allocation per message."""

from __future__ import annotations

import torch


class Scratch:
    """Buffers keyed by (dtype, device, arena), grown to the largest size asked for and reused after."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, like: torch.Tensor, numel: int, arena: int | str) -> torch.Tensor:
        """At least ``numel`` elements of ``like``'s dtype and device (a view of the arena's buffer)."""
        key = (like.dtype, like.device, arena)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())
