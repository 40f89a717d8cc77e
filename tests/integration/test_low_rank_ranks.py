"""Low-rank gradients (PowerSGD) on real gloo ranks (fork start).

1. Every registered algorithm (and ``native``) at 2, 3 and 4 ranks sums the P and Q messages: every rank
   ends with the same bits, equal within float tolerance to the reference of tests/unit/test_low_rank.py
   (torch's PowerSGD math, error feedback and warm start).
2. Through torch DDP with FireCaffe's hook on NiN: full gradients (bitwise as without PowerSGD) before the
   start step, then bytes on the wire what the rank implies, >= 20x fewer than fp32 at rank 4; a peer that
   dies during a P/Q reduction is named.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist
from low_rank_reference import SHAPES, gradients, reference_powersgd

from lightning_firecaffe.comm.executor import ScheduleExecutor
from lightning_firecaffe.comm.low_rank import LowRankBucket, LowRankConfig, LowRankState, message_numels
from lightning_firecaffe.comm.schedules import algorithm_names, schedule_for_bytes
from lightning_firecaffe.testing.ranks import run_ranks

pytestmark = pytest.mark.timeout(240)
STEPS = 3


def _every_algorithm(rank, world_size):
    executor = ScheduleExecutor(rank, world_size, group=dist.group.WORLD, stall_timeout=30)
    config = LowRankConfig(rank=2, start_step=0)
    grads = gradients(world_size, STEPS)
    out = {}
    for algorithm in algorithm_names():
        state, results = LowRankState(config), []
        for step, mine in enumerate(grads):
            bucket = LowRankBucket(state, mine[rank] / world_size, SHAPES, world_size)
            first = bucket.first_message()
            schedule = schedule_for_bytes(algorithm, first.numel() * 4, world_size, chunk_bytes=256)
            executor.all_reduce_(first, schedule, bucket=0, step=step)
            second = bucket.second_message(first)
            schedule = schedule_for_bytes(algorithm, second.numel() * 4, world_size, chunk_bytes=256)
            executor.all_reduce_(second, schedule, bucket=0, step=step)
            bucket.finish(second)
            results.append(bucket.buffer.numpy().copy())
        out[algorithm] = results
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_algorithm_gives_every_rank_the_same_bits_close_to_the_reference(world_size):
    results = run_ranks(_every_algorithm, world_size, timeout=200)
    assert all(status == "ok" for status, _ in results.values()), results
    reference = reference_powersgd(gradients(world_size, STEPS), SHAPES, LowRankConfig(rank=2), world_size)
    for algorithm in algorithm_names():
        for step in range(STEPS):
            mine = [torch.from_numpy(results[r][1][algorithm][step]) for r in range(world_size)]
            assert all(torch.equal(m, mine[0]) for m in mine), f"{algorithm} step {step}: ranks differ"
            error = (mine[0].double() - reference[step]).abs().max()
            assert torch.allclose(mine[0].double(), reference[step], rtol=1e-4, atol=1e-5), f"{algorithm}: {error}"


def _ddp_nin(rank, world_size, start_step, die_at, stall=False, stall_timeout=10.0):
    from torch.nn.parallel import DistributedDataParallel

    from lightning_firecaffe.gradient_path import GradientPath
    from lightning_firecaffe.models import build_model
    from lightning_firecaffe.strategy_options import FireCaffeOptions

    torch.manual_seed(0)
    model = DistributedDataParallel(build_model("nin", num_classes=10, dropout=0.0))
    options = dict(algorithm="tree", stall_timeout=stall_timeout, watchdog=False)
    if start_step is not None:
        options.update(compression="powersgd", powersgd_rank=4, powersgd_start_step=start_step)
    path, step, buckets = GradientPath(FireCaffeOptions(**options)), [0], {}

    def recording(hook):  # the shapes of each bucket, as DDP hands them over
        def wrapped(state, bucket):
            buckets.setdefault(step[0], []).append(
                tuple((n, tuple(p.shape)) for n, p in zip(names, bucket.parameters()))
            )
            return hook(state, bucket)

        return wrapped

    names = [n for n, _ in model.module.named_parameters()]
    state = path.install(
        model,
        backend="gloo",
        device=torch.device("cpu"),
        ranks_per_node=1,
        current_step=lambda: step[0],
        wrapper=recording,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    sent, failure, before_start = [], None, None
    for step[0] in range(4):
        if step[0] == die_at and rank == 1:
            if stall:  # stopped, not gone: its connections stay open and silent
                time.sleep(4 * stall_timeout)
            os._exit(3)
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        before = state.executor.counters.bytes_sent
        try:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        except RuntimeError as exc:
            failure = str(path.hook_error(exc) or exc)
            break
        optimizer.step()
        optimizer.zero_grad()
        sent.append(state.executor.counters.bytes_sent - before)
        if step[0] == 1:  # the last step before PowerSGD's start step (2)
            before_start = {k: v.detach().numpy().copy() for k, v in model.module.state_dict().items()}
    weights = {k: v.detach().numpy().copy() for k, v in model.module.state_dict().items()}
    expected = 0  # what the tree sends for the two messages of every bucket of the last step
    for shapes in buckets.get(3, []):
        for numel in message_numels(shapes, LowRankConfig(rank=4)):
            schedule = state.selector.schedule_for(numel * 4, "tree")
            expected += state.executor.modelled_bytes(schedule, torch.empty(numel))[0]
    path.close_hook()
    return {
        "sent": sent,
        "weights": weights,
        "before_start": before_start,
        "expected": expected,
        "buckets": len(buckets.get(3, [])),
        "failure": failure,
    }


@pytest.mark.timeout(240)
def test_through_ddp_full_gradients_before_the_start_step_then_what_the_rank_implies():
    world_size = 2
    plain = run_ranks(_ddp_nin, world_size, None, -1, timeout=200)
    low = run_ranks(_ddp_nin, world_size, 2, -1, timeout=200)
    assert all(s == "ok" for s, _ in [*plain.values(), *low.values()]), (plain, low)
    fp32, lr = plain[0][1], low[0][1]
    assert lr["sent"][:2] == fp32["sent"][:2], "full gradients until the start step"
    for rank in range(world_size):
        for k, w in low[rank][1]["before_start"].items():
            assert (w == plain[rank][1]["before_start"][k]).all(), f"rank {rank} {k}: differs before the start step"
    ratio = fp32["sent"][3] / lr["sent"][3]
    assert ratio >= 20, f"only {ratio:.1f}x fewer bytes at rank 4"
    assert lr["buckets"] >= 2 and lr["sent"][3] == lr["expected"], "each bucket's two messages, nothing else"
    for k, w in low[1][1]["weights"].items():
        assert (w == lr["weights"][k]).all(), f"{k}: ranks differ"
    assert any(not (w == fp32["weights"][k]).all() for k, w in lr["weights"].items()), "PowerSGD changed nothing"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stall", [False, True], ids=["dies", "stalls"])
def test_a_peer_that_dies_or_stalls_during_a_factor_reduction_is_named(stall):
    results = run_ranks(_ddp_nin, 2, 1, 2, stall, 3.0, timeout=100)
    status, value = results[0]
    assert status == "ok", results
    assert value["failure"] is not None and "rank 1" in value["failure"], value["failure"]
    assert "PowerSGD's P message" in value["failure"], value["failure"]
    happened = "did not answer within 3 s" if stall else "closed its connection"
    assert happened in value["failure"], value["failure"]
    assert len(value["sent"]) == 2, "it failed at the step rank 1 died (step 2)"
