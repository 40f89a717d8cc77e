"""Compression's pure parts: option checks, the rounding contract on the simulator, fp16's scale, and
error-feedback residuals that follow parameters across DDP's bucket rebuilds."""

import math

import pytest
import torch

from lightning_firecaffe.comm.compression import (
    WIRE_FORMATS,
    DynamicScale,
    ErrorFeedback,
    GradientCompression,
    rounding_bound,
    wire_dtype_for,
    wire_format,
)
from lightning_firecaffe.comm.schedules import algorithm_names, get_algorithm, schedule_for_bytes
from lightning_firecaffe.comm.simulator import simulate


def test_bad_wire_formats_and_integer_gradients_are_rejected_naming_the_option():
    with pytest.raises(ValueError, match="is not one of None, 'bf16', 'fp16'"):
        wire_format("int8")
    with pytest.raises(ValueError) as err:
        wire_dtype_for(WIRE_FORMATS["bf16"], torch.int64)
    message = str(err.value)
    assert "compression='bf16'" in message and "floating-point" in message and "float32" in message


def test_gradients_already_16_bit_travel_as_they_are():
    assert wire_dtype_for(WIRE_FORMATS["bf16"], torch.float32) is torch.bfloat16
    assert wire_dtype_for(WIRE_FORMATS["fp16"], torch.float64) is torch.float16
    assert wire_dtype_for(WIRE_FORMATS["bf16"], torch.float16) is None
    assert wire_dtype_for(None, torch.float32) is None


@pytest.mark.parametrize("fmt", list(WIRE_FORMATS))
@pytest.mark.parametrize("world_size", [2, 3, 5, 8])
@pytest.mark.parametrize("algorithm", [a for a in algorithm_names() if not get_algorithm(a).collective])
def test_every_schedule_rounds_p_times_on_any_path_and_ends_identical_everywhere(algorithm, world_size, fmt):
    """The contract on the simulator: within the bound for k = p roundings, not within k = 0 (it really
    rounds), and every rank holds the same bits."""
    wire = WIRE_FORMATS[fmt]
    g = torch.Generator().manual_seed(world_size)
    xs = [torch.randn(777, generator=g) * 10.0 ** torch.randint(-4, 1, (777,), generator=g) for _ in range(world_size)]
    exact = torch.stack([x.double() for x in xs]).sum(0)
    abs_sum = torch.stack([x.double().abs() for x in xs]).sum(0)
    out = simulate(
        schedule_for_bytes(algorithm, 777 * 2, world_size, chunk_bytes=256, ranks_per_node=2), xs, wire.dtype
    )
    assert all(torch.equal(o, out[0]) for o in out)
    error = (out[0].double() - exact).abs()
    assert (error <= rounding_bound(wire, world_size, abs_sum, additions=world_size)).all()
    assert (error > rounding_bound(wire, 0, abs_sum, additions=world_size)).any()


def test_fp16_scale_puts_the_largest_gradient_below_the_range_with_headroom():
    scale = DynamicScale()
    scale.update(scaled_max=3e-3, overflowed=False)  # measured at scale 1
    assert math.log2(scale.scale).is_integer()
    assert 2.0**10 <= 3e-3 * scale.scale < 2.0**11  # 2**(15 - 4 headroom bits)
    before = scale.scale
    scale.update(scaled_max=float("inf"), overflowed=True)
    assert scale.scale == before / 16 and scale.headroom_bits == 8
    scale.update(scaled_max=3e-3 * scale.scale, overflowed=False)
    assert 2.0**6 <= 3e-3 * scale.scale < 2.0**7, "the wider margin is kept"
    restored = DynamicScale()
    restored.load_state_dict(scale.state_dict())
    assert restored == scale


def test_fp16_overflow_is_reported_once_per_step_and_zeroes_the_bucket():
    compression = GradientCompression(WIRE_FORMATS["fp16"])
    bucket = torch.tensor([1.0, 2.0])
    work = compression.begin(bucket, None)
    bucket[0] = float("inf")  # what an overflowing all-reduce leaves
    assert compression.finish(bucket, work, bucket=3) is False
    assert torch.equal(bucket, torch.zeros(2))
    assert compression.end_step() == [3]
    assert compression.end_step() == []


def test_error_feedback_residuals_follow_parameters_across_bucket_layouts():
    feedback = ErrorFeedback()
    first = (("a", 2), ("b", 3))
    acc = feedback.accumulator(first, torch.zeros(5))
    acc.copy_(torch.arange(5.0))
    rebuilt = (("b", 3),), (("a", 2),)  # DDP rebuilt the buckets: b and a now in separate buckets
    assert torch.equal(feedback.accumulator(rebuilt[0], torch.zeros(3)), torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(feedback.accumulator(rebuilt[1], torch.zeros(2)), torch.tensor([0.0, 1.0]))
    model = (("a", 2), ("b", 3), ("c", 1))  # c has no residual yet
    flat = feedback.state_dict(model)
    assert torch.equal(flat, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.0]))
    again = ErrorFeedback()
    again.load_state_dict(flat, model)
    assert torch.equal(again.accumulator((("b", 3),), torch.zeros(3)), torch.tensor([2.0, 3.0, 4.0]))
