"""Local SGD on real gloo ranks (fork start), at the gradient path's level: a DDP module with the
GradientPath's hook and a plain training loop that calls it where the strategies do.

One 3-rank run checks several configurations against stock DDP, one 4-rank run two "nodes" of two ranks,
and 2-rank runs a dead and a stalled peer during an average. (The Trainer's wiring and exact resume:
test_local_sgd_trainer.py.)
"""

import os
import time

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_firecaffe.gradient_path import GradientPath
from lightning_firecaffe.strategy_options import FireCaffeOptions
from lightning_firecaffe.testing.ranks import run_ranks

STEPS = 11


def _model() -> DistributedDataParallel:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    return DistributedDataParallel(net)  # broadcasts rank 0's weights


def _flat(model: DistributedDataParallel):
    """As numpy (a tensor would travel back to the test through shared memory of a process that has ended)."""
    return torch.cat([p.detach().reshape(-1) for p in model.module.parameters()]).numpy().copy()


def _train(rank: int, options: FireCaffeOptions | None, momentum: float, ranks_per_node: int = 1, die=None):
    """Weights after every optimizer step (and the stats); ``options=None``: stock DDP's own all-reduce."""
    model, step = _model(), [0]
    path = None
    if options is not None:
        path = GradientPath(options)
        path.install(model, backend="gloo", device=torch.device("cpu"), ranks_per_node=ranks_per_node,
                     current_step=lambda: step[0])  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    weights = []
    for s in range(STEPS):
        step[0] = s
        g = torch.Generator().manual_seed(1000 * s + rank)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)
        if path is not None:
            path.before_optimizer_step(s)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if die is not None and s == die[0] and rank == die[1]:
            if die[2] == "dies":
                os._exit(0)
            time.sleep(3 * options.stall_timeout)
        if path is not None:
            path.after_optimizer_step(s, rank)
        weights.append(_flat(model))
    averaging = path.stats.averaging if path is not None else None
    if path is not None:
        path.close_hook()
    return weights, averaging


def _three_ranks(rank, world_size):
    return {
        "ddp": _train(rank, None, 0.9)[0],
        "native_sync": _train(rank, FireCaffeOptions(algorithm="native"), 0.9)[0],
        "tree_sync": _train(rank, FireCaffeOptions(algorithm="tree"), 0.9)[0],
        "ddp_plain": _train(rank, None, 0.0)[0],
        # start 2, period 3: averages after steps 4, 7, 10
        "native": _train(
            rank, FireCaffeOptions(algorithm="native", model_averaging_period=3, averaging_start_step=2), 0.9
        ),
        "tree_bf16": _train(
            rank,
            FireCaffeOptions(algorithm="tree", model_averaging_period=2, averaging_start_step=1, averaging_wire="bf16"),
            0.9,
        ),  # fmt: skip
        "auto_period_1": _train(rank, FireCaffeOptions(model_averaging_period=1, averaging_start_step=1), 0.0),
    }


def _averaged_after(start: int, period: int) -> set[int]:
    return {s for s in range(STEPS) if s >= start and (s - start + 1) % period == 0}


def _equal_across(results, key, step, ranks=None) -> bool:
    ranks = sorted(results) if ranks is None else ranks
    weights = [results[r][key][0][step] if isinstance(results[r][key], tuple) else results[r][key][step] for r in ranks]
    return all(np.array_equal(weights[0], w) for w in weights[1:])


@pytest.mark.timeout(120)
def test_three_ranks_local_steps_differ_averages_agree_start_equals_ddp():
    results = run_ranks(_three_ranks, 3, timeout=100)
    assert all(status == "ok" for status, _ in results.values()), results
    results = {r: v for r, (_, v) in results.items()}
    ddp = [results[r]["ddp"] for r in range(3)]
    for key, start, period in (("native", 2, 3), ("tree_bf16", 1, 2)):
        averaged = _averaged_after(start, period)
        for s in range(STEPS):
            agree = _equal_across(results, key, s)
            if s < start:  # the start period: the gradient path as without local SGD, bitwise
                synced = key.split("_")[0] + "_sync"
                assert all(np.array_equal(results[r][key][0][s], results[r][synced][s]) for r in range(3)), (key, s)
                assert all(np.allclose(results[r][key][0][s], ddp[r][s], rtol=1e-5, atol=1e-6) for r in range(3))
                assert agree, (key, s)
            elif s in averaged:
                assert agree, f"{key}: replicas differ after the average of step {s}"
            else:
                assert not agree, f"{key}: replicas agree at local step {s}: nothing was local"
        stats = results[0][key][1]
        assert stats.averages == len(averaged) and stats.bytes_sent > 0
        assert stats.wire == ("bf16" if key == "tree_bf16" else None)
    assert not np.array_equal(results[0]["native"][0][-1], results[0]["native_sync"][-1]), "local SGD changed nothing"
    assert np.allclose(results[0]["native_sync"][-1], ddp[0][-1], rtol=1e-5, atol=1e-6)
    # period 1, plain SGD: each average is DDP's step, to rounding
    for s in range(STEPS):
        assert _equal_across(results, "auto_period_1", s)
        local, reference = results[0]["auto_period_1"][0][s], results[0]["ddp_plain"][s]
        assert np.allclose(local, reference, rtol=1e-5, atol=1e-6), (s, np.abs(local - reference).max())
    assert results[0]["auto_period_1"][1].averages == STEPS - 1


def _two_nodes(rank, world_size):
    return _train(rank, FireCaffeOptions(algorithm="tree", model_averaging_period=3, averaging_start_step=1), 0.9,
                  ranks_per_node=2)  # fmt: skip


@pytest.mark.timeout(120)
def test_two_ranks_per_node_average_gradients_in_node_every_step():
    results = run_ranks(_two_nodes, 4, timeout=100)
    assert all(status == "ok" for status, _ in results.values()), results
    results = {r: {"w": v} for r, (_, v) in results.items()}
    averaged = _averaged_after(1, 3)
    for s in range(1, STEPS):
        assert _equal_across(results, "w", s, [0, 1]) and _equal_across(results, "w", s, [2, 3]), s
        assert _equal_across(results, "w", s) == (s in averaged), s


def _peer_fails(rank, world_size, algorithm, how):
    options = FireCaffeOptions(algorithm=algorithm, model_averaging_period=2, averaging_start_step=1, stall_timeout=2)
    try:
        _train(rank, options, 0.9, die=(2, 1, how))  # rank 1 fails just before the first average (after step 2)
    except Exception as exc:  # noqa: BLE001 - the test reads it
        return type(exc).__name__, str(exc), getattr(exc, "peers", None)
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm, how", [("tree", "dies"), ("native", "stalls")])
def test_a_failed_peer_during_an_average_is_named(algorithm, how):
    results = run_ranks(_peer_fails, 2, algorithm, how, timeout=60)
    status, value = results[0]
    assert status == "ok" and value is not None, results
    kind, message, peers = value
    assert kind == "PeerStallError" and peers == [1], value
    assert "rank 1" in message and "averaging parameters" in message and "training step 2" in message, message
    if how == "dies":
        assert "closed its connection" in message, message
    else:
        assert "did not answer within 2 s" in message, message
