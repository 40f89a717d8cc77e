"""Every schedule, simulated in one process, leaves the exact sum on every rank; pricing matches closed forms."""

import math

import pytest
import torch

from lightning_firecaffe.comm.cost_model import LinkModel, parameter_server_time, ring_time, schedule_time, tree_time
from lightning_firecaffe.comm.schedules import (
    Op,
    ScheduleError,
    algorithms,
    get_algorithm,
    schedule_for_bytes,
    validate,
)
from lightning_firecaffe.comm.schedules.core import Transfer, build
from lightning_firecaffe.comm.schedules.trees import double_tree
from lightning_firecaffe.comm.simulator import simulate

LENGTHS = [0, 1, 13, 100]  # empty, single element, a prime, not divisible by the chunk counts below


def integer_buffers(world_size: int, length: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(world_size * 1000 + length)
    return [torch.randint(-1000, 1000, (length,), generator=gen).double() for _ in range(world_size)]


def assert_all_reduced(schedule, length):
    buffers = integer_buffers(schedule.world_size, length)
    expected = torch.stack(buffers).sum(0) if buffers else None
    for rank, result in enumerate(simulate(schedule, buffers)):
        assert torch.equal(result, expected), f"{schedule.algorithm} p={schedule.world_size} rank {rank}"


def build_schedule(algorithm: str, world_size: int, num_chunks: int = 1, arity: int = 2, ranks_per_node: int = 1):
    return get_algorithm(algorithm).schedule(world_size, num_chunks, arity, ranks_per_node)


def layouts():
    """(algorithm, arity, ranks per node) for every registered algorithm, over the knobs it declares it uses."""
    for a in algorithms():
        for arity in (2, 3, 4) if a.uses_arity else (2,):
            for ranks_per_node in (1, 2, 3, 4) if a.uses_ranks_per_node else (1,):
                yield pytest.param(a.name, arity, ranks_per_node, id=f"{a.name}-k{arity}-n{ranks_per_node}")


@pytest.mark.parametrize("algorithm,arity,ranks_per_node", list(layouts()))
@pytest.mark.parametrize("world_size", range(1, 34))
def test_every_rank_ends_with_the_exact_sum(algorithm, arity, ranks_per_node, world_size):
    """Chunk counts come from the algorithm's own chunking rule (1, 3 or 4 pieces of a 400-byte buffer)."""
    for chunk_bytes in (1000, 134, 100):
        schedule = schedule_for_bytes(
            algorithm, 400, world_size, chunk_bytes=chunk_bytes, arity=arity, ranks_per_node=ranks_per_node
        )
        for length in LENGTHS:
            assert_all_reduced(schedule, length)


def test_double_tree_ranks_are_interior_in_at_most_one_tree():
    for p in range(2, 40):
        schedule = double_tree(p, num_chunks=2)
        half = 1  # chunk 0 travels tree A, chunk 1 tree B
        for rank in range(p):
            interior = set()
            for messages in schedule.messages_of(rank):
                for message in messages:
                    # an interior node receives reductions from children
                    if message.op is Op.RECV_ADD:
                        interior.add("A" if message.lo < half else "B")
            assert len(interior) <= 1, f"rank {rank} of {p} is interior in both trees"


def test_pipelined_tree_overlaps_levels():
    """With many chunks the pipelined tree needs far fewer rounds than chunks x levels."""
    schedule = build_schedule("pipelined_tree", 8, 20)
    depth = math.ceil(math.log2(8))
    assert schedule.num_rounds <= 20 + 2 * depth


LINK = LinkModel(latency_s=0.0, bandwidth_Bps=1e9)


@pytest.mark.parametrize("world_size", [2, 3, 4, 5, 8, 9, 16, 33])
def test_tree_cost_equals_closed_form(world_size):
    nbytes = 4 * 1_000_000
    schedule = build_schedule("tree", world_size, 1)
    expected = 2 * math.ceil(math.log2(world_size)) * nbytes / LINK.bandwidth_Bps
    assert schedule_time(schedule, nbytes, LINK) == pytest.approx(expected, rel=1e-12)
    assert tree_time(world_size, nbytes, LINK) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 15, 32])
