"""A real multi-node SLURM on one machine: every node is a host of the emulated cluster (its own network
namespace, address, hostname and shaped link) running its own ``slurmd``.

Layout (run id ``RID``, subnet ``S`` picked free, e.g. ``10.78.23``)::

    root namespace : munged, MariaDB, slurmdbd, slurmctld (LocalSlurm's private state dir, SLURM_CONF);
                     veth fcs<RID> = S.254/24, its peer on the emulated cluster's bridge
    fcn-RID-h<i>   : slurmd -N node<i>, fcnet0 = S.<i+1>/24 (tbf-shaped), UTS hostname node<i>,
                     /etc/netns/fcn-RID-h<i>/hosts (``ip netns exec`` mounts it over /etc/hosts)

Clients (sbatch, sacct, submitit) run in the root namespace and reach slurmctld at ``S.254``; slurmd reach
it there through the bridge; job steps run inside their node's namespace (slurmd's mount and UTS
namespaces included), so ``node1`` resolves to its cluster address from every node. munge's socket is a
file on the shared filesystem. A node listed in ``misleading_hostnames`` gets a second interface
(``fcmgmt0``, one end of a veth pair inside the node: a network no other node reaches) and its own hosts file maps its hostname there: gloo's
hostname-based default would bind to an address the others cannot reach.

Teardown: :meth:`down` stops SLURM (LocalSlurm's), then deletes the namespaces (with the veth) and the hosts
files. If the owner dies (even by SIGKILL), LocalSlurm's reaper stops SLURM and a detached shell watchdog
deletes this run's namespaces, veth and hosts files; both only touch what this run id created.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .cluster import EmulatedCluster, can_emulate
from .iproute import ip
from .slurm import LocalSlurm, SlurmNode, SlurmUnavailable, _which, check_prerequisites

log = logging.getLogger(__name__)

NETNS_ETC = Path("/etc/netns")
MGMT_INTERFACE = "fcmgmt0"
CONTROLLER_HOST = 254  # last octet of slurmctld's address on the cluster subnet


def node_name(index: int) -> str:
    return f"node{index}"


def hosts_file(nodes: Sequence[tuple[str, str]], own: tuple[str, str] | None = None) -> str:
    """A node's /etc/hosts: every node's name at its cluster address, except ``own`` = (name, address)
    which overrides that node's line (the misleading hostname of a multi-homed node)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for name, addr in nodes:
        if own is not None and name == own[0]:
            addr = own[1]
        lines.append(f"{addr}\t{name}")
    return "\n".join(lines) + "\n"


def free_subnet(used_networks: Sequence[str], rng: random.Random) -> str:
    """A ``10.78.x`` /24 prefix none of ``used_networks`` (CIDR strings of this machine's routes) overlaps."""
    used = [ipaddress.ip_network(n, strict=False) for n in used_networks]
    candidates = list(range(1, 255))
    rng.shuffle(candidates)
    for x in candidates:
        net = ipaddress.ip_network(f"10.78.{x}.0/24")
        if not any(net.overlaps(u) for u in used if u.version == 4):
            return f"10.78.{x}"
    raise RuntimeError("no free 10.78.x.0/24 subnet on this machine")


def _root_routes() -> list[str]:
    out = ip("-4", "route", "show", "table", "all", check=False).stdout
    nets = []
    for line in out.splitlines():
        tok = line.split()
        if tok and tok[0] in ("local", "broadcast", "unicast") and len(tok) > 1:
            tok = tok[1:]
        if tok and tok[0] != "default":
            nets.append(tok[0] if "/" in tok[0] else f"{tok[0]}/32")
    return nets


def _reachable(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=0.5):
            return True
    except OSError:
        return False


# Detached watchdog: when the owner dies (or the marker goes, or the ttl passes) remove this run's namespaces,
# veth and hosts files. A shell loop: it must not depend on Python packages or on the owner's interpreter.
_WATCHDOG = r"""
owner=$1; marker=$2; ttl=$3; veth=$4; shift 4
end=$(( $(date +%s) + ttl ))
while [ -e "$marker" ] && kill -0 "$owner" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 1; done
[ -e "$marker" ] || exit 0
for ns in "$@"; do
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
done
sleep 0.5
for ns in "$@"; do ip netns del "$ns" 2>/dev/null; rm -rf "/etc/netns/$ns"; done
ip link del "$veth" 2>/dev/null
rm -f "$marker"
"""


