"""The executor on real gloo ranks (fork start): every algorithm equals dist.all_reduce; a dead peer is named."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from lightning_firecaffe.comm.executor import ScheduleExecutor
from lightning_firecaffe.comm.schedules import Op, algorithm_names, chunk_offsets, schedule_for_bytes
from lightning_firecaffe.errors import PeerStallError
from lightning_firecaffe.testing.ranks import run_ranks

pytestmark = pytest.mark.timeout(120)


def _compare_with_all_reduce(rank, world_size, chunk_bytes, lockstep=False):
    executor = ScheduleExecutor(rank, world_size, group=dist.group.WORLD, stall_timeout=20, lockstep=lockstep)
    report = {}
    for algorithm in algorithm_names():
        for length in (0, 1, 997, 5000):
            gen = torch.Generator().manual_seed(1000 * rank + length)
            ints = torch.randint(-5000, 5000, (length,), generator=gen).float()
            rand = torch.randn(length, generator=gen)
            for name, data in (("int", ints), ("rand", rand)):
                expected = data.clone()
                dist.all_reduce(expected)
                mine = data.clone()
                schedule = schedule_for_bytes(
                    algorithm, mine.numel() * 4, world_size, chunk_bytes=chunk_bytes, ranks_per_node=2
                )
                executor.all_reduce_(mine, schedule, bucket=length, step=1)
                if name == "int":
                    ok = torch.equal(mine, expected)
                else:
                    ok = torch.allclose(
                        mine, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max() if length else 1)
                    )
                report[(algorithm, length, name)] = ok
    return report, executor.counters.bytes_sent, executor.scratch_bytes


@pytest.mark.parametrize(
    "world_size, lockstep",
    [(2, False), (3, False), (4, False), (5, False), (3, True), (4, True)],
    ids=["2", "3", "4", "5", "3-lockstep", "4-lockstep"],
)
def test_every_algorithm_equals_dist_all_reduce(world_size, lockstep):
    """Dataflow (gloo) and lock-step rounds of batch_isend_irecv (the NCCL path, run here on gloo)."""
    results = run_ranks(_compare_with_all_reduce, world_size, 1024, lockstep, timeout=100)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank}: {status} {value}"
        report, sent, scratch = value
        bad = [key for key, ok in report.items() if not ok]
        assert not bad, f"rank {rank} differs from dist.all_reduce for {bad}"
        assert sent > 0
        assert scratch <= 2 * 5000 * 4, "scratch: one buffer, plus one more round while overlapping"


def _die_or_wait(rank, world_size):
    executor = ScheduleExecutor(rank, world_size, group=dist.group.WORLD, stall_timeout=5)
    buf = torch.ones(1000)
    schedule = schedule_for_bytes("tree", 4000, world_size, chunk_bytes=1 << 20)
    executor.all_reduce_(buf, schedule, bucket=0, step=0)  # everyone alive: works
    if rank == world_size - 1:
        os._exit(3)  # dies without a word
    started = time.monotonic()
    try:
        executor.all_reduce_(buf, schedule, bucket=2, step=7)
    except PeerStallError as exc:
        return str(exc), exc.peers, time.monotonic() - started
    return "no error", [], time.monotonic() - started


def test_dead_peer_is_named_within_the_stall_timeout():
    results = run_ranks(_die_or_wait, 2, timeout=60)
    status, value = results[0]
    assert status == "ok", value
    message, peers, seconds = value
    assert peers == [1]
    assert "rank 1 closed its connection" in message and "bucket 2" in message and "step 7" in message
    assert seconds < 5 + 3
    assert results[1] == ("died", 3)


def _silent_peer(rank, world_size):
    executor = ScheduleExecutor(rank, world_size, group=dist.group.WORLD, stall_timeout=2)
    buf = torch.ones(10)
    schedule = schedule_for_bytes("ring", 40, world_size, chunk_bytes=1 << 20)
    if rank == 1:
        time.sleep(6)  # alive but not answering
        return "slept"
    started = time.monotonic()
    try:
        executor.all_reduce_(buf, schedule, bucket=0, step=3)
    except PeerStallError as exc:
        return str(exc), exc.peers, time.monotonic() - started
    return "no error", [], 0


def test_stuck_peer_times_out_with_its_rank():
    results = run_ranks(_silent_peer, 3, timeout=60)
    for rank in (0, 2):
        status, value = results[rank]
        assert status == "ok", value
        message, peers, seconds = value
        # the ring runs both ways, so at 3 ranks each survivor receives from rank 1 in round 0 and must name
        # it; the other survivor may be named too, because it is stuck behind rank 1 as well
        assert 1 in peers and rank not in peers, message
        assert "did not answer within 2 s" in message
        assert seconds < 2 * 3, "stall reported too late"


def _largest_round_receive(schedule, rank, numel):
    """Bytes this rank receives in its busiest round (from the schedule alone, not the executor)."""
    offsets = chunk_offsets(numel, schedule.num_chunks)
    return 4 * max(
        (
            sum(offsets[m.hi] - offsets[m.lo] for m in messages if m.op is not Op.SEND)
            for messages in schedule.messages_of(rank)
        ),
        default=0,
    )


def _peak_scratch(rank, world_size):
    peaks = {}
    numel, chunk_bytes = 1_000_000, 256 * 1024  # a 4 MB bucket
    for algorithm in algorithm_names():
        executor = ScheduleExecutor(rank, world_size, group=dist.group.WORLD, stall_timeout=20)
        buf = torch.ones(numel)
        schedule = schedule_for_bytes(algorithm, numel * 4, world_size, chunk_bytes=chunk_bytes, ranks_per_node=2)
        for step in range(3):  # reused across steps, not grown
            executor.all_reduce_(buf, schedule, bucket=0, step=step)
        peaks[algorithm] = (executor.scratch_bytes, _largest_round_receive(schedule, rank, numel))
    return peaks


def test_extra_memory_is_one_bucket_or_two_rounds():
    """The executor's documented bound: one bucket-sized receive buffer for whole-bucket rounds, or two of
    at most ``overlap_bytes`` for small rounds that overlap; and never more than two rounds' receives."""
    results = run_ranks(_peak_scratch, 4, timeout=100)
    bucket, overlap = 4_000_000, ScheduleExecutor(0, 1).overlap_bytes
    for rank, (status, peaks) in results.items():
        assert status == "ok", peaks
        for algorithm, (scratch, largest_round) in peaks.items():
            assert scratch <= max(bucket, 2 * overlap), (rank, algorithm, scratch)
            assert scratch <= 2 * largest_round, (rank, algorithm, scratch, largest_round)


def _measure(rank, world_size):
    from lightning_firecaffe.comm.calibration import measure_link

    return measure_link(rank, world_size, ranks_per_node=1)


def test_measured_link_is_the_same_on_every_rank_and_plausible():
    results = run_ranks(_measure, 3, timeout=60)
    links = [value for status, value in results.values() if status == "ok"]
    assert len(links) == 3 and links[0] == links[1] == links[2]
    assert 0 < links[0].latency_s < 0.5 and links[0].bandwidth_Bps > 1e7  # loopback: well above 10 MB/s