def test_parameter_server_cost_equals_closed_form(workers):
    """World size p + 1: rank 0 serves p workers, so its link carries 2pN bytes (the paper's 2pN/B)."""
    nbytes = 4 * 1_000_000
    schedule = build_schedule("parameter_server", workers + 1, 1)
    expected = 2 * workers * nbytes / LINK.bandwidth_Bps
    assert schedule_time(schedule, nbytes, LINK) == pytest.approx(expected, rel=1e-12)
    assert parameter_server_time(workers, nbytes, LINK) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("world_size", [2, 4, 5, 8])
def test_ring_cost_equals_closed_form_with_latency(world_size):
    link = LinkModel(latency_s=1e-4, bandwidth_Bps=1e9)
    nbytes = 4 * world_size * 10_000
    schedule = build_schedule("ring", world_size, world_size)
    assert schedule_time(schedule, nbytes, link) == pytest.approx(ring_time(world_size, nbytes, link), rel=1e-12)


def test_two_level_puts_one_buffer_per_node_on_the_network():
    """With 4 ranks per node, two_level beats a flat pipelined tree when the node link is the bottleneck."""
    link = LinkModel(latency_s=0, bandwidth_Bps=1e9, ranks_per_node=4, intra_latency_s=0, intra_bandwidth_Bps=1e11)
    nbytes = 4 * 1_000_000
    chunks = get_algorithm("pipelined_tree").num_chunks(nbytes, 16, 1 << 18)
    flat = schedule_time(build_schedule("pipelined_tree", 16, chunks), nbytes, link)
    hier = schedule_time(build_schedule("two_level", 16, chunks, 2, 4), nbytes, link)
    assert hier < 0.6 * flat


def test_build_and_validate_reject_malformed_schedules():
    with pytest.raises(ScheduleError, match="bad transfer"):
        build("self", 2, 1, [Transfer(0, 1, 1, 0, 1)])
    with pytest.raises(ScheduleError, match="bad chunk range"):
        build("range", 2, 1, [Transfer(0, 0, 1, 0, 2)])
    racing = build("race", 3, 1, [Transfer(0, 0, 2, 0, 1, False), Transfer(0, 1, 2, 0, 1, True)])
    with pytest.raises(ScheduleError, match="overwrites"):
        validate(racing)


def test_each_rank_sees_matching_messages():
    schedule = build_schedule("ring", 3, 3)
    per_rank = {r: list(enumerate(schedule.messages_of(r))) for r in range(3)}
    sends = sorted((r, m.peer, m.lo, rnd) for r in range(3) for rnd, ms in per_rank[r] for m in ms if m.op is Op.SEND)
    recvs = sorted(
        (m.peer, r, m.lo, rnd) for r in range(3) for rnd, ms in per_rank[r] for m in ms if m.op is not Op.SEND
    )
    assert sends == recvs and len(sends) == 2 * 2 * 3


def test_unknown_algorithm_names_the_choices():
    with pytest.raises(ValueError, match="ring"):
        build_schedule("butterfly", 4)


def test_chunking_rules():
    """What each built-in algorithm declares: whole buffers, chunk_bytes pieces, pairs, or 2 p k ring pieces."""
    mib = 1 << 20
    assert get_algorithm("tree").num_chunks(25 * mib, 8, mib) == 1
    assert get_algorithm("parameter_server").num_chunks(25 * mib, 8, mib) == 1
    assert get_algorithm("pipelined_tree").num_chunks(25 * mib, 8, mib) == 25
    assert get_algorithm("double_tree").num_chunks(25 * mib, 8, mib) == 26
    assert get_algorithm("ring").num_chunks(100 * mib, 4, mib) == 2 * 4 * 7  # 12.5 MiB segments, pieces <= 2 MiB
    assert get_algorithm("ring").num_chunks(1000, 4, mib) == 2 * 4 * 2  # at least two pieces per segment
