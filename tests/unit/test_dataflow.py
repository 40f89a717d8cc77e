"""The dataflow plan respects every data hazard: all ranks' events run in random orders the dependencies
allow (sends read at post *and* at completion, transfers happen at random moments), and every rank still
ends with the exact sum, without deadlock, for every registered algorithm."""

import random

import pytest
import torch

from lightning_firecaffe.comm.dataflow import plan_dataflow
from lightning_firecaffe.comm.schedules import (
    Op,
    ScheduleError,
    Transfer,
    algorithms,
    build,
    schedule_for_bytes,
    validate,
)
from lightning_firecaffe.comm.simulator import simulate


def run_in_random_order(schedule, buffers, seed):
    p, numel = schedule.world_size, buffers[0].numel()
    plans = [plan_dataflow(schedule, r, numel) for r in range(p)]
    state = [b.clone() for b in buffers]
    done = [set() for _ in range(p)]
    posted = [set() for _ in range(p)]
    arrived: dict[tuple[int, int], torch.Tensor] = {}  # (rank, receive event) -> payload in scratch
    sent_at_post: dict[tuple[int, int], torch.Tensor] = {}
    # match each send to its receive: a transfer is (round, src, dst, chunk lo, chunk hi)
    receive_of = {}
    for r, plan in enumerate(plans):
        for e in plan.events:
            if not e.is_send:
                receive_of[(e.round_index, e.message.peer, r, e.message.lo, e.message.hi)] = e.index
    rng = random.Random(seed)

    def ready(r, e):
        return all(a in done[r] for a in e.after)

    while any(len(done[r]) < len(plans[r].events) for r in range(p)):
        actions = []
        for r, plan in enumerate(plans):
            for e in plan.events:
                if e.index in done[r]:
                    continue
                gated_post = e.is_send or not e.scratch
                if gated_post and e.index not in posted[r] and ready(r, e):
                    actions.append(("post", r, e))
                if e.is_send and e.index in posted[r]:
                    dst = e.message.peer
                    j = receive_of[(e.round_index, r, dst, e.message.lo, e.message.hi)]
                    recv = plans[dst].events[j]
                    if (recv.scratch or j in posted[dst]) and (dst, j) not in arrived and j not in done[dst]:
                        actions.append(("transfer", r, e))
                if not e.is_send and e.scratch and (r, e.index) in arrived and ready(r, e):
                    actions.append(("apply", r, e))
        assert actions, f"{schedule.algorithm}: deadlock"
        kind, r, e = rng.choice(actions)
        if kind == "post":
            posted[r].add(e.index)
            if e.is_send:
                sent_at_post[(r, e.index)] = state[r][e.lo : e.hi].clone()
        elif kind == "transfer":
            payload = state[r][e.lo : e.hi].clone()
            assert torch.equal(payload, sent_at_post[(r, e.index)]), "a send's data changed while in flight"
            done[r].add(e.index)
            dst = e.message.peer
            j = receive_of[(e.round_index, r, dst, e.message.lo, e.message.hi)]
            recv = plans[dst].events[j]
            if recv.scratch:
                arrived[(dst, j)] = payload
            else:
                state[dst][recv.lo : recv.hi].copy_(payload)
                done[dst].add(j)
        else:
            payload = arrived.pop((r, e.index))
            view = state[r][e.lo : e.hi]
            view.add_(payload) if e.message.op is Op.RECV_ADD else view.copy_(payload)
            done[r].add(e.index)
    return state


def layouts():
    for a in algorithms():
        if a.collective:
            continue  # run by the backend's own all_reduce, not as dataflow
        for world_size in (2, 3, 4, 5, 8):
            ranks_per_node = 2 if a.uses_ranks_per_node else 1
            yield pytest.param(a.name, world_size, ranks_per_node, id=f"{a.name}-p{world_size}")


@pytest.mark.parametrize("algorithm,world_size,ranks_per_node", list(layouts()))
def test_random_valid_orders_give_the_exact_sum(algorithm, world_size, ranks_per_node):
    for numel, chunk_bytes in ((1, 4), (37, 4 * 5), (200, 4 * 16)):
        schedule = schedule_for_bytes(
            algorithm, numel * 4, world_size, chunk_bytes=chunk_bytes, ranks_per_node=ranks_per_node
        )
        gen = torch.Generator().manual_seed(world_size * 100 + numel)
        buffers = [torch.randint(-1000, 1000, (numel,), generator=gen).double() for _ in range(world_size)]
        expected = torch.stack(buffers).sum(0)
        for seed in range(3):
            for rank, result in enumerate(run_in_random_order(schedule, buffers, seed)):
                assert torch.equal(result, expected), f"rank {rank}, seed {seed}"


def test_sends_wait_only_for_the_data_they_carry():
    """The ring's first sends depend on nothing, and nothing waits for a whole round: in round r a send
    waits only for the receives that wrote its own chunks."""
    schedule = schedule_for_bytes("ring", 4 * 64, 4, chunk_bytes=4)
    plan = plan_dataflow(schedule, 0, 64)
    first_round = [e for e in plan.events if e.round_index == 0]
    assert first_round and all(not e.after for e in first_round if e.is_send)
    for e in plan.events:
        if e.is_send:
            for a in e.after:
                writer = plan.events[a]
                assert not writer.is_send and writer.lo < e.hi and e.lo < writer.hi


def random_schedules(count):
    """Arbitrary valid round programs (not all-reduces): hazards the built-in algorithms never exercise,
    e.g. a chunk overwritten by an unrelated rank right after this rank sent it."""
    rng = random.Random(7)
    made = 0
    while made < count:
        p, chunks = rng.randint(2, 4), rng.randint(1, 4)
        transfers = []
        for rnd in range(rng.randint(1, 5)):
            for _ in range(rng.randint(1, 4)):
                src, dst = rng.sample(range(p), 2)
                lo = rng.randrange(chunks)
                hi = rng.randint(lo + 1, chunks)
                if any(t[:4] == (rnd, src, dst, lo) for t in transfers):
                    continue  # one message per (round, pair, first chunk): that is its tag
                transfers.append(Transfer(rnd, src, dst, lo, hi, rng.random() < 0.5))
        schedule = build("random", p, chunks, transfers)
        try:
            validate(schedule)
        except ScheduleError:
            continue
        made += 1
        yield schedule


@pytest.mark.parametrize("schedule", list(random_schedules(150)), ids=lambda s: f"p{s.world_size}")
def test_random_programs_match_the_lock_step_simulator(schedule):
    gen = torch.Generator().manual_seed(schedule.world_size)
    buffers = [torch.randint(-1000, 1000, (11,), generator=gen).double() for _ in range(schedule.world_size)]
    expected = simulate(schedule, buffers)
    for seed in range(4):
        for rank, result in enumerate(run_in_random_order(schedule, buffers, seed)):
            assert torch.equal(result, expected[rank]), f"rank {rank}, seed {seed}"
