"""A real one-node SLURM cluster on localhost, with slurmdbd accounting, for tests and CI.

Everything lives in a private state directory: configuration (``SLURM_CONF`` points there, ``/etc`` is
never touched), a private munge key and socket, a private MariaDB instance on a free 127.0.0.1 port,
the spool/state directories, logs and pid files. Free ports are picked for slurmctld, slurmd and slurmdbd,
so the cluster neither needs nor disturbs a system-wide SLURM. Nothing is installed here: missing
binaries are reported with the reason (see ``.ci/install-slurm.sh``).

Python::

    from lightning_firecaffe.testing.slurm import LocalSlurm, SlurmUnavailable

    with LocalSlurm() as cluster:                 # raises SlurmUnavailable (with the reason) if it can't
        subprocess.run(["sbatch", "--wait", "job.sh"], env=cluster.env(), timeout=120)

CLI::

    python -m lightning_firecaffe.testing.slurm up [--state-dir DIR]   # prints `export SLURM_CONF=...`
    python -m lightning_firecaffe.testing.slurm status [--state-dir DIR]
    python -m lightning_firecaffe.testing.slurm down [--state-dir DIR]

Teardown is guaranteed three ways: ``down()`` on leaving the ``with`` block; a detached reaper process that
runs ``down`` when the owning process dies (even by SIGKILL, e.g. a pytest-timeout) or after ``ttl``
seconds; and ``down`` only ever signals processes it recorded itself or that carry this cluster's
``SLURM_CONF`` in their environment (job steps). Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..processes import alive, descendants, stop
from .ranks import free_port

DEFAULT_STATE_DIR = Path(os.environ.get("FIRECAFFE_SLURM_DIR", "/tmp/firecaffe-slurm"))
CLUSTER_NAME = "firecaffe"
PARTITION = "debug"
NODE_NAME = "localhost"
MARKER_VAR = "FIRECAFFE_SLURM_STATE"

# binary -> what provides it (for the "missing" message)
REQUIRED = {
    "munged": "munge",
    "mungekey": "munge",
    "slurmctld": "slurm-wlm",
    "slurmd": "slurm-wlm",
    "slurmstepd": "slurm-wlm",
    "sbatch": "slurm-wlm",
    "srun": "slurm-wlm",
    "sinfo": "slurm-wlm",
    "scancel": "slurm-wlm",
    "sacct": "slurm-wlm",
    "sacctmgr": "slurm-wlm",
    "slurmdbd": "slurmdbd",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
}
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class SlurmUnavailable(RuntimeError):
    """The local cluster cannot run here (missing packages, not root); the message says why."""


class SlurmStartError(RuntimeError):
    """A daemon did not come up in time; the message names it and ends with its log."""


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def check_prerequisites() -> str | None:
    """``None`` when the cluster can run here, otherwise the reason it cannot."""
    if sys.platform != "linux":
        return f"local SLURM needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "local SLURM needs root (slurmd launches jobs as their owner; munge/mariadb run as root here)"
    missing = sorted({f"{b} (package {pkg})" for b, pkg in REQUIRED.items() if _which(b) is None})
    if missing:
        return "SLURM binaries missing: " + ", ".join(missing) + "; install them with .ci/install-slurm.sh"
    return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _wait(what: str, predicate: Callable[[], bool], timeout: float, log: Path | None = None, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            suffix = f"\n--- last lines of {log} ---\n{_tail(log)}" if log else ""
            raise SlurmStartError(f"local SLURM: {what} not reached within {timeout:.0f} s{suffix}")
        time.sleep(poll)


def _wait_quietly(predicate: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


@dataclass(frozen=True)
class SlurmNode:
    """One slurmd: its SLURM node name, the address slurmctld reaches it at, its hardware line."""

    name: str
    addr: str
    hardware: str


def compose_slurm_conf(
    state_dir: Path,
    ports: dict,
    munge_socket: Path,
    nodes: Sequence[SlurmNode],
    controller_addr: str | None = None,
    slurmd_timeout: int = 300,
) -> str:
    """slurm.conf for a private cluster of ``nodes`` (one slurmd each, all in one default partition).

    slurmd's spool, pid and log paths carry ``%n`` (the node name), so several slurmd on one machine keep
    apart; ``controller_addr`` is where the nodes (and clients) reach slurmctld when that is not localhost;
    ``slurmd_timeout``: seconds without an answer before slurmctld declares a node DOWN (and fails its jobs).
    ``JobRequeue=0``: a job is requeued only if submitted with ``--requeue`` (preemption, see
    ``examples/sbatch_firecaffe.sh``); otherwise a node failure fails it (NODE_FAIL) and launchers report it,
    where SLURM's default (1) would requeue it and leave them waiting for the node to return.
    """
    if not nodes:
        raise ValueError("a SLURM cluster needs at least one node")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be unique, got {names}")
    d = Path(state_dir)
    auth = f"AuthType=auth/munge\nAuthInfo=socket={munge_socket}\n"
    ctld_addr = f"SlurmctldAddr={controller_addr}\n" if controller_addr else ""
    node_lines = "".join(f"NodeName={n.name} NodeAddr={n.addr} {n.hardware} State=UNKNOWN\n" for n in nodes)
    return f"""# written by lightning_firecaffe.testing.slurm; removed by `down`
ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost
{ctld_addr}SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
{auth}CredType=cred/munge
StateSaveLocation={d / "spool" / "ctld"}
SlurmdSpoolDir={d / "spool" / "d" / "%n"}
SlurmctldPidFile={d / "run" / "slurmctld.pid"}
SlurmdPidFile={d / "run" / "slurmd-%n.pid"}
SlurmctldLogFile={d / "log" / "slurmctld.log"}
SlurmdLogFile={d / "log" / "slurmd-%n.log"}
PlugStackConfig={d / "etc" / "plugstack.conf"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
EnforcePartLimits=ALL
MpiDefault=none
ReturnToService=2
JobRequeue=0
MailProg=/bin/true
KillWait=2
SlurmdTimeout={slurmd_timeout}
InactiveLimit=0
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports["slurmdbd"]}
AccountingStoragePass={munge_socket}
JobCompType=jobcomp/none
{node_lines}PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """A one-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) in a private state dir.

    Args:
        state_dir: where everything lives; a fresh temporary directory when ``None``. Removed by ``down``.
        start_timeout: seconds allowed for the whole bring-up (each step gets what is left).
        ttl: seconds after which the reaper tears the cluster down regardless (``None``: never).
        owner_pid: the reaper tears down when this process dies (default: the caller; ``0``: never).
    """

    def __init__(
        self,
        state_dir: os.PathLike | str | None = None,
        start_timeout: float = 90.0,
        ttl: float | None = 3600.0,
        owner_pid: int | None = None,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.start_timeout = start_timeout
        self.ttl = ttl
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}  # daemons we started here (reaped, never zombies)

    # ----------------------------------------------------------------------------------------- paths
    def _p(self, *parts: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir.joinpath(*parts)

    @property
    def slurm_conf(self) -> Path:
        return self._p("etc", "slurm.conf")

    @property
    def munge_socket(self) -> Path:
        return self._p("munge", "munge.socket.2")

    # What a subclass changes for several nodes (testing/slurm_cluster.py): the nodes, where slurmctld is
    # reached, how each slurmd starts and how its port is checked.
    controller_addr: str | None = None
    slurmd_timeout = 300

    def slurm_nodes(self, hardware: str) -> list[SlurmNode]:
        return [SlurmNode(NODE_NAME, "127.0.0.1", hardware)]

    def slurmd_log(self, node: str) -> Path:
        return self._p("log", f"slurmd-{node}.log")

    def env(self, base: dict | None = None) -> dict:
        """Environment for clients (sbatch, srun, sinfo, sacct, submitit): ``SLURM_CONF`` set, sbin on PATH."""
        env = dict(os.environ if base is None else base)
        env.pop(MARKER_VAR, None)
        env["SLURM_CONF"] = str(self.slurm_conf)
        for var in list(env):  # never inherit an enclosing job's identity
            if var.startswith("SLURM_") and var != "SLURM_CONF":
                env.pop(var)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
        return env

    def run(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster, with a timeout."""
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=check)

    # -------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalSlurm:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> LocalSlurm:
        reason = check_prerequisites()
        if reason:
            raise SlurmUnavailable(reason)
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="firecaffe-slurm-"))
        elif self._p("pids.json").exists():
            raise SlurmStartError(f"local SLURM: {self.state_dir} already holds a cluster; run `down` first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        for sub in ("etc", "munge", "log", "run", "db", "spool/ctld", "spool/d"):
            self._p(sub).mkdir(parents=True, exist_ok=True)
        self._save_pids({})
        deadline = time.monotonic() + self.start_timeout
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        try:
            self._spawn_reaper()
            self._write_configs()
            self._start_munge(left())
            self._start_mariadb(left())
            self._start_slurmdbd(left())
            self._start_slurmctld(left())
            self._start_slurmd(left())
            self._wait_ready(left())
        except BaseException:
            self.down()
            raise
        return self

    # ---------------------------------------------------------------------------------------- configs
    def _write_configs(self) -> None:
        self.ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
        (self._p("ports.json")).write_text(json.dumps(self.ports))
        hw = self._node_hardware()
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        slurm_conf = compose_slurm_conf(
            self.state_dir,
            self.ports,
            self.munge_socket,
            self.slurm_nodes(hw),
            self.controller_addr,
            self.slurmd_timeout,
        )
        self.slurm_conf.write_text(slurm_conf)
        # cgroups are not used (proctrack/linuxproc, task/none); the file only keeps slurmd from looking in /etc.
        self._p("etc", "cgroup.conf").write_text("CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n")
        self._p("etc", "plugstack.conf").write_text("")
        self._db_password = secrets.token_hex(16)
        dbd = self._p("etc", "slurmdbd.conf")
        dbd.touch(mode=0o600)
        os.chmod(dbd, 0o600)  # slurmdbd refuses a readable file holding the password
        dbd.write_text(
            f"""{auth}DbdHost=localhost
DbdPort={self.ports["slurmdbd"]}
SlurmUser=root
PidFile={self._p("run", "slurmdbd.pid")}
LogFile={self._p("log", "slurmdbd.log")}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports["mariadb"]}
StorageUser=slurm
StoragePass={self._db_password}
StorageLoc=slurm_acct_db
"""
        )

    @staticmethod
    def _node_hardware() -> str:
        """CPUs/sockets/cores/memory as slurmd sees them (a mismatch would drain the node)."""
        try:
            out = subprocess.run(
                [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
        fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
        if all(k in fields for k in keys):
            return " ".join(f"{k}={fields[k]}" for k in keys)
        return f"CPUs={os.cpu_count() or 1}"

    # --------------------------------------------------------------------------------------- daemons
    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> int:
        if env is None:  # a daemon: mark it (and so slurmstepd) as this cluster's, for `down`
            env = self.env()
            env[MARKER_VAR] = str(self.state_dir)
        log = open(self._p("log", f"{name}.out"), "ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        log.close()
        pids = self._load_pids()
        pids[name] = proc.pid
        self._save_pids(pids)
        self._procs[name] = proc
        return proc.pid

    def _setup_cmd(self, what: str, argv: list, timeout: float) -> None:
        """A one-shot set-up command (key, database bootstrap), failing as SlurmStartError with its output."""
        try:
            r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmStartError(f"local SLURM: {what} did not finish within {timeout:.0f} s") from None
        if r.returncode != 0:
            raise SlurmStartError(f"local SLURM: {what} failed (rc={r.returncode}):\n{(r.stdout + r.stderr)[-2000:]}")

    def _check_running(self, name: str, log: Path) -> Callable[[], bool]:
        pid = self._load_pids()[name]

        def dead() -> bool:
            proc = self._procs.get(name)
            if (proc.poll() is not None) if proc is not None else not alive(pid):
                raise SlurmStartError(f"local SLURM: {name} exited during start-up\n--- {log} ---\n{_tail(log)}")
            return False

        return dead

    def _wait_for(self, name: str, predicate: Callable[[], bool], timeout: float, log: Path) -> None:
        died = self._check_running(name, log)
        _wait(f"{name} ready", lambda: predicate() or died(), timeout, log)

    def _start_munge(self, timeout: float) -> None:
        key = self._p("munge", "munge.key")
        self._setup_cmd("mungekey", [_which("mungekey"), "--create", f"--keyfile={key}"], min(20.0, timeout))
        os.chmod(key, 0o400)
        os.chmod(self._p("munge"), 0o700)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self._p('munge', 'munged.pid')}",
                f"--log-file={self._p('log', 'munged.log')}",
                f"--seed-file={self._p('munge', 'munged.seed')}",
            ],
        )
        self._wait_for("munged", self.munge_socket.exists, timeout, self._p("log", "munged.out"))

    def _start_mariadb(self, timeout: float) -> None:
        datadir = self._p("db", "data")
        self._setup_cmd(
            "mariadb-install-db",
            [
                _which("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={datadir}",
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            timeout,
        )
        init = self._p("db", "init.sql")
        init.write_text(
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}';\n"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n"
        )
        os.chmod(init, 0o600)
        self._spawn(
            "mariadbd",
            [
                _which("mariadbd"),
                "--no-defaults",
                f"--datadir={datadir}",
                "--user=root",
                f"--socket={self._p('db', 'mysqld.sock')}",
                f"--port={self.ports['mariadb']}",
                "--bind-address=127.0.0.1",
                f"--pid-file={self._p('db', 'mariadbd.pid')}",
                f"--log-error={self._p('log', 'mariadbd.log')}",
                f"--init-file={init}",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
                "--innodb-lock-wait-timeout=900",
                "--max-allowed-packet=16M",
            ],
        )
        self._wait_for("mariadbd", lambda: _port_open(self.ports["mariadb"]), timeout, self._p("log", "mariadbd.log"))

    def _start_slurmdbd(self, timeout: float) -> None:
        # slurmdbd.conf is found next to $SLURM_CONF
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait_for("slurmdbd", lambda: _port_open(self.ports["slurmdbd"]), timeout, self._p("log", "slurmdbd.log"))

    def _start_slurmctld(self, timeout: float) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        self._wait_for(
            "slurmctld", lambda: _port_open(self.ports["slurmctld"]), timeout, self._p("log", "slurmctld.log")
        )

    def _start_slurmd(self, timeout: float) -> None:
        self._p("spool", "d", NODE_NAME).mkdir(parents=True, exist_ok=True)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE_NAME])
        self._wait_for("slurmd", lambda: _port_open(self.ports["slurmd"]), timeout, self.slurmd_log(NODE_NAME))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        def node_idle() -> bool:  # every node
            r = self.run("sinfo", "-h", "-N", "-o", "%t", timeout=10, check=False)
            return r.returncode == 0 and bool(r.stdout.split()) and set(r.stdout.split()) == {"idle"}

        def accounting() -> bool:
            r = self.run("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster", timeout=10, check=False)
            if CLUSTER_NAME not in r.stdout.split():
                return False
            return self.run("sacct", "-n", "-X", "-a", timeout=10, check=False).returncode == 0

        _wait(
            "every node idle in sinfo",
            node_idle,
            max(1.0, deadline - time.monotonic()),
            self._p("log", "slurmctld.log"),
        )
        _wait("accounting (sacct)", accounting, max(1.0, deadline - time.monotonic()), self._p("log", "slurmdbd.log"))

    # -------------------------------------------------------------------------------------- teardown
    def _load_pids(self) -> dict:
        try:
            return json.loads(self._p("pids.json").read_text())
        except (OSError, ValueError):
            return {}

    def _save_pids(self, pids: dict) -> None:
        tmp = self._p("pids.json.tmp")
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, self._p("pids.json"))

    def _spawn_reaper(self) -> None:
        if not self.owner_pid and self.ttl is None:
            return
        # Run this file as a script: stdlib only, no package (torch, lightning) import.
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "_reap",
            "--state-dir",
            str(self.state_dir),
            "--owner-pid",
            str(self.owner_pid or 0),
            "--ttl",
            str(self.ttl or 0),
        ]
        env = dict(os.environ)
        env.pop(MARKER_VAR, None)
        self._spawn("reaper", argv, env=env)

    def _cluster_processes(self, jobs_only: bool = False) -> list[int]:
        """Pids of this cluster's daemons and everything below them (slurmstepd, job tasks); ``jobs_only``:
        slurmstepd and below.

        The daemons, and slurmstepd which inherits slurmd's environment, carry ``FIRECAFFE_SLURM_STATE=<state dir>``
        (clients never do); job tasks are found as their descendants.
        """
        roots = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER_VAR) == str(self.state_dir):
                    if not jobs_only or proc.name() == "slurmstepd":
                        roots.append(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        found = {p for root in roots for p in (root, *descendants(root))}
        found.discard(os.getpid())
        return sorted(found)

    def down(self, timeout: float = 30.0) -> None:
        """Stop every process this cluster started and remove the state directory. Idempotent, bounded."""
        if self.state_dir is None or not self.state_dir.exists():
            return
        deadline = time.monotonic() + timeout
        pids = self._load_pids()
        reaper = pids.pop("reaper", None)
        if pids.get("slurmctld") and alive(pids["slurmctld"]):
            try:
                self.run("scancel", "--full", "--quiet", "--user=root", timeout=5, check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass
        # Jobs first: give the cancellation a moment (KillWait), then SIGTERM/SIGKILL what is left of them
        # (slurmstepd and tasks; Lightning's tasks ignore SIGTERM under SLURM).
        _wait_quietly(lambda: not self._cluster_processes(jobs_only=True), min(3.0, timeout / 6))
        self._stop(self._cluster_processes(jobs_only=True), min(1.0, timeout / 10), deadline)
        # Then the daemons (they stop in well under a second once no job runs); SIGKILL after a short grace:
        # the cluster is disposable, its state directory is removed below.
        order = ["slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"]
        daemons = [pids[n] for n in pids if n.startswith("slurmd-")] + [pids[n] for n in order if n in pids]
        self._stop(daemons, min(3.0, timeout / 3), deadline)
        leftovers = [p for p in self._cluster_processes() if p != reaper]
        self._stop(leftovers, 0.0, deadline)
        if reaper and reaper != os.getpid() and alive(reaper):
            self._signal(reaper, signal.SIGTERM)
        self._reap_children()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _stop(self, pids: list[int], grace: float, deadline: float) -> None:
        """SIGTERM, wait up to ``grace`` seconds, SIGKILL the rest, wait (bounded by ``deadline``)."""
        stop(pids, grace, kill_wait_s=max(0.0, deadline - time.monotonic()))
        self._reap_children()

    def _reap_children(self) -> None:
        for proc in self._procs.values():
            proc.poll()

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # ------------------------------------------------------------------------------------------ jobs
    TERMINAL_STATES = (
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    )

    def job_state(self, job_id: str) -> str:
        """The job's state from accounting (``sacct``), e.g. ``RUNNING`` or ``COMPLETED``; ``""`` if unknown yet."""
        r = self.run("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State", timeout=15, check=False)
        return r.stdout.strip().split()[0] if r.stdout.strip() else ""

    def wait_job(self, job_id: str, timeout: float = 120.0, poll: float = 0.5) -> str:
        """Wait for a terminal state and return it; on timeout the job is cancelled and TimeoutError raised."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state.split(" ")[0] in self.TERMINAL_STATES:
                return state
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), timeout=10, check=False)
                raise TimeoutError(f"SLURM job {job_id} still {state or 'unknown'} after {timeout:.0f} s (cancelled)")
            time.sleep(poll)

    def sbatch(self, *args: str, env: dict | None = None, cwd: os.PathLike | str | None = None) -> str:
        """Submit (``sbatch --parsable ARGS...``) and return the job id; ``env`` defaults to :meth:`env`."""
        r = subprocess.run(
            ["sbatch", "--parsable", *args], env=env or self.env(), cwd=cwd, capture_output=True, text=True, timeout=30
        )
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed (rc={r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    # ---------------------------------------------------------------------------------------- status
    def status(self) -> dict:
        """Which recorded daemons are alive, and what sinfo says."""
        pids = self._load_pids() if self.state_dir and self.state_dir.exists() else {}
        info = {
            "state_dir": str(self.state_dir),
            "slurm_conf": str(self.slurm_conf) if self.state_dir else None,
            "daemons": {n: {"pid": p, "alive": alive(p)} for n, p in pids.items()},
        }
        if pids:
            try:
                r = self.run("sinfo", "-h", "-N", "-o", "%N %t %c", timeout=10, check=False)
                info["sinfo"] = (r.stdout or r.stderr).strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                info["sinfo"] = f"error: {exc}"
        return info


def _reap(state_dir: str, owner_pid: int, ttl: float) -> None:
    """Detached watchdog: tear the cluster down when its owner dies or the ttl runs out."""
    cluster = LocalSlurm(state_dir, owner_pid=0)
    end = time.monotonic() + ttl if ttl > 0 else float("inf")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while Path(state_dir).exists() and time.monotonic() < end:
        if owner_pid and not alive(owner_pid):
            break
        time.sleep(1.0)
    if Path(state_dir, "pids.json").exists():
        cluster.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_firecaffe.testing.slurm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["up", "down", "status", "check", "_reap"])
    parser.add_argument(
        "--state-dir", default=str(DEFAULT_STATE_DIR), help=f"default {DEFAULT_STATE_DIR} ($FIRECAFFE_SLURM_DIR)"
    )
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds allowed for `up`")
    parser.add_argument("--ttl", type=float, default=0.0, help="`up`: tear down after this many seconds (0: never)")
    parser.add_argument("--owner-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "_reap":
        _reap(args.state_dir, args.owner_pid, args.ttl)
        return 0
    if args.command == "check":
        reason = check_prerequisites()
        print(reason or "ok: local SLURM can run here")
        return 1 if reason else 0
    cluster = LocalSlurm(args.state_dir, start_timeout=args.timeout, ttl=args.ttl or None, owner_pid=0)
    if args.command == "up":
        try:
            t0 = time.monotonic()
            cluster.up()
        except SlurmUnavailable as exc:
            print(f"local SLURM unavailable: {exc}", file=sys.stderr)
            return 2
        except SlurmStartError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        print(
            f"# local SLURM up in {time.monotonic() - t0:.1f} s; stop with: "
            f"python -m lightning_firecaffe.testing.slurm down --state-dir {cluster.state_dir}"
        )
        print(f"export SLURM_CONF={cluster.slurm_conf}")
        return 0
    if args.command == "down":
        cluster.down()
        print(f"local SLURM in {args.state_dir} stopped and removed")
        return 0
    print(json.dumps(cluster.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
