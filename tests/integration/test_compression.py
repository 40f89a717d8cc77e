"""16-bit gradients on the wire, on real gloo ranks (fork start): every algorithm, bf16 and fp16.

The bound per algorithm (see lightning_firecaffe/comm/compression.py): a result whose path holds k
roundings to the wire format is within ((1+u)^k - 1) sum_i |x_i| (+ fp32 addition error) of the exact sum.
Every scheduled algorithm rounds k = p times on any element's path (p - 1 partial sums sent towards the
owner, then the owner's final value); `native` (gloo's own all-reduce of the 16-bit tensor, which rounds
after every addition) k = 2p - 1 (p inputs converted, p - 1 additions).
"""

import pytest
import torch
import torch.distributed as dist

from lightning_firecaffe.comm.compression import WIRE_FORMATS, rounding_bound
from lightning_firecaffe.comm.executor import ScheduleExecutor
from lightning_firecaffe.comm.schedules import algorithm_names, get_algorithm, schedule_for_bytes
from lightning_firecaffe.comm.simulator import simulate
from lightning_firecaffe.testing.ranks import run_ranks

pytestmark = pytest.mark.timeout(180)

LENGTH = 3001


def roundings_on_path(algorithm: str, world_size: int) -> int:
    """The number of roundings to the wire format on any element's path (the analytic bound's k)."""
    return 2 * world_size - 1 if get_algorithm(algorithm).collective else world_size


def inputs(world_size: int, seed: int) -> list[torch.Tensor]:
    """Every rank's gradient: signs and magnitudes spread over five decades, as real gradients are."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LENGTH, generator=g) * 10.0 ** torch.randint(-4, 1, (LENGTH,), generator=g)
            for _ in range(world_size)]  # fmt: skip


def _reduce_compressed(rank, world_size, batched):
    executor = ScheduleExecutor(rank, world_size, group=dist.group.WORLD, stall_timeout=30, batched=batched)
    out = {}
    for fmt in WIRE_FORMATS.values():
        for algorithm in algorithm_names():
            mine = inputs(world_size, seed=7)[rank].clone()
            schedule = schedule_for_bytes(algorithm, LENGTH * 2, world_size, chunk_bytes=512, ranks_per_node=2)
            sent = executor.counters.bytes_sent
            executor.all_reduce_(mine, schedule, bucket=3, step=1, wire=fmt.dtype)
            out[(fmt.name, algorithm)] = (mine.numpy(), executor.counters.bytes_sent - sent)
            plain = inputs(world_size, seed=7)[rank].clone()
            sent = executor.counters.bytes_sent
            executor.all_reduce_(plain, schedule, bucket=4, step=1)
            out[("fp32", algorithm)] = (plain.numpy(), executor.counters.bytes_sent - sent)
    return out  # numpy: tensors would travel as shared memory the exiting rank takes with it


@pytest.mark.parametrize("batched", [False, True], ids=["dataflow", "lockstep"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_algorithm_within_its_rounding_bound_and_bitwise_identical_on_every_rank(world_size, batched):
    results = run_ranks(_reduce_compressed, world_size, batched, timeout=150)
    assert all(status == "ok" for status, _ in results.values()), results
    xs = inputs(world_size, seed=7)
    exact = torch.stack([x.double() for x in xs]).sum(0)
    abs_sum = torch.stack([x.double().abs() for x in xs]).sum(0)
    for fmt in WIRE_FORMATS.values():
        for algorithm in algorithm_names():
            results_here = [torch.from_numpy(results[r][1][(fmt.name, algorithm)][0]) for r in range(world_size)]
            for r in range(1, world_size):
                assert torch.equal(results_here[r], results_here[0]), f"{fmt.name} {algorithm}: rank {r} differs"
            k = roundings_on_path(algorithm, world_size)
            bound = rounding_bound(fmt, k, abs_sum, additions=world_size)
            error = (results_here[0].double() - exact).abs()
            assert (error <= bound).all(), (
                f"{fmt.name} {algorithm}: error {float((error / bound).max()):.2f}x the bound for k={k}"
            )
            assert error.max() > 0, "no rounding at all: the values did not travel in 16 bits"
            if not get_algorithm(algorithm).collective:  # the executor follows the contract exactly
                simulated = simulate(schedule_for_bytes(algorithm, LENGTH * 2, world_size, chunk_bytes=512,
                                                        ranks_per_node=2), xs, wire=fmt.dtype)  # fmt: skip
                assert torch.equal(results_here[0], simulated[0]), f"{fmt.name} {algorithm} differs from the simulator"


@pytest.mark.parametrize("world_size", [2, 4])
def test_bytes_on_the_wire_are_half_of_fp32_for_every_algorithm(world_size):
    results = run_ranks(_reduce_compressed, world_size, False, timeout=150)
    assert all(status == "ok" for status, _ in results.values()), results
    for rank in range(world_size):
        out = results[rank][1]
        for fmt in WIRE_FORMATS.values():
            for algorithm in algorithm_names():
                sent16, sent32 = out[(fmt.name, algorithm)][1], out[("fp32", algorithm)][1]
                assert sent32 > 0 and sent16 * 2 == sent32, (rank, fmt.name, algorithm, sent16, sent32)
