"""The end-of-fit pricing of bf16 wire, low-rank gradients and local SGD: arithmetic on the cost model."""

import pytest

from lightning_firecaffe.comm.cost_model import LinkModel, rank_algorithms
from lightning_firecaffe.comm.low_rank_sizes import bucket_bytes, message_sizes
from lightning_firecaffe.comm.savings import (
    ComputeModel,
    all_reduce_s,
    format_savings,
    gradient_sync_s,
    local_sgd_s,
    low_rank_compute_s,
    low_rank_sync_s,
    price_options,
)

LINK = LinkModel.from_gbit(1, latency_us=100)
# a small convnet: two convs, their biases, a classifier
SHAPES = [(64, 3, 3, 3), (64,), (256, 64, 3, 3), (256,), (1000, 256), (1000,)]
FREE = ComputeModel(flops_per_s=float("inf"), memory_Bps=float("inf"))


def test_messages_take_the_fastest_candidate_and_nothing_costs_nothing():
    assert all_reduce_s(0, 4, LINK) == 0.0 and all_reduce_s(1 << 20, 1, LINK) == 0.0
    assert all_reduce_s(1 << 20, 4, LINK) == min(t for _, t in rank_algorithms(1 << 20, 4, LINK))
    buckets = bucket_bytes(SHAPES)
    assert gradient_sync_s(buckets, 4, LINK, 2) < gradient_sync_s(buckets, 4, LINK)
    assert local_sgd_s(buckets, 4, LINK, 8) == pytest.approx(gradient_sync_s(buckets, 4, LINK) / 8)
    messages = message_sizes(SHAPES, 4)
    assert low_rank_sync_s(messages, 4, LINK) == sum(
        all_reduce_s(p, 4, LINK) + all_reduce_s(q, 4, LINK) for p, q in messages
    )


def test_compression_compute_is_counted_per_compressed_matrix():
    unit = ComputeModel(flops_per_s=1.0, memory_Bps=float("inf"))
    # 6 n m r + 4 n r^2 for (64, 27), (256, 576) and (1000, 256) at r 4; the biases travel as they are
    expected = sum(6 * n * m * 4 + 4 * n * 16 for n, m in ((64, 27), (256, 576), (1000, 256)))
    assert low_rank_compute_s(SHAPES, 4, 2.0, unit) == expected
    assert low_rank_compute_s([(10,), (4, 4)], 4, 2.0, unit) == 0.0


def test_prices_are_calibrated_to_the_measured_step():
    predicted = gradient_sync_s(bucket_bytes(SHAPES), 4, LINK)
    # measured: the all-reduce took twice the prediction, 1/4 of it hidden behind backward
    busy, exposed = 2 * predicted, 1.5 * predicted
    savings = {
        s.option: s
        for s in price_options(exposed_s=exposed, busy_s=busy, shapes=SHAPES, world_size=4, link=LINK, compute=FREE)
    }
    assert list(savings) == ["bf16 wire", "powersgd rank 4", "local SGD H=8"]
    bf16 = 2 * gradient_sync_s(bucket_bytes(SHAPES), 4, LINK, 2)
    assert savings["bf16 wire"].exposed_s == pytest.approx(max(0.0, bf16 - 0.5 * predicted))
    assert savings["local SGD H=8"].exposed_s == pytest.approx(2 * predicted / 8)  # an average hides behind nothing
    for s in savings.values():
        assert s.saved_s == pytest.approx(exposed - s.exposed_s)
    # low-rank messages are small: on free compute they hide entirely behind the window
    assert savings["powersgd rank 4"].exposed_s == 0.0


