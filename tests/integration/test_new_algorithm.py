"""A new all-reduce algorithm is one decorated function: registered here, in this file alone, it is
simulated, priced, weighed by ``auto``, accepted by the strategy (object and registered name) and
measured by ``firecaffe-bench comm --algorithms all`` over real gloo ranks."""

import json

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import lightning_firecaffe  # noqa: F401  (registers the strategy names)
from lightning_firecaffe import FireCaffeStrategy, LinkModel
from lightning_firecaffe.bench.cli import main as bench_main
from lightning_firecaffe.comm.cost_model import parameter_server_time, rank_algorithms, schedule_time
from lightning_firecaffe.comm.schedules import (
    Transfer,
    algorithm_names,
    auto_candidates,
    build,
    get_algorithm,
    register_algorithm,
    unregister_algorithm,
    whole_buffer,
)
from lightning_firecaffe.comm.schedules.core import reversed_as_broadcast
from lightning_firecaffe.comm.simulator import simulate


def star(world_size, num_chunks=1, **_):
    """The parameter server rooted at the last rank: everyone sends to it in turn, it sends the sum back."""
    root = world_size - 1
    up = [Transfer(i, i, root, 0, num_chunks) for i in range(root)]
    return build("star", world_size, num_chunks, up + reversed_as_broadcast(up, first_round=len(up)))


@pytest.fixture
def registered_star():
    register_algorithm("star", chunking=whole_buffer, summary="everyone to the last rank and back", cost="2 (p-1) N/B")(
        star
    )
    yield get_algorithm("star")
    unregister_algorithm("star")
    assert "firecaffe_star" not in StrategyRegistry and "star" not in algorithm_names()


@pytest.mark.parametrize("world_size", range(1, 10))
def test_it_is_simulated_exactly(registered_star, world_size):
    gen = torch.Generator().manual_seed(world_size)
    buffers = [torch.randint(-100, 100, (37,), generator=gen).double() for _ in range(world_size)]
    schedule = registered_star.schedule(world_size)
    for result in simulate(schedule, buffers):
        assert torch.equal(result, torch.stack(buffers).sum(0))


def test_it_is_priced_considered_by_auto_and_accepted_by_the_strategy(registered_star):
    link = LinkModel(latency_s=1e-5, bandwidth_Bps=1e9)
    nbytes, p = 4_000_000, 5
    expected = parameter_server_time(p - 1, nbytes, link)  # the same load on the root's link
    assert schedule_time(registered_star.schedule(p), nbytes, link) == pytest.approx(expected, rel=1e-12)
    assert "star" in algorithm_names() and "star" in auto_candidates(p)
    assert dict(rank_algorithms(nbytes, p, link))["star"] == pytest.approx(expected, rel=1e-12)
    assert FireCaffeStrategy(algorithm="star").algorithm == "star"
    assert StrategyRegistry.get("firecaffe_star").algorithm == "star"


@pytest.mark.timeout(120)
def test_the_comm_benchmark_measures_it(registered_star, tmp_path, capsys):
    """Ranks are forked, so they inherit the registration; the benchmark checks every sum it computes."""
    argv = [
        "comm",
        "--algorithms",
        "all",
        "--world-sizes",
        "3",
        "--sizes",
        "1KB",
        "--reps",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert bench_main(argv) == 0
    rows = json.loads((tmp_path / "comm.json").read_text())["reports"][0]["results"]
    assert "star" in {r["algorithm"] for r in rows}
    assert " star " in capsys.readouterr().out
