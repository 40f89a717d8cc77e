"""An emulated cluster on one Linux machine: hosts are network namespaces joined by a shaped bridge.

Layout of one cluster (run id ``RID``, prefix ``fcn-``; nothing is created in the root namespace)::

    namespace fcn-RID-br :  br0 (bridge) -- h0, h1, ... (bridge ends of the veth pairs, tbf-shaped)
    namespace fcn-RID-h<i>: lo, fcnet0 = 10.77.0.<i+1>/24 (host end of veth i, tbf-shaped)

Each link is shaped in both directions with ``tc qdisc add ... root tbf rate R burst B latency L`` on both
ends of its veth pair, so a host sends and receives at up to ``R`` at the same time (full duplex), and the
bridge itself is not a bottleneck.  Ranks run inside their host's namespace (``ip netns exec``) with
``MASTER_ADDR`` = host 0's address and ``GLOO_SOCKET_IFNAME=fcnet0``; several ranks per host model a
multi-GPU node (they share the host's link and talk to each other over the namespace's own addresses).

Limitation: **added latency cannot be emulated** on this kernel (no ``netem``); links have the latency of a
veth pair plus queueing in tbf (tens of microseconds).  The ``latency`` parameter of tbf is a queue limit,
not a delay.

Teardown (deleting every namespace, which destroys veths, bridge and qdiscs with them, after killing every
process inside) happens on leaving the ``with`` block, on exceptions, on Ctrl-C and SIGTERM/SIGHUP (while a
cluster is up in the main thread those raise ``SystemExit`` there so the block unwinds), and at interpreter
exit.  ``down_all()`` (``python -m lightning_firecaffe.testing.cluster down --all``) removes leftovers of runs that
were killed with SIGKILL.  Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), ``ip`` and ``tc``.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...processes import stop
from ...units import format_rate, parse_rate
from ..iproute import ip, tc

PREFIX = "fcn-"
INTERFACE = "fcnet0"  # the host end of the veth inside every host namespace
BRIDGE = "br0"
DEFAULT_SUBNET = "10.77.0"  # /24, private to the cluster's namespaces
WORKER = Path(__file__).with_name("worker.py")

_RUN_ID_RE = re.compile(r"^[a-z0-9]{1,12}$")


class EmulationUnavailable(RuntimeError):
    """The emulated cluster cannot be built here (not root, ``ip``/``tc`` missing, namespaces refused)."""


class ClusterRunError(RuntimeError):
    """One or more ranks failed (non-zero exit, exception in the workload, or timeout).

    ``results`` holds every rank's :class:`RankResult`; the first remote exception (when it could be
    pickled back) is chained as ``__cause__``.
    """

    def __init__(self, message: str, results: list[RankResult]):
        super().__init__(message)
        self.results = results


class ClusterTimeoutError(ClusterRunError, TimeoutError):
    """The run passed its deadline; every rank still running was killed."""


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the network namespaces that start with ``prefix``."""
    proc = ip("netns", "list", check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def list_runs(prefix: str = PREFIX) -> dict[str, list[str]]:
    """{run id: [namespace, ...]} of every cluster whose namespaces are still present."""
    runs: dict[str, list[str]] = {}
    for name in list_namespaces(prefix):
        run_id = name[len(prefix) :].split("-", 1)[0]
        runs.setdefault(run_id, []).append(name)
    return runs


def _namespace_pids(ns: str) -> list[int]:
    proc = ip("netns", "pids", ns, check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def delete_namespaces(names: Sequence[str]) -> list[str]:
    """Kill every process inside ``names``, then delete them (veths, bridges and qdiscs go with them).

    Returns the names that could not be deleted (empty when all went).
    """
    present = set(list_namespaces(prefix=""))
    names = [n for n in names if n in present]
    pids: list[int] = []
    for ns in names:
        pids += _namespace_pids(ns)
    if pids:
        stop(pids, grace_s=2.0)
    failed = []
    for ns in names:
        if ip("netns", "del", ns, check=False).returncode != 0 and ns in list_namespaces(prefix=""):
            failed.append(ns)
    return failed


def down_all(prefix: str = PREFIX, run_id: str | None = None) -> list[str]:
    """Remove every emulated cluster (or only ``run_id``) left behind, e.g. by a run killed with SIGKILL.

    Without ``run_id`` this removes *every* cluster with the prefix, including ones another process is still
    using.  Kills the processes inside, deletes the namespaces and run()'s scratch folders in the temporary
    directory.  Returns the namespaces removed.
    """
    names = list_namespaces(prefix + (f"{run_id}-" if run_id else ""))
    failed = delete_namespaces(names)
    # scratch folders of run() (spec/result/output files) of runs that never got to clean up
    for leftover in Path(tempfile.gettempdir()).glob(f"{prefix}{run_id + '-' if run_id else ''}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    if failed:
        raise RuntimeError(f"could not delete namespaces {failed}")
    return names


_PROBE: tuple[bool, str] | None = None


def can_emulate() -> tuple[bool, str]:
    """(True, "ok") when an emulated cluster can be built here, else (False, the reason).

    Checks root, ``ip`` and ``tc`` on PATH, and builds a probe namespace with a tbf qdisc (so a root user
    in a container without CAP_SYS_ADMIN/CAP_NET_ADMIN, or a kernel without sch_tbf, gets a clear reason).
    The result is cached for the process.
    """
    global _PROBE
    if _PROBE is not None:
        return _PROBE
    if not sys.platform.startswith("linux"):
        reason = "the emulated cluster needs Linux network namespaces"
    elif os.geteuid() != 0:
        reason = "the emulated cluster needs root (network namespaces, veth, tc)"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "the emulated cluster needs `ip` and `tc` (iproute2) on PATH"
    else:
        reason = ""
        probe = f"{PREFIX}probe{os.getpid()}"
        try:
            ip("netns", "add", probe)
            ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
            tc(
                "-n",
                probe,
                "qdisc",
                "add",
                "dev",
                "p0",
                "root",
                "tbf",
                "rate",
                "1gbit",
                "burst",
                "256kb",
                "latency",
                "100ms",
            )
        except (RuntimeError, OSError) as exc:
            reason = f"cannot build network namespaces/veth/tbf here: {exc}"
        finally:
            delete_namespaces([probe])
    _PROBE = (not reason, reason or "ok")
    return _PROBE


def require_root() -> None:
    """Raise :class:`EmulationUnavailable` with the reason when :func:`can_emulate` says no."""
    ok, reason = can_emulate()
    if not ok:
        raise EmulationUnavailable(reason)


@dataclass
class RankResult:
    """What one rank left behind.  ``value`` is the callable's return value (callables only)."""

    rank: int
    host: int
    local_rank: int
    returncode: int | None  # None: had to be killed (timeout or fail-fast); negative: killed by that signal
    stdout: str | None  # None when run(capture=False)
    stderr: str | None
    duration: float  # seconds from start to exit (or kill)
    value: Any = None
    error: str | None = None  # the remote traceback when the callable raised
    exception: BaseException | None = field(default=None, repr=False)  # the remote exception, if picklable
    failed_at: float | None = None  # time.time() when the callable raised (orders cause and consequences)
    timed_out: bool = False
    killed: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None and not self.killed


# --- signal and exit handling shared by every cluster of this process --------------------------------------

_active: list[EmulatedCluster] = []
_lock = threading.RLock()
_saved_handlers: dict[int, Any] = {}
_CATCH = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


def _raise_on_signal(signum, frame):  # installed only while clusters are up, and only over SIG_DFL
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread() or _saved_handlers:
        return
    for sig in _CATCH:
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:  # leave custom handlers and SIG_IGN alone
                _saved_handlers[sig] = signal.signal(sig, _raise_on_signal)
        except (ValueError, OSError):
            pass


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, old in list(_saved_handlers.items()):
        try:
            if signal.getsignal(sig) is _raise_on_signal:
                signal.signal(sig, old)
        except (ValueError, OSError):
            pass
        del _saved_handlers[sig]


class _Deferred:
    """Hold off SIGINT/SIGTERM/SIGHUP during a teardown (main thread only) and re-deliver them afterwards."""

    def __init__(self):
        self.pending: list[int] = []
        self.old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, *_CATCH):
                try:
                    self.old[sig] = signal.signal(sig, lambda s, f: self.pending.append(s))
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        with _lock:
            if not _active:  # the last cluster is gone: give SIGTERM/SIGHUP back their previous handlers
                _restore_handlers()
        if self.pending and exc[0] is None:
            signum = self.pending[0]
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, None)  # e.g. default_int_handler -> KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                raise SystemExit(128 + signum)  # the teardown is done; exit as the signal asked
        return False


@atexit.register
def _down_at_exit() -> None:
    for cluster in list(_active):
        if not cluster.keep:
            try:
                cluster.down()
            except Exception as exc:  # pragma: no cover - best effort at exit
                print(
                    f"lightning_firecaffe.testing.cluster: teardown of {cluster.run_id} failed: {exc}", file=sys.stderr
                )


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _target_spec(target: Callable | str) -> dict:
    """How the worker finds the callable: module + qualified name (+ the script path for ``__main__``)."""
    if isinstance(target, str):
        module, sep, qualname = target.partition(":")
        if not sep or not module or not qualname:
            raise ValueError(f"target {target!r}: expected 'package.module:function'")
        return {"module": module, "qualname": qualname, "main_path": None}
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"{target!r} is not importable: pass a module-level function (or 'module:function')")
    main_path = None
    if module == "__main__":
        main_path = getattr(sys.modules["__main__"], "__file__", None)
        if not main_path:
            raise ValueError(f"{target!r} lives in an interactive __main__: move it to a module")
        main_path = os.path.abspath(main_path)
    return {"module": module, "qualname": qualname, "main_path": main_path}