class EmulatedSlurm(LocalSlurm):
    """``nodes`` SLURM nodes (2-8), each a namespace of an :class:`EmulatedCluster` with links shaped to ``rate``.

    Args:
        nodes: number of nodes (``node0`` ... ``node<N-1>``); CPUs and memory of each are this machine's.
        rate: per-link rate (``"1gbit"``, ``None`` unshaped), as for :class:`EmulatedCluster`.
        misleading_hostnames: indices of nodes whose own hostname resolves to a second interface.
        slurmd_timeout: seconds after which slurmctld declares a silent node DOWN and fails its jobs.
        run_id: the emulated cluster's run id (random by default): namespaces ``fcn-<run_id>-...``.
        Other keyword arguments go to :class:`LocalSlurm` (state_dir, start_timeout, ttl, owner_pid).

    Raises :class:`SlurmUnavailable` (with the reason) where SLURM or network namespaces cannot run.
    """

    def __init__(
        self,
        nodes: int = 2,
        rate: str | None = "1gbit",
        misleading_hostnames: Sequence[int] = (),
        run_id: str | None = None,
        slurmd_timeout: int = 20,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.slurmd_timeout = int(slurmd_timeout)
        if not 2 <= int(nodes) <= 8:
            raise ValueError(f"nodes={nodes}: an emulated SLURM has 2 to 8 nodes")
        bad = [i for i in misleading_hostnames if not 0 <= i < nodes]
        if bad:
            raise ValueError(f"misleading_hostnames={list(misleading_hostnames)}: nodes are 0..{nodes - 1}")
        self.num_nodes = int(nodes)
        self.rate = rate
        self.misleading_hostnames = tuple(misleading_hostnames)
        self.cluster: EmulatedCluster | None = None
        self._run_id = run_id
        self.subnet: str | None = None
        self.veth: str | None = None
        self._net_marker: Path | None = None
        self._watchdog: subprocess.Popen | None = None

    # ------------------------------------------------------------------------------------ topology
    @property
    def node_names(self) -> list[str]:
        return [node_name(i) for i in range(self.num_nodes)]

    def node_addr(self, index: int) -> str:
        assert self.cluster is not None
        return self.cluster.host_addr(index)

    def namespace(self, index: int) -> str:
        assert self.cluster is not None
        return self.cluster.host_namespaces[index]

    def mgmt_addr(self, index: int) -> str:
        return f"10.79.{index + 1}.{index + 1}"  # one /24 per node: nobody else is in it

    @property
    def controller_addr(self) -> str | None:  # type: ignore[override]
        return f"{self.subnet}.{CONTROLLER_HOST}" if self.subnet else None

    def slurm_nodes(self, hardware: str) -> list[SlurmNode]:
        return [SlurmNode(name, self.node_addr(i), hardware) for i, name in enumerate(self.node_names)]

    def link_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes through each node's cluster interface so far: {node name: {tx_bytes, rx_bytes, ...}}."""
        assert self.cluster is not None
        return {node_name(i): v for i, v in self.cluster.link_stats().items()}

    # ----------------------------------------------------------------------------------- lifecycle
    def up(self) -> EmulatedSlurm:
        reason = check_prerequisites()
        ok, why = can_emulate()
        if reason or not ok:
            raise SlurmUnavailable(reason or why)
        if shutil.which("unshare") is None:
            raise SlurmUnavailable("the emulated SLURM needs `unshare` (util-linux) for per-node hostnames")
        try:
            self._build_network()
        except BaseException:
            self._down_network()
            raise
        return super().up()  # on failure it calls self.down(), which removes the network too

    def _build_network(self) -> None:
        self.subnet = free_subnet(_root_routes(), random.Random())
        self.cluster = EmulatedCluster(hosts=self.num_nodes, rate=self.rate, subnet=self.subnet, run_id=self._run_id)
        rid = self.cluster.run_id
        self.veth = f"fcs{rid}"[:15]
        self._net_marker = Path(f"/tmp/firecaffe-slurmnet-{rid}")
        self._net_marker.write_text(str(os.getpid()))
        namespaces = [self.cluster.bridge_namespace, *self.cluster.host_namespaces]
        self._watchdog = subprocess.Popen(
            [
                "bash",
                "-c",
                _WATCHDOG,
                "watchdog",
                str(self.owner_pid or os.getpid()),
                str(self._net_marker),
                str(int(self.ttl or 86400)),
                self.veth,
                *namespaces,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.cluster.up()
        # slurmctld (root namespace) on the bridge: S.254
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "ctl", "netns", self.cluster.bridge_namespace)
        ip("-n", self.cluster.bridge_namespace, "link", "set", "ctl", "master", "br0")
        ip("-n", self.cluster.bridge_namespace, "link", "set", "ctl", "up")
        ip("link", "set", self.veth, "addrgenmode", "none")
        ip("addr", "add", f"{self.controller_addr}/24", "dev", self.veth)
        ip("link", "set", self.veth, "up")
        cluster_names = [(name, self.node_addr(i)) for i, name in enumerate(self.node_names)]
        for i, name in enumerate(self.node_names):
            own = None
            if i in self.misleading_hostnames:
                ns = self.namespace(i)
                # a veth pair inside the node (this kernel has no dummy interfaces): a network only it is in
                ip("-n", ns, "link", "add", MGMT_INTERFACE, "type", "veth", "peer", "name", MGMT_INTERFACE + "p")
                ip("-n", ns, "addr", "add", f"{self.mgmt_addr(i)}/24", "dev", MGMT_INTERFACE)
                ip("-n", ns, "link", "set", MGMT_INTERFACE + "p", "up")
                ip("-n", ns, "link", "set", MGMT_INTERFACE, "up")
                own = (name, self.mgmt_addr(i))
            etc = NETNS_ETC / self.namespace(i)
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file(cluster_names, own))

    def _start_slurmd(self, timeout: float, nodes: Sequence[int] | None = None) -> None:
        slurmd = _which("slurmd")
        nodes = range(self.num_nodes) if nodes is None else nodes
        for i in nodes:
            name = self.node_names[i]
            # ip netns exec: network + /etc/hosts of the node (in a private mount namespace whose fresh /sys has
            # no cgroup mounts: slurmd's cgroup/v1 plugin wants a tmpfs there with the named systemd hierarchy,
            # enough with proctrack/linuxproc); unshare --uts: its own hostname. All exec: the recorded pid is slurmd's.
            self._p("spool", "d", name).mkdir(parents=True, exist_ok=True)
            self._spawn(
                f"slurmd-{name}",
                [
                    "ip",
                    "netns",
                    "exec",
                    self.namespace(i),
                    "unshare",
                    "--uts",
                    "sh",
                    "-c",
                    "mount -t tmpfs cgroup_root /sys/fs/cgroup && mkdir /sys/fs/cgroup/systemd && "
                    "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd && "
                    'hostname "$0" && exec "$1" -D -N "$0"',
                    name,
                    slurmd,
                ],
            )
        for i in nodes:
            name = self.node_names[i]
            self._wait_for(
                f"slurmd-{name}",
                lambda i=i: _reachable(self.node_addr(i), self.ports["slurmd"]),
                timeout,
                self.slurmd_log(name),
            )

    def down(self, timeout: float = 30.0) -> None:
        try:
            super().down(timeout)
        finally:
            self._down_network()

    def _down_network(self) -> None:
        if self.cluster is not None:
            for ns in self.cluster.host_namespaces:
                shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
            try:
                self.cluster.down()  # kills what is left inside, deletes namespaces (the veth's peer with them)
            except RuntimeError as exc:  # pragma: no cover - reported, the watchdog retries at owner exit
                log.warning("emulated SLURM: %s", exc)
        if self.veth:
            ip("link", "del", self.veth, check=False)
        if self._net_marker is not None:
            self._net_marker.unlink(missing_ok=True)
        if self._watchdog is not None:
            deadline = time.monotonic() + 5
            while self._watchdog.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._watchdog.poll() is None:
                self._watchdog.kill()
                self._watchdog.wait(timeout=5)
            self._watchdog = None

    def restart_node(self, index: int, timeout: float = 60.0) -> None:
        """Start a killed node's slurmd again; it is back in the partition once slurmctld sees it (ReturnToService=2)."""
        old = self._procs.get(f"slurmd-{self.node_names[index]}")
        if old is not None:
            old.poll()  # reap the killed one
        self._start_slurmd(timeout, nodes=[index])
        name = self.node_names[index]

        def idle() -> bool:
            r = self.run("sinfo", "-h", "-n", name, "-o", "%t", timeout=10, check=False)
            return r.stdout.strip() == "idle"

        deadline = time.monotonic() + timeout
        while not idle():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not idle again within {timeout:.0f} s")
            time.sleep(0.5)

    def kill_node(self, index: int) -> list[int]:
        """A node dies: its slurmd and every process in its namespace are SIGKILLed. Returns their pids."""
        ns = self.namespace(index)
        out = ip("netns", "pids", ns, check=False, timeout_s=10).stdout
        pids = [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        return pids
