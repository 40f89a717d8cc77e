"""Beats through the rendezvous store: one key per rank, read by every rank.

The watchdog thread owns its own ``TCPStore`` client (not the process group's store: that one is used by
the training thread, and a blocked call there must not delay a beat). Every call has a short timeout, so
a dead store host (rank 0) shows up as failing calls, never as a hung thread.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import timedelta
from typing import Callable, Optional

import torch.distributed as dist

from .verdict import Beat

log = logging.getLogger(__name__)

KEY_PREFIX = "firecaffe/watchdog/"


class StoreBeats:
    """Publish this rank's beat and read everybody's, on a store shared by all ranks."""

    def __init__(self, store: dist.Store, world_size: int, reconnect: Optional[Callable[[], dist.Store]] = None,
                 reachable: Optional[Callable[[], bool]] = None) -> None:  # fmt: skip
        self.store, self.world_size = store, world_size
        self._reconnect, self._reachable = reconnect, reachable
        self._broken = False
        self._keys = [f"{KEY_PREFIX}{r}" for r in range(world_size)]
        self._present: set[int] = set()

    @classmethod
    def connect(cls, world_size: int, timeout_s: float) -> "StoreBeats":
        """A client of the store at MASTER_ADDR:MASTER_PORT (set by every Lightning launcher)."""
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])

        def client() -> dist.Store:
            return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)

        def reachable() -> bool:
            try:
                socket.create_connection((host, port), timeout=min(1.0, timeout_s)).close()
                return True
            except OSError:
                return False

        return cls(client(), world_size, reconnect=client, reachable=reachable)

    def _usable(self) -> bool:
        """After a failure, probe with a plain socket (a failing store call prints a C++ stack trace each
        time) and reconnect once the host answers again."""
        if not self._broken:
            return True
        if self._reachable is None or self._reconnect is None or not self._reachable():
            return False
        try:
            self.store = self._reconnect()
        except Exception:
            return False
        self._broken = False
        return True

    def publish(self, beat: Beat) -> bool:
        if not self._usable():
            return False
        try:
            self.store.set(self._keys[beat.rank], json.dumps(beat.to_dict()))
            return True
        except Exception as exc:  # the store host is gone or unreachable: the verdict decides what it means
            log.debug("watchdog: publishing a beat failed: %s", exc)
            self._broken = True
            return False

    def read(self) -> Optional[dict[int, Beat]]:
        """Every rank's latest beat (ranks that never published are absent), or None if the store fails."""
        if not self._usable():
            return None
        try:
            missing = [r for r in range(self.world_size) if r not in self._present]
            for r in missing:  # get() on a missing key would block until the timeout
                if self.store.check([self._keys[r]]):
                    self._present.add(r)
            ranks = sorted(self._present)
            if not ranks:
                return {}
            values = self.store.multi_get([self._keys[r] for r in ranks])
            return {r: Beat.from_dict(json.loads(bytes(v).decode())) for r, v in zip(ranks, values)}
        except Exception as exc:
            log.debug("watchdog: reading beats failed: %s", exc)
            self._broken = True
            return None
