"""Choosing gloo's interface: the one that routes to MASTER_ADDR; a wrong GLOO_SOCKET_IFNAME fails with the
interfaces that exist. Pure logic, plus the I/O wrapper on this machine's own interfaces (lo always exists)."""

import logging
import os

import pytest

from lightning_firecaffe.network import (
    Interface,
    NetworkInterfaceError,
    check_interface_names,
    choose_interface,
    configure_gloo_interface,
    list_interfaces,
    needs_gloo_interface,
)

LO = Interface("lo", "127.0.0.1", "255.0.0.0")
MGMT = Interface("eth0", "192.168.5.7", "255.255.255.0")  # where the hostname resolves: not the cluster link
CLUSTER = Interface("ib0", "10.77.0.2", "255.255.255.0")
WIDE = Interface("bond0", "10.0.0.9", "255.0.0.0")  # a wider network that also contains 10.77.0.1
NODE = [LO, MGMT, CLUSTER]


def test_the_interface_in_the_masters_network_wins_over_the_hostnames():
    assert choose_interface(NODE, "10.77.0.1") == CLUSTER
    assert choose_interface([LO, WIDE, MGMT, CLUSTER], "10.77.0.1") == CLUSTER  # most specific network
    assert choose_interface(NODE, "192.168.5.1") == MGMT


def test_the_kernels_route_wins_when_known():
    # the master is behind a gateway: only the kernel's routing decision (its source address) tells
    assert choose_interface(NODE, "172.16.3.4", route_source="10.77.0.2") == CLUSTER
    # a source address no listed interface holds: fall back to the networks
    assert choose_interface(NODE, "10.77.0.1", route_source="10.9.9.9") == CLUSTER


def test_on_the_master_itself_and_on_one_node():
    assert choose_interface(NODE, "10.77.0.2") == CLUSTER
    assert choose_interface(NODE, "127.0.0.1") == LO


def test_no_interface_reaches_the_master():
    with pytest.raises(NetworkInterfaceError) as info:
        choose_interface(NODE, "172.16.3.4", node="node1")
    msg = str(info.value)
    assert "172.16.3.4" in msg and "node1" in msg
    assert "lo (127.0.0.1/8), eth0 (192.168.5.7/24), ib0 (10.77.0.2/24)" in msg
    assert "GLOO_SOCKET_IFNAME" in msg


def test_an_explicit_interface_must_exist():
    assert check_interface_names("ib0", NODE) == ["ib0"]
    assert check_interface_names("ib0,ib0", NODE) == ["ib0", "ib0"]  # gloo's several-contexts form
    with pytest.raises(NetworkInterfaceError) as info:
        check_interface_names("doesnotexist", NODE, node="node1")
    msg = str(info.value)
    assert "GLOO_SOCKET_IFNAME='doesnotexist'" in msg and "'doesnotexist'" in msg and "node1" in msg
    assert "lo (127.0.0.1/8), eth0 (192.168.5.7/24), ib0 (10.77.0.2/24)" in msg
    with pytest.raises(NetworkInterfaceError, match="'eth9'"):
        check_interface_names("ib0,eth9", NODE)


def test_only_gloo_across_processes_needs_it():
    assert needs_gloo_interface("gloo", 4, {})
    assert needs_gloo_interface("cuda:nccl,cpu:gloo", 2, {})
    assert not needs_gloo_interface("gloo", 1, {})
    assert needs_gloo_interface("gloo", 1, {"GLOO_SOCKET_IFNAME": "x"})  # a typo fails even on one process
    assert not needs_gloo_interface("nccl", 8, {})


# --- the I/O wrapper on this machine ----------------------------------------------------------------------


def test_lists_this_machines_loopback():
    assert any(i.name == "lo" and i.address.startswith("127.") for i in list_interfaces())


def test_configure_sets_the_loopback_for_a_local_master_and_says_so(caplog):
    env = {}
    with caplog.at_level(logging.INFO, logger="lightning_firecaffe.network"):
        assert configure_gloo_interface("127.0.0.1", environ=env).name == "lo"
    assert env == {"GLOO_SOCKET_IFNAME": "lo"}
    assert [r.getMessage() for r in caplog.records if "gloo uses interface lo" in r.getMessage()]


def test_configure_keeps_a_valid_explicit_value_and_rejects_a_wrong_one():
    assert configure_gloo_interface("127.0.0.1", environ={"GLOO_SOCKET_IFNAME": "lo"}).name == "lo"
    with pytest.raises(NetworkInterfaceError, match=r"GLOO_SOCKET_IFNAME='doesnotexist'.*lo \(127\.0\.0\.1/8\)"):
        configure_gloo_interface("127.0.0.1", environ={"GLOO_SOCKET_IFNAME": "doesnotexist"})


def test_restore_puts_the_environment_back_as_it_was():
    env = {"PATH": "/bin"}
    interface = configure_gloo_interface("127.0.0.1", environ=env, announce=False)
    assert env == {"PATH": "/bin", "GLOO_SOCKET_IFNAME": "lo"}
    interface.restore()
    assert env == {"PATH": "/bin"}
    interface.restore()  # twice (teardown after a failed setup) is harmless
    assert env == {"PATH": "/bin"}


def test_restore_leaves_the_users_own_value_alone():
    env = {"GLOO_SOCKET_IFNAME": "lo"}
    with configure_gloo_interface("127.0.0.1", environ=env, announce=False) as interface:
        assert interface.name == "lo" and not interface.chosen
    assert env == {"GLOO_SOCKET_IFNAME": "lo"}


def test_restore_leaves_a_value_someone_set_since_alone():
    env = {}
    with configure_gloo_interface("127.0.0.1", environ=env, announce=False):
        env["GLOO_SOCKET_IFNAME"] = "lo,lo"  # changed by someone else meanwhile: theirs now
    assert env == {"GLOO_SOCKET_IFNAME": "lo,lo"}


def test_restore_on_the_real_environment(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    before = dict(os.environ)
    interface = configure_gloo_interface("127.0.0.1", announce=False)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    interface.restore()
    assert dict(os.environ) == before


def test_an_unresolvable_master_is_named():
    with pytest.raises(NetworkInterfaceError, match="no-such-host.invalid"):
        configure_gloo_interface("no-such-host.invalid", environ={})
