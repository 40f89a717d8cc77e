"""Pure pieces of the local SLURM harnesses and of preemption: slurm.conf for N nodes, per-node hosts files,
a free subnet, the requeue callback's options. Nothing is started."""

from pathlib import Path

import pytest

from lightning_firecaffe import InvalidOption
from lightning_firecaffe.preemption import RequeueOnSignal
from lightning_firecaffe.testing.slurm import SlurmNode, compose_slurm_conf
from lightning_firecaffe.testing.slurm_cluster import free_subnet, hosts_file

PORTS = {"slurmctld": 7001, "slurmd": 7002, "slurmdbd": 7003, "mariadb": 7004}
HW = "CPUs=2 RealMemory=1000"


def conf_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_one_node_conf_is_localhost():
    text = compose_slurm_conf(Path("/s"), PORTS, Path("/s/munge.sock"), [SlurmNode("localhost", "127.0.0.1", HW)])
    lines = conf_lines(text)
    assert "SlurmctldHost=localhost" in lines and not any(line.startswith("SlurmctldAddr") for line in lines)
    assert [line for line in lines if line.startswith("NodeName")] == [
        "NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN"
    ]
    assert "SlurmctldPort=7001" in lines and "SlurmdPort=7002" in lines and "AccountingStoragePort=7003" in lines
    assert "JobRequeue=0" in lines  # only jobs submitted with --requeue come back (a node failure fails the rest)


def test_several_nodes_keep_their_slurmd_files_apart():
    nodes = [SlurmNode(f"node{i}", f"10.78.5.{i + 1}", HW) for i in range(3)]
    lines = conf_lines(compose_slurm_conf(Path("/s"), PORTS, Path("/s/m"), nodes, controller_addr="10.78.5.254"))
    assert "SlurmctldAddr=10.78.5.254" in lines
    assert [line.split()[:2] for line in lines if line.startswith("NodeName")] == [
        ["NodeName=node0", "NodeAddr=10.78.5.1"],
        ["NodeName=node1", "NodeAddr=10.78.5.2"],
        ["NodeName=node2", "NodeAddr=10.78.5.3"],
    ]
    for key in ("SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile"):  # %n: one per node on one machine
        assert any(line.startswith(key + "=") and "%n" in line for line in lines), key
    assert "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" in lines


def test_bad_node_lists_are_refused():
    with pytest.raises(ValueError, match="at least one node"):
        compose_slurm_conf(Path("/s"), PORTS, Path("/m"), [])
    with pytest.raises(ValueError, match="unique"):
        compose_slurm_conf(Path("/s"), PORTS, Path("/m"), [SlurmNode("a", "1.1.1.1", HW)] * 2)


def test_hosts_file_names_every_node_and_a_misleading_own_line():
    nodes = [("node0", "10.78.5.1"), ("node1", "10.78.5.2")]
    assert "10.78.5.1\tnode0" in hosts_file(nodes) and "10.78.5.2\tnode1" in hosts_file(nodes)
    own = hosts_file(nodes, own=("node1", "10.79.2.2"))
    assert "10.79.2.2\tnode1" in own and "10.78.5.2\tnode1" not in own and "10.78.5.1\tnode0" in own
    assert own.startswith("127.0.0.1\tlocalhost")


def test_free_subnet_avoids_the_machines_networks():
    import random

    used = [f"10.78.{x}.0/24" for x in range(1, 255) if x != 42] + ["10.0.0.0/16"]
    assert free_subnet(used, random.Random(0)) == "10.78.42"
    with pytest.raises(RuntimeError, match="no free"):
        free_subnet(["10.78.0.0/16"], random.Random(0))


def test_requeue_callback_options():
    assert RequeueOnSignal().at == "step"
    with pytest.raises(InvalidOption, match="at"):
        RequeueOnSignal(at="minute")
    with pytest.raises(InvalidOption, match="signal_name"):
        RequeueOnSignal(signal_name="SIGFOO")


def test_random_states_survive_a_weights_only_checkpoint():
    """What the requeue checkpoint holds per rank loads under torch.load(weights_only=True) and replays."""
    import io
    import random

    import numpy as np
    import torch

    from lightning_firecaffe.preemption import rng_state, set_rng_state

    saved = rng_state()
    drawn = (torch.rand(3), random.random(), float(np.random.rand()))
    buffer = io.BytesIO()
    torch.save({"rng_states": [saved]}, buffer)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)["rng_states"][0])
    assert torch.equal(torch.rand(3), drawn[0]) and random.random() == drawn[1] and float(np.random.rand()) == drawn[2]