def test_slow_compression_can_cost_more_than_it_saves_and_a_bf16_run_is_not_offered_bf16():
    predicted = gradient_sync_s(bucket_bytes(SHAPES), 4, LINK, 2)
    slow = ComputeModel(flops_per_s=1e6, memory_Bps=1e6)
    savings = price_options(
        exposed_s=predicted, busy_s=predicted, shapes=SHAPES, world_size=4, link=LINK, wire_itemsize=2, compute=slow
    )
    assert [s.option for s in savings] == ["powersgd rank 4", "local SGD H=8"]
    assert savings[0].saved_s < 0


def test_summary_line():
    savings = price_options(exposed_s=0.04, busy_s=0.05, shapes=SHAPES, world_size=4, link=LINK, period=4, rank=2)
    text = format_savings(0.1, 0.04, savings)
    assert text.startswith("Exposed communication 40.0 ms/step (40 % of a 100.0 ms step).")
    assert (
        "not turned on" in text and "bf16 wire: -" in text and "powersgd rank 2:" in text and "local SGD H=4:" in text
    )
    assert "% of" not in format_savings(None, 0.04, savings)


def test_end_of_fit_summary_prices_the_options_of_the_steady_state(caplog):
    """The callback's lines from a fit's figures (no ranks needed): later half of the steps only."""
    import logging
    from types import SimpleNamespace

    import torch

    from lightning_firecaffe.callbacks.comm_telemetry import CommTelemetry
    from lightning_firecaffe.comm.telemetry import CommStats, StepComm

    stats = CommStats()
    for step in range(10):  # the first half (auto measuring) is slow and must not count
        stats.history.append(StepComm(busy_s=1.0 if step < 5 else 0.05, exposed_s=1.0 if step < 5 else 0.04, step=step))
    stats.totals.steps = 10
    strategy = SimpleNamespace(comm_stats=stats, algorithm="auto", measured_link=LINK, root_device=torch.device("cpu"))
    trainer = SimpleNamespace(strategy=strategy, world_size=4, num_devices=1, accumulate_grad_batches=1)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 256, 3), torch.nn.Linear(256, 1000))
    callback = CommTelemetry()
    callback._batch_s = [9.0] * 10 + [0.1] * 10
    with caplog.at_level(logging.INFO):
        callback.on_fit_end(trainer, module)
    expected = price_options(exposed_s=0.04, busy_s=0.05, shapes=SHAPES, world_size=4, link=LINK)
    assert caplog.messages[-1] == format_savings(0.1, 0.04, expected)
    assert "FireCaffe (auto): 10 steps" in caplog.messages[-2]


@pytest.mark.parametrize(
    "options, offered",
    [
        ({}, ["bf16 wire", "powersgd rank 4", "local SGD H=8"]),
        ({"compression": "bf16"}, ["powersgd rank 4", "local SGD H=8"]),  # already on a 16-bit wire
        ({"compression": "powersgd"}, []),  # the run sends no full gradients: nothing is priced against it
        ({"model_averaging_period": 8}, []),
    ],
)
def test_the_end_of_fit_summary_prices_options_against_the_run_it_measured(options, offered):
    from types import SimpleNamespace

    import torch

    from lightning_firecaffe.callbacks.comm_telemetry import CommTelemetry
    from lightning_firecaffe.comm.telemetry import CommStats
    from lightning_firecaffe.strategy_options import FireCaffeOptions

    stats = CommStats()
    for _ in range(4):
        stats.bucket_ready(is_last=True)
        stats.bucket_done(1000, 1000, 0.02, is_last=True)
    strategy = SimpleNamespace(
        options=FireCaffeOptions(**options), root_device=torch.device("cpu"), measured_link=LINK, comm_stats=stats
    )
    trainer = SimpleNamespace(strategy=strategy, world_size=4, num_devices=1, accumulate_grad_batches=1)
    text = CommTelemetry()._priced(trainer, torch.nn.Linear(64, 64), stats)
    assert text.startswith("Exposed communication")
    priced = text.split("not turned on: ")[1].rstrip(".").split("; ") if "not turned on" in text else []
    assert [p.split(":")[0] for p in priced] == offered, text
