"""Which network interface gloo binds to on a node with several of them.

Without ``GLOO_SOCKET_IFNAME`` gloo binds to the address the machine's *hostname* resolves to. On a cluster
node with several interfaces that is a classic failure: ``/etc/hosts`` maps the hostname to ``127.0.1.1``,
a management network or a container bridge, the other nodes cannot reach that address and the job hangs in
its first collective. This module picks the interface that routes to ``MASTER_ADDR`` instead (the path
every node must share with the master anyway), and checks an explicit ``GLOO_SOCKET_IFNAME`` against the
interfaces that exist, so a typo fails at once with their names instead of deep inside gloo.

The choice itself (:func:`choose_interface`, :func:`check_interface_names`) is pure; :func:`configure_gloo_interface`
does the I/O (listing interfaces, resolving ``MASTER_ADDR``, asking the kernel for its route) and sets the
variable for this process before the process group is created. What it sets is scoped: the returned
:class:`GlooInterface` puts the environment back as it was (the strategy calls it at teardown), so neither the
user's process nor a second Trainer in it inherits the choice.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_VAR = "GLOO_SOCKET_IFNAME"


class NetworkInterfaceError(ValueError):
    """A named interface does not exist, or no interface reaches the master; the message lists what exists."""


@dataclass(frozen=True)
class Interface:
    """One IPv4 address of a network interface (an interface with two addresses appears twice)."""

    name: str
    address: str
    netmask: str

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.address}/{self.netmask}", strict=False)

    def __str__(self) -> str:
        return f"{self.name} ({self.address}/{self.network.prefixlen})"


def describe(interfaces: Sequence[Interface]) -> str:
    """``lo (127.0.0.1/8), eth0 (10.0.0.2/24)``, or a note that there are none."""
    return ", ".join(str(i) for i in interfaces) or "no interface with an IPv4 address"


def check_interface_names(value: str, interfaces: Sequence[Interface], node: str = "this node") -> list[str]:
    """The names in an explicit ``GLOO_SOCKET_IFNAME`` (gloo accepts a comma-separated list); raises
    :class:`NetworkInterfaceError` naming the missing ones and the interfaces that exist."""
    names = [n.strip() for n in value.split(",")]
    existing = {i.name for i in interfaces}
    missing = [n for n in names if n not in existing]
    if not names or missing:
        raise NetworkInterfaceError(
            f"{ENV_VAR}={value!r}: no network interface {', '.join(repr(n) for n in missing) or '(empty)'} on "
            f"{node}; interfaces there: {describe(interfaces)}. Unset {ENV_VAR} to let FireCaffe pick the one "
            "that routes to MASTER_ADDR, or name one of these."
        )
    return names


def choose_interface(
    interfaces: Sequence[Interface], master_ip: str, route_source: str | None = None, node: str = "this node"
) -> Interface:
    """The interface this node should use to talk to the master at ``master_ip``.

    ``route_source`` is the source address the kernel would use for ``master_ip`` (its routing decision,
    default routes included); the interface holding it wins. Without it (or when no interface holds it),
    the interface whose network contains ``master_ip`` wins, the most specific network first; on the master
    itself that is the interface holding ``master_ip``. Raises :class:`NetworkInterfaceError` when none does.
    """
    master = ipaddress.IPv4Address(master_ip)
    if route_source is not None:
        for itf in interfaces:
            if itf.address == route_source:
                return itf
    holding = [i for i in interfaces if i.network.network_address <= master <= i.network.broadcast_address]
    if holding:
        return max(holding, key=lambda i: (i.network.prefixlen, i.address == master_ip))
    raise NetworkInterfaceError(
        f"no network interface on {node} reaches MASTER_ADDR {master_ip} (no route, no interface in its "
        f"network); interfaces there: {describe(interfaces)}. Set {ENV_VAR} to the interface of the cluster network."
    )


@dataclass
class GlooInterface:
    """The interface gloo uses, and the undo of setting it (call :meth:`restore`, or use it as a context)."""

    name: str
    chosen: bool  # True: FireCaffe set the variable; False: the user's own value, checked and left alone
    environ: MutableMapping[str, str]

    def restore(self) -> None:
        """Unset the variable if FireCaffe set it and it still holds that choice; idempotent."""
        if self.chosen and self.environ.get(ENV_VAR) == self.name:
            del self.environ[ENV_VAR]
        self.chosen = False

    def __enter__(self) -> GlooInterface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ------------------------------------------------------------------------------------------------ I/O
_SIOCGIFADDR, _SIOCGIFNETMASK = 0x8915, 0x891B


def _ioctl_ipv4(sock: socket.socket, request: int, name: str) -> str | None:
    try:
        packed = fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))
    except OSError:  # no IPv4 address on this interface
        return None
    return socket.inet_ntoa(packed[20:24])


def list_interfaces() -> list[Interface]:
    """This network namespace's interfaces that have an IPv4 address (their primary one)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            address = _ioctl_ipv4(sock, _SIOCGIFADDR, name)
            netmask = _ioctl_ipv4(sock, _SIOCGIFNETMASK, name)
            if address and netmask:
                found.append(Interface(name, address, netmask))
    return found


def route_source(destination_ip: str) -> str | None:
    """The source address the kernel picks for ``destination_ip`` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((destination_ip, 9))
            return sock.getsockname()[0]
    except OSError:
        return None


def resolve_ipv4(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (socket.gaierror, IndexError) as exc:
        raise NetworkInterfaceError(
            f"MASTER_ADDR {host!r} does not resolve to an IPv4 address on this node: {exc}"
        ) from None


def configure_gloo_interface(
    master_addr: str, environ: MutableMapping[str, str] = os.environ, announce: bool = True
) -> GlooInterface:
    """Check or set ``GLOO_SOCKET_IFNAME`` for this process; returns the choice and its undo.

    Set: every name must exist here (:class:`NetworkInterfaceError` otherwise) and the value stays as it is.
    Unset: the interface that routes to ``master_addr`` is chosen, set, and logged when ``announce`` (once
    per node is enough); :meth:`GlooInterface.restore` unsets it again.
    """
    node = socket.gethostname()
    interfaces = list_interfaces()
    explicit = environ.get(ENV_VAR)
    if explicit is not None:
        check_interface_names(explicit, interfaces, node)
        return GlooInterface(explicit, chosen=False, environ=environ)
    master_ip = resolve_ipv4(master_addr)
    chosen = choose_interface(interfaces, master_ip, route_source(master_ip), node)
    environ[ENV_VAR] = chosen.name
    if announce:
        log.info(
            "FireCaffe: gloo uses interface %s on %s: it routes to MASTER_ADDR %s (%s); interfaces: %s. "
            "Set %s to choose another.",
            chosen,
            node,
            master_addr,
            master_ip,
            describe(interfaces),
            ENV_VAR,
        )
    return GlooInterface(chosen.name, chosen=True, environ=environ)


def needs_gloo_interface(backend: str, world_size: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Only gloo across processes cares; an explicit value is checked whatever the world size."""
    return "gloo" in backend and (world_size > 1 or ENV_VAR in environ)
