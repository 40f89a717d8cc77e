"""Beats through the rendezvous store: one key per rank, read by every rank.

The watchdog thread owns its own ``TCPStore`` client (not the process group's store: that one is used by
the training thread, and a blocked call there must not delay a beat). Every call runs on a helper
thread under a deadline: a client call can block past its own timeout when the link is down (seen on the
emulated cluster), and the watchdog thread must still reach its verdict. So a dead store host (rank 0) or
a dead link shows up as failing calls, never as a hung watchdog.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .verdict import Beat

log = logging.getLogger(__name__)

KEY_PREFIX = "firecaffe/watchdog/"


class StoreBeats:
    """Publish this rank's beat and read everybody's, on a store shared by all ranks."""

    def __init__(
        self,
        store: dist.Store,
        world_size: int,
        reconnect: Callable[[], dist.Store] | None = None,
        reachable: Callable[[], bool] | None = None,
    ) -> None:
        self.store, self.world_size = store, world_size
        self._reconnect, self._reachable = reconnect, reachable
        self._broken = False
        self.deadline_s = 6.0  # per call, on top of the client's own timeout
        self._abandoned: list[threading.Thread] = []  # calls that overran their deadline (still blocked)
        self._keys = [f"{KEY_PREFIX}{r}" for r in range(world_size)]
        self._present: set[int] = set()

    @classmethod
    def connect(cls, world_size: int, timeout_s: float) -> StoreBeats:
        """A client of the store at MASTER_ADDR:MASTER_PORT (set by every Lightning launcher)."""
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])

        def client() -> dist.Store:
            return dist.TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
            )

        def reachable() -> bool:
            try:
                socket.create_connection((host, port), timeout=min(1.0, timeout_s)).close()
                return True
            except OSError:
                return False

        beats = cls(client(), world_size, reconnect=client, reachable=reachable)
        beats.deadline_s = timeout_s + 1.0
        return beats

    def _guarded(self, call: Callable[[], Any]) -> Any:
        """``call()`` on a daemon helper thread; raises TimeoutError if it overruns ``deadline_s``."""
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        if len(self._abandoned) >= 3:
            raise TimeoutError("earlier store calls are still blocked")
        box: dict = {}

        def target() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:
                box["error"] = exc

        helper = threading.Thread(target=target, name="firecaffe-watchdog-store", daemon=True)
        helper.start()
        helper.join(self.deadline_s)
        if helper.is_alive():
            self._abandoned.append(helper)
            raise TimeoutError(f"store call blocked for more than {self.deadline_s:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

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

    def _read(self) -> dict[int, Beat]:
        store = self.store
        for r in range(self.world_size):  # get() on a missing key would block until the timeout
            if r not in self._present and store.check([self._keys[r]]):
                self._present.add(r)
        ranks = sorted(self._present)
        if not ranks:
            return {}
        values = store.multi_get([self._keys[r] for r in ranks])
        return {r: Beat.from_dict(json.loads(bytes(v).decode())) for r, v in zip(ranks, values)}

    def publish(self, beat: Beat) -> bool:
        if not self._usable():
            return False
        try:
            store, key, value = self.store, self._keys[beat.rank], json.dumps(beat.to_dict())
            self._guarded(lambda: store.set(key, value))
            return True
        except Exception as exc:  # the store host is gone or unreachable: the verdict decides what it means
            log.debug("watchdog: publishing a beat failed: %s", exc)
            self._broken = True
            return False

    def read(self) -> dict[int, Beat] | None:
        """Every rank's latest beat (ranks that never published are absent), or None if the store fails."""
        if not self._usable():
            return None
        try:
            return self._guarded(self._read)
        except Exception as exc:
            log.debug("watchdog: reading beats failed: %s", exc)
            self._broken = True
            return None
