"""PowerSGD's math (comm/low_rank.py) against a small reference written here, as torch's powerSGD_hook does it.

Ranks are simulated in one process (tests/low_rank_reference.py): each rank's messages are summed across
ranks, then handed back to every rank, which is what any all-reduce algorithm does
(tests/integration/test_low_rank_ranks.py runs the same on real gloo ranks through every algorithm).
"""

import pytest
import torch
from low_rank_reference import SHAPES, gradients, reference_powersgd, simulate

from lightning_firecaffe.comm.low_rank import (
    LowRankBucket,
    LowRankConfig,
    LowRankState,
    compressed_rank,
    matrix_shape,
    message_numels,
)


def test_which_tensors_are_compressed():
    config = LowRankConfig(rank=4)
    assert matrix_shape((8, 3, 3, 3)) == (8, 27)
    assert compressed_rank((8,), config) == 0, "1-D tensors travel as they are"
    assert compressed_rank((2, 3), config) == 0, "a small matrix saves nothing"
    assert compressed_rank((16, 64), config) == 4
    assert compressed_rank((10, 32), config) == 0, "10*32 <= 2*4*(10+32)"
    assert compressed_rank((8, 3, 3, 3), LowRankConfig(rank=2)) == 2
    assert compressed_rank((8, 3, 3, 3), config) == 0, "8*27 <= 2*4*(8+27): not worth it at rank 4"
    first, second = message_numels(SHAPES, config)
    assert (first, second) == (8 * 27 + 8 + 16 * 4 + 6, 64 * 4)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_equals_torch_powersgd_reference_with_error_feedback_and_warm_start(world_size, rank):
    config = LowRankConfig(rank=rank, start_step=0)
    grads = gradients(world_size, steps=5)
    ours, _ = simulate(grads, SHAPES, config, world_size)
    reference = reference_powersgd(grads, SHAPES, config, world_size)
    for step, (mine, ref) in enumerate(zip(ours, reference)):
        for r in range(1, world_size):
            assert torch.equal(mine[r], mine[0]), f"step {step}: rank {r} differs"
        assert torch.allclose(mine[0].double(), ref, rtol=1e-4, atol=1e-5), (
            f"step {step}: {(mine[0] - ref).abs().max()}"
        )


def test_uncompressed_tensors_are_averaged_exactly_and_compressed_ones_approximated():
    config = LowRankConfig(rank=1, start_step=0)
    grads = gradients(3, steps=1)
    (ranks,), _ = simulate(grads, SHAPES, config, 3, dtype=torch.float64)
    exact = sum(g.double() for g in grads[0]) / 3
    bias = slice(8 * 27, 8 * 27 + 8)
    assert torch.allclose(ranks[0][bias], exact[bias], rtol=1e-6)
    weight = slice(8 * 27 + 8, 8 * 27 + 8 + 1024)
    assert not torch.allclose(ranks[0][weight], exact[weight], atol=1e-3), "rank 1 of a random matrix is lossy"
    assert torch.linalg.matrix_rank(ranks[0][weight].view(16, 64)) == 1


def test_error_feedback_sends_what_was_lost_later():
    """Summed over the ranks, the residuals are exactly what the applied average lacks (nothing lost)."""
    config = LowRankConfig(rank=1, start_step=0)
    grads = gradients(2, steps=1)
    (ranks,), states = simulate(grads, SHAPES, config, 2, dtype=torch.float64)
    exact = sum(g.double() for g in grads[0]) / 2
    weight = slice(8 * 27 + 8, 8 * 27 + 8 + 1024)
    lost = sum(s.residuals["fc.weight"] for s in states).reshape(-1)
    assert torch.allclose(ranks[0][weight] + lost, exact[weight], rtol=1e-10, atol=1e-12)
    assert "conv.bias" not in states[0].residuals, "uncompressed tensors keep no residual"


def test_state_round_trips_and_q_is_the_same_on_every_rank():
    config = LowRankConfig(rank=2, start_step=0)
    _, states = simulate(gradients(2, steps=2), SHAPES, config, 2)
    assert torch.equal(states[0].qs["fc.weight"], states[1].qs["fc.weight"])
    assert not torch.equal(states[0].residuals["fc.weight"], states[1].residuals["fc.weight"])
    restored = LowRankState(config)
    restored.load_state_dict(states[1].state_dict())
    assert restored.qs.keys() == states[1].qs.keys()
    assert all(torch.equal(restored.qs[k], v) for k, v in states[1].qs.items())
    assert all(torch.equal(restored.residuals[k], v) for k, v in states[1].residuals.items())


def test_start_step_and_layout_mismatch():
    config = LowRankConfig(start_step=10)
    assert not config.active(9) and config.active(10)
    with pytest.raises(ValueError, match="layout has"):
        LowRankBucket(LowRankState(config), torch.zeros(5), (("w", (2, 3)),), 2)
