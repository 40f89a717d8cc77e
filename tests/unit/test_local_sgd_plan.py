"""Local SGD's pure parts: when it averages, the anchor-delta average (ranks simulated in process), the
algorithm it averages with, and the options it refuses."""

import pytest
import torch

from lightning_firecaffe import FireCaffeStrategy, InvalidOption
from lightning_firecaffe.comm.averaging import (
    AveragingPlan,
    ParameterAverager,
    averaging_algorithm,
    flatten,
    node_groups,
    unflatten_into,
)
from lightning_firecaffe.comm.cost_model import LinkModel
from lightning_firecaffe.comm.hook import ScheduleSelector
from lightning_firecaffe.comm.schedules import get_algorithm, register_algorithm, unregister_algorithm, whole_buffer
from lightning_firecaffe.comm.schedules.baselines import ring
from lightning_firecaffe.comm.telemetry import AveragingTotals, CommStats


def test_the_plan_counts_optimizer_steps_from_the_start_step():
    plan = AveragingPlan(period=3, start=2)
    assert [s for s in range(12) if plan.local(s)] == list(range(2, 12))
    assert [s for s in range(12) if plan.averages_after(s)] == [4, 7, 10]
    assert [s for s in range(5) if AveragingPlan(1, 1).averages_after(s)] == [1, 2, 3, 4]


def test_node_groups_follow_lightnings_rank_numbering():
    assert node_groups(4, 1) == []
    assert node_groups(4, 2) == [[0, 1], [2, 3]]
    assert node_groups(6, 3) == [[0, 1, 2], [3, 4, 5]]


def test_flatten_and_unflatten_are_inverse():
    params = [torch.randn(3, 2), torch.randn(5)]
    flat = flatten(params)
    assert flat.shape == (11,)
    target = [torch.zeros(3, 2), torch.zeros(5)]
    unflatten_into(flat, target)
    assert all(torch.equal(a, b) for a, b in zip(params, target, strict=True))


def test_an_average_is_the_anchor_plus_the_mean_delta_and_the_same_bits_everywhere():
    """Three replicas in one process; ``reduce`` is a sum over them (as every registered algorithm leaves
    the same bits on every rank). The anchor moves to the average; a second average starts from it."""
    torch.manual_seed(0)
    start = torch.randn(10)
    replicas = [[start.clone()] for _ in range(3)]
    averagers = [ParameterAverager(r, world_size=3) for r in replicas]
    for a in averagers:
        a.capture()
    for r, params in enumerate(replicas):
        params[0].add_(torch.randn(10, generator=torch.Generator().manual_seed(r)))
    deltas = [flatten(a.params).sub(a.anchor).div(3) for a in averagers]
    total = sum(deltas)
    sent = []  # what each replica hands the all-reduce: its own mean delta
    for a in averagers:
        a.average(lambda flat: (sent.append(flat.clone()), flat.copy_(total)))
    assert all(torch.equal(s, d) for s, d in zip(sent, deltas, strict=True))
    assert all(torch.equal(replicas[0][0], r[0]) for r in replicas[1:])
    assert torch.equal(replicas[0][0], start + total)
    assert all(torch.equal(a.anchor, replicas[0][0]) and a.averages == 1 for a in averagers)
    state = averagers[1].state_dict()
    fresh = ParameterAverager([torch.zeros(10)], world_size=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.anchor, averagers[1].anchor) and fresh.averages == 1
    other = ParameterAverager([torch.zeros(10)], world_size=2)
    other.load_state_dict(state)
    assert other.anchor is None, "another world size: captured afresh"


def _selector(algorithm: str, world_size: int = 8) -> ScheduleSelector:
    return ScheduleSelector(algorithm, world_size, link=LinkModel())


@pytest.fixture
def differing_algorithm():
    register_algorithm("unequal", chunking=whole_buffer, summary="ends with different bits", identical_results=False,
                       order=0)(ring)  # fmt: skip
    yield "unequal"
    unregister_algorithm("unequal")


def test_an_algorithm_that_cannot_average_is_refused_and_auto_never_averages_with_it(differing_algorithm):
    assert get_algorithm("tree").identical_results and not get_algorithm(differing_algorithm).identical_results
    with pytest.raises(InvalidOption) as err:
        FireCaffeStrategy(algorithm=differing_algorithm, model_averaging_period=4)
    assert err.value.option == "algorithm" and "cannot average parameters" in str(err.value)
    FireCaffeStrategy(algorithm=differing_algorithm)  # fine without local SGD
    for nbytes in (1 << 10, 1 << 20, 1 << 26):
        assert get_algorithm(averaging_algorithm(_selector("auto"), nbytes)).identical_results
    assert averaging_algorithm(_selector("double_tree"), 1 << 20) == "double_tree", "a pinned algorithm as is"


def test_the_summary_says_how_many_averages_ran_and_what_they_cost():
    stats = CommStats()
    stats.averaging = AveragingTotals(period=8, start=8, wire="bf16")
    stats.bucket_ready(True)
    stats.bucket_done(1000, 1000, 0.01, True)
    stats.average_done(2_000_000, "tree", 4_000_000, 4_000_000, 0.02)
    stats.average_done(2_000_000, "tree", 4_000_000, 4_000_000, 0.04)
    text = stats.summary("auto")
    assert "Local SGD (average every 8 steps from step 8, bf16 on the wire): 2 parameter average(s)" in text
    assert "2.00 MB -> tree" in text and "each 4.00 MB sent" in text and "30.0 ms" in text