class EmulatedCluster:
    """``hosts`` network namespaces on a bridge, each link shaped to ``rate`` in both directions.

    Example::

        with EmulatedCluster(hosts=4, rate="1gbit") as cluster:
            results = cluster.run("lightning_firecaffe.testing.cluster.workloads:all_reduce_time", kwargs={"nbytes": 25e6})
            print(results[0].value)

    Args:
        hosts: number of hosts (namespaces), 1-254.
        rate: per-link rate in bits/s, each direction: ``"100mbit"``, ``"1gbit"``, ``"10gbit"``, a number,
            or None (unshaped: veth speed, CPU-bound).  No added latency: this kernel has no netem.
        ranks_per_host: ranks started per host by :meth:`run` (a multi-GPU node shares one link).
        subnet: first three octets of the hosts' /24 (host i gets ``subnet.(i+1)``); private to the
            cluster's namespaces, so parallel clusters may use the same one.
        prefix, run_id: namespaces are ``{prefix}{run_id}-br`` and ``{prefix}{run_id}-h{i}``; ``run_id``
            defaults to 6 random hex digits, so parallel runs never collide.
        burst: tbf bucket in bytes (default: 2 ms at ``rate``, at least 64 KiB).
        tbf_latency: tbf queue limit as time (``"100ms"``); not an added delay.
        mtu: MTU of every veth.
        keep: leave the cluster up at interpreter exit (for ``python -m lightning_firecaffe.testing.cluster up``);
            ``down()`` and ``down_all()`` still remove it.
    """

    def __init__(
        self,
        hosts: int,
        rate: str | int | float | None = "1gbit",
        ranks_per_host: int = 1,
        *,
        subnet: str = DEFAULT_SUBNET,
        prefix: str = PREFIX,
        run_id: str | None = None,
        burst: int | None = None,
        tbf_latency: str = "100ms",
        mtu: int = 1500,
        keep: bool = False,
    ):
        if not 1 <= int(hosts) <= 254:
            raise ValueError(f"hosts must be in 1..254, got {hosts}")
        if int(ranks_per_host) < 1:
            raise ValueError(f"ranks_per_host must be >= 1, got {ranks_per_host}")
        if not re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", subnet) or any(int(o) > 255 for o in subnet.split(".")):
            raise ValueError(f"subnet {subnet!r}: expected the first three octets, e.g. '10.77.0'")
        if not re.fullmatch(r"[A-Za-z0-9_.]{1,16}-?", prefix):
            raise ValueError(f"prefix {prefix!r}: letters, digits, '_' and '.' only")
        run_id = run_id or secrets.token_hex(3)
        if not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run_id {run_id!r}: 1-12 lower-case letters or digits")
        self.hosts = int(hosts)
        self.ranks_per_host = int(ranks_per_host)
        self.rate_bps = parse_rate(rate)
        self.rate = format_rate(self.rate_bps)
        self.subnet = subnet
        self.prefix = prefix
        self.run_id = run_id
        self.burst = int(burst) if burst else (max(self.rate_bps // 8 // 500, 64 * 1024) if self.rate_bps else None)
        self.tbf_latency = tbf_latency
        self.mtu = int(mtu)
        self.keep = keep
        self.interface = INTERFACE
        self.bridge_namespace = f"{prefix}{run_id}-br"
        self.host_namespaces = [f"{prefix}{run_id}-h{i}" for i in range(self.hosts)]
        self._created: list[str] = []
        self._procs: dict[int, subprocess.Popen] = {}
        self._is_up = False
        self._next_port = 29500

    # --- topology ----------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.hosts * self.ranks_per_host

    @property
    def master_addr(self) -> str:
        return self.host_addr(0)

    @property
    def is_up(self) -> bool:
        return self._is_up

    def host_addr(self, host: int) -> str:
        if not 0 <= host < self.hosts:
            raise IndexError(f"host {host} not in 0..{self.hosts - 1}")
        return f"{self.subnet}.{host + 1}"

    def host_of(self, rank: int) -> int:
        return rank // self.ranks_per_host

    def describe(self) -> dict:
        """A JSON-able description (run id, rate, namespaces, addresses)."""
        return {
            "run_id": self.run_id,
            "hosts": self.hosts,
            "ranks_per_host": self.ranks_per_host,
            "world_size": self.world_size,
            "rate": self.rate,
            "rate_bps": self.rate_bps,
            "burst_bytes": self.burst,
            "interface": self.interface,
            "bridge_namespace": self.bridge_namespace,
            "host_namespaces": list(self.host_namespaces),
            "addresses": [self.host_addr(i) for i in range(self.hosts)],
            "master_addr": self.master_addr,
        }

    def __repr__(self) -> str:
        state = "up" if self._is_up else "down"
        return (
            f"EmulatedCluster(run_id={self.run_id!r}, hosts={self.hosts}, rate={self.rate!r}, "
            f"ranks_per_host={self.ranks_per_host}, {state})"
        )

    @classmethod
    def attach(cls, run_id: str, ranks_per_host: int = 1, prefix: str = PREFIX) -> EmulatedCluster:
        """Use a cluster that is already up (e.g. from ``python -m lightning_firecaffe.testing.cluster up``).

        The attached object does not tear the cluster down at exit (``keep=True``) unless ``down()`` is called.
        """
        names = list_runs(prefix).get(run_id, [])
        host_ids = sorted(int(n.rsplit("-h", 1)[1]) for n in names if re.search(r"-h\d+$", n))
        if not host_ids or host_ids != list(range(len(host_ids))) or f"{prefix}{run_id}-br" not in names:
            raise LookupError(f"no complete emulated cluster with run id {run_id!r} (found {names})")
        addr = ip("-n", f"{prefix}{run_id}-h0", "-4", "-o", "addr", "show", "dev", INTERFACE).stdout.split()
        subnet = addr[addr.index("inet") + 1].split("/")[0].rsplit(".", 1)[0]
        rate = None
        qdisc = tc("-n", f"{prefix}{run_id}-h0", "qdisc", "show", "dev", INTERFACE, check=False).stdout
        match = re.search(r"rate (\S+)", qdisc)
        if match:
            rate = match.group(1).lower()  # tc prints e.g. "1Gbit", "200Mbit"
            try:
                parse_rate(rate)
            except ValueError:
                rate = None
        cluster = cls(len(host_ids), rate, ranks_per_host, subnet=subnet, prefix=prefix, run_id=run_id, keep=True)
        cluster._created = [cluster.bridge_namespace, *cluster.host_namespaces]
        cluster._is_up = True
        with _lock:
            _active.append(cluster)
        return cluster

    # --- lifecycle ---------------------------------------------------------------------------------------
    def up(self) -> EmulatedCluster:
        """Create namespaces, bridge, veths, addresses and qdiscs.  On any failure, undoes what it made."""
        if self._is_up:
            return self
        require_root()
        with _lock:
            _active.append(self)
            _install_handlers()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._is_up = True
        return self

    def _shape(self, ns: str, dev: str) -> None:
        if self.rate_bps is None:
            return
        tc(
            "-n",
            ns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            f"{self.rate_bps}bit",
            "burst",
            str(self.burst),
            "latency",
            self.tbf_latency,
        )

    def _build(self) -> None:
        existing = set(list_namespaces(prefix=""))
        clash = [n for n in (self.bridge_namespace, *self.host_namespaces) if n in existing]
        if clash:
            raise RuntimeError(f"namespaces {clash} already exist (run id {self.run_id!r} in use?)")
        br = self.bridge_namespace
        self._created.append(br)
        ip("netns", "add", br)
        ip("-n", br, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        ip("-n", br, "link", "set", BRIDGE, "up")
        for i, ns in enumerate(self.host_namespaces):
            self._created.append(ns)
            ip("netns", "add", ns)
            port = f"h{i}"
            # created directly inside the namespaces: nothing ever appears in the root namespace
            ip(
                "-n",
                br,
                "link",
                "add",
                port,
                "mtu",
                str(self.mtu),
                "type",
                "veth",
                "peer",
                "name",
                INTERFACE,
                "netns",
                ns,
                "mtu",
                str(self.mtu),
            )
            ip("-n", br, "link", "set", port, "master", BRIDGE)
            ip("-n", br, "link", "set", port, "up")
            ip("-n", ns, "link", "set", INTERFACE, "addrgenmode", "none")  # no IPv6 link-local for gloo to pick
            ip("-n", ns, "addr", "add", f"{self.host_addr(i)}/24", "dev", INTERFACE)
            ip("-n", ns, "link", "set", INTERFACE, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            self._shape(ns, INTERFACE)  # host -> bridge
            self._shape(br, port)  # bridge -> host

    def down(self) -> None:
        """Kill every rank and every process in the namespaces, delete the namespaces.  Idempotent."""
        with _Deferred():
            self._kill_procs()
            names = list(dict.fromkeys(self._created))
            failed = delete_namespaces(names)
            self._created = failed
            self._is_up = False
            with _lock:
                if self in _active and not failed:
                    _active.remove(self)
        if failed:
            raise RuntimeError(f"could not delete namespaces {failed}")

    def __enter__(self) -> EmulatedCluster:
        return self.up()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.down()
        return False

    def _kill_procs(self) -> None:
        """Kill every process this object started (each leads its own process group) and reap them."""
        procs, self._procs = list(self._procs.values()), {}
        self._kill_group(procs)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    # --- running things ----------------------------------------------------------------------------------
    def _check_up(self) -> None:
        if not self._is_up:
            raise RuntimeError(f"{self!r} is not up: use `with EmulatedCluster(...) as c:` or call up()")

    def popen(self, host: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside host ``host``'s namespace (own session; killed at ``down()``)."""
        self._check_up()
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("preexec_fn", _set_pdeathsig)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.host_namespaces[host], *argv],
            env=dict(env) if env is not None else None,
            **kwargs,
        )
        self._procs[proc.pid] = proc
        return proc

    def exec(self, host: int, argv: Sequence[str], timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` in host ``host``'s namespace to completion (e.g. ``["ip", "addr"]``); captures text."""
        self._check_up()
        return subprocess.run(
            ["ip", "netns", "exec", self.host_namespaces[host], *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )

    def rank_env(self, rank: int, world_size: int, master_port: int) -> dict[str, str]:
        """The variables every rank gets (torch.distributed env:// rendezvous over the emulated links)."""
        host, local = divmod(rank, self.ranks_per_host)
        local_world = min(self.ranks_per_host, world_size - host * self.ranks_per_host)
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(master_port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(local_world),
            "GROUP_RANK": str(host),
            "NODE_RANK": str(host),
            "GLOO_SOCKET_IFNAME": self.interface,
            "TP_SOCKET_IFNAME": self.interface,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FIRECAFFE_CLUSTER_HOST": str(host),
            "FIRECAFFE_CLUSTER_HOST_ADDR": self.host_addr(host),
            "FIRECAFFE_CLUSTER_RUN_ID": self.run_id,
        }

    def next_master_port(self) -> int:
        """A MASTER_PORT for the next run, turning over 29500-29999: inside the namespaces the host's free
        ports mean nothing, and a fresh port per run keeps a run clear of the last one's closing sockets."""
        port, self._next_port = self._next_port, self._next_port + 1
        if self._next_port > 29999:
            self._next_port = 29500
        return port

    def run(
        self,
        target: Callable | str | Sequence[str],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        world_size: int | None = None,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        backend: str | None = "gloo",
        master_port: int | None = None,
        check: bool = True,
        fail_fast: float | None = 5.0,
        capture: bool = True,
    ) -> list[RankResult]:
        """Run one process per rank inside its host's namespace and wait for all of them.

        ``target`` is either a command (a list of strings, run as is with the rank's environment) or a
        module-level callable / ``"package.module:function"`` run by :mod:`lightning_firecaffe.testing.cluster.worker`
        as ``fn(*args, **kwargs)`` after ``torch.distributed.init_process_group(backend)`` (env://; skipped
        when ``backend`` is None); its return value comes back pickled in ``RankResult.value``.  ``args`` and
        ``kwargs`` are pickled to the ranks.

        Rank ``r`` runs on host ``r // ranks_per_host``; ``world_size`` (default: all hosts x ranks_per_host)
        may be smaller, e.g. 2 ranks on hosts 0 and 1 of a 3-host cluster.  Every rank gets the variables of
        :meth:`rank_env` on top of ``os.environ`` and ``env``.

        ``timeout`` is a deadline for the whole run: ranks still running then are killed.  With ``fail_fast``
        seconds, the others are killed that long after the first rank fails (a peer of a crashed rank would
        otherwise sit in a collective until gloo's own timeout).  With ``check`` (default) a failure raises
        :class:`ClusterRunError` (:class:`ClusterTimeoutError` on timeout) carrying all results, chained to
        the first remote exception; otherwise the results are returned either way.  ``capture=False`` lets
        the ranks write to this process's stdout/stderr instead.
        """
        self._check_up()
        world_size = self.world_size if world_size is None else int(world_size)
        if not 1 <= world_size <= self.world_size:
            raise ValueError(f"world_size must be in 1..{self.world_size}, got {world_size}")
        if master_port is None:
            master_port = self.next_master_port()
        is_command = not callable(target) and not isinstance(target, str)
        spec = None if is_command else _target_spec(target)  # validate before starting anything

        with tempfile.TemporaryDirectory(prefix=f"{self.prefix}{self.run_id}-") as tmp:
            tmpdir = Path(tmp)
            base_env = dict(os.environ)
            if not is_command:
                # the worker imports the target with the caller's import path (tests, scripts, src layouts)
                paths = [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]
                base_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
                spec_file = tmpdir / "spec.pkl"
                spec_file.write_bytes(
                    pickle.dumps(
                        {
                            **spec,
                            "args": pickle.dumps((tuple(args), dict(kwargs or {}))),
                            "backend": backend,
                            "timeout": float(timeout),
                        }
                    )
                )
            base_env.update(env or {})
            procs: dict[int, subprocess.Popen] = {}
            files: dict[int, tuple] = {}
            starts: dict[int, float] = {}
            ends: dict[int, float] = {}
            killed: set[int] = set()
            timed_out = False
            try:
                for rank in range(world_size):
                    rank_env = {**base_env, **self.rank_env(rank, world_size, master_port)}
                    if is_command:
                        argv = [str(a) for a in target]
                    else:
                        argv = [sys.executable, str(WORKER), str(spec_file), str(tmpdir / f"result{rank}.pkl")]
                    if capture:
                        out = open(tmpdir / f"stdout{rank}", "wb")
                        err = open(tmpdir / f"stderr{rank}", "wb")
                        files[rank] = (out, err)
                    else:
                        out = err = None
                    starts[rank] = time.monotonic()
                    procs[rank] = self.popen(
                        self.host_of(rank), argv, env=rank_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
                    )
                deadline = time.monotonic() + timeout
                first_failure: float | None = None
                while True:
                    now = time.monotonic()
                    for rank, p in procs.items():
                        if rank not in ends and p.poll() is not None:
                            ends[rank] = now
                            if p.returncode != 0 and first_failure is None:
                                first_failure = now
                    running = [r for r in procs if r not in ends]
                    if not running:
                        break
                    if now >= deadline:
                        timed_out = True
                    elif fail_fast is not None and first_failure is not None and now >= first_failure + fail_fast:
                        pass
                    else:
                        time.sleep(0.02)
                        continue
                    killed.update(running)
                    self._kill_group([procs[r] for r in running])
                    now = time.monotonic()
                    for r in running:
                        ends[r] = now
                    break
            finally:
                live = [p for p in procs.values() if p.poll() is None]
                if live:  # interrupted (Ctrl-C, SIGTERM, error): leave nothing running
                    self._kill_group(live)
                for out, err in files.values():
                    out.close()
                    err.close()
                for p in procs.values():
                    self._procs.pop(p.pid, None)

            results = []
            for rank, p in procs.items():
                res = RankResult(
                    rank=rank,
                    host=self.host_of(rank),
                    local_rank=rank % self.ranks_per_host,
                    returncode=None if rank in killed else p.returncode,
                    stdout=(tmpdir / f"stdout{rank}").read_text(errors="replace") if capture else None,
                    stderr=(tmpdir / f"stderr{rank}").read_text(errors="replace") if capture else None,
                    duration=ends.get(rank, time.monotonic()) - starts[rank],
                    timed_out=timed_out and rank in killed,
                    killed=rank in killed,
                )
                result_file = tmpdir / f"result{rank}.pkl"
                if not is_command and result_file.exists():
                    try:
                        payload = pickle.loads(result_file.read_bytes())
                    except Exception as exc:  # e.g. a return value whose class the parent cannot import
                        res.error = f"could not unpickle the result of rank {rank}: {exc!r}"
                    else:
                        res.value = payload.get("value")
                        res.error = payload.get("error")
                        res.exception = payload.get("exception")
                        res.failed_at = payload.get("failed_at")
                results.append(res)

        if check and not all(r.ok for r in results):
            raise self._failure(results, timed_out, timeout)
        return results

    @staticmethod
    def _kill_group(procs: Sequence[subprocess.Popen]) -> None:
        """SIGTERM the process groups, SIGKILL what is still alive 2 s later."""
        procs = [p for p in procs if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + 2.0
            procs = [p for p in procs if p.poll() is None]
            while procs and time.monotonic() < deadline:
                time.sleep(0.02)
                procs = [p for p in procs if p.poll() is None]
            if not procs:
                return

    @staticmethod
    def _failure(results: list[RankResult], timed_out: bool, timeout: float) -> ClusterRunError:
        bad = [r for r in results if not r.ok]
        lines = []
        for r in bad:
            if r.error:
                what = r.error.strip().splitlines()[-1]
            elif r.timed_out:
                what = f"killed at the {timeout:g} s deadline"
            elif r.killed:
                what = "killed after another rank failed"
            else:
                what = f"exit code {r.returncode}"
            lines.append(f"rank {r.rank} (host {r.host}): {what}")
        # the rank that raised first is the cause; its peers usually fail after it ("connection closed")
        raised = sorted((r for r in bad if r.error), key=lambda r: (r.failed_at is None, r.failed_at or 0.0))
        first = raised[0] if raised else bad[0]
        detail = first.error or (first.stderr or "")[-2000:]
        message = "; ".join(lines) + (f"\n--- rank {first.rank} (first to fail) ---\n{detail}" if detail else "")
        cls = ClusterTimeoutError if timed_out else ClusterRunError
        err = cls(message, results)
        cause = next((r.exception for r in raised if r.exception is not None), None)
        if cause is not None:
            err.__cause__ = cause
        return err

    # --- measurements ------------------------------------------------------------------------------------
    def link_stats(self) -> dict[int, dict[str, int]]:
        """Bytes and packets per host link as seen by the host: {host: {tx_bytes, rx_bytes, tx_packets, rx_packets}}."""
        self._check_up()
        stats = {}
        for i, ns in enumerate(self.host_namespaces):
            info = json.loads(ip("-j", "-s", "-n", ns, "link", "show", "dev", INTERFACE).stdout)[0]["stats64"]
            stats[i] = {
                "tx_bytes": info["tx"]["bytes"],
                "rx_bytes": info["rx"]["bytes"],
                "tx_packets": info["tx"]["packets"],
                "rx_packets": info["rx"]["packets"],
            }
        return stats
