"""The planner's predictions behave (pure arithmetic on the cost model), and sizes and rates parse."""

import json

import pytest

from lightning_firecaffe.bench.cli import main
from lightning_firecaffe.bench.plan import Workload, plan_point
from lightning_firecaffe.comm.cost_model import LinkModel
from lightning_firecaffe.comm.schedules import algorithm_names
from lightning_firecaffe.units import format_rate, parse_rate, parse_rate_bytes_per_s, parse_size

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sizes_and_rates():
    assert parse_size("25MB") == 25_000_000 and parse_size("1MiB") == 1 << 20 and parse_size("4KB") == 4000
    assert parse_rate_bytes_per_s("1gbit") == 1.25e8
    with pytest.raises(ValueError, match="bad size"):
        parse_size("12 parsecs")
    with pytest.raises(ValueError, match="bad rate"):
        parse_rate_bytes_per_s("none")


def test_parse_rate():
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("10Gbit") == 10**10
    assert parse_rate("100mbit") == 10**8
    assert parse_rate("2.5gbit") == 2_500_000_000
    assert parse_rate(None) is None and parse_rate("none") is None
    assert parse_rate(1e9) == 10**9
    for bad in ("1gbps", "fast", "-1gbit", "1 GB", "100bit"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    assert format_rate(10**9) == "1gbit" and format_rate(200 * 10**6) == "200mbit" and format_rate(None) == "unshaped"


GOOGLENET = Workload("googlenet", 4 * 6_998_552, 1 / 300)


@pytest.mark.parametrize("algorithm", algorithm_names())
def test_plan_speedup_rises_with_batch_and_falls_with_bandwidth(algorithm):
    fast = LinkModel.from_gbit(56, latency_us=5)
    slow = LinkModel.from_gbit(10, latency_us=5)
    by_batch = [plan_point(GOOGLENET, algorithm, 128, b, fast).speedup_no_overlap for b in (8, 16, 32, 64)]
    assert by_batch == sorted(by_batch) and by_batch[-1] > by_batch[0]
    for b in (8, 32):
        assert (
            plan_point(GOOGLENET, algorithm, 128, b, slow).speedup_no_overlap
            < plan_point(GOOGLENET, algorithm, 128, b, fast).speedup_no_overlap
        )


def test_plan_reproduces_the_papers_ordering():
    """On 128 GPUs with FireCaffe's batch (8/GPU = 1024), a tree beats the parameter server by >10x."""
    link = LinkModel.from_gbit(56, latency_us=5)
    tree = plan_point(GOOGLENET, "tree", 128, 8, link).speedup_no_overlap
    ps = plan_point(GOOGLENET, "parameter_server", 128, 8, link).speedup_no_overlap
    assert tree > 10 * ps


def test_plan_cli_for_googlenet_on_128_gpus(tmp_path, capsys):
    assert main(["plan", "--model", "googlenet", "--gpus", "128", "--max-gpus", "128", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "googlenet: 28.0 MB of gradients" in out
    assert all(f"\n{name} " in out for name in algorithm_names()), "one table row per registered algorithm"
    assert (tmp_path / "plan.png").read_bytes()[:8] == PNG_MAGIC
    table = json.loads((tmp_path / "plan.json").read_text())["table"]
    assert {row["gpus"] for row in table} == {128}


def test_plan_can_measure_compute_here(capsys, tmp_path):
    argv = [
        "plan",
        "--model",
        "nin",
        "--measure-compute",
        "--image-size",
        "32",
        "--gpus",
        "4",
        "--max-gpus",
        "4",
        "--batches",
        "8",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "measured forward+backward on this machine" in out and "nin: 30.4 MB of gradients" in out


def test_plan_adds_low_rank_and_local_sgd_priced_from_the_shapes():
    from lightning_firecaffe.bench.plan import REDUCERS, plan_table, speedup_curves
    from lightning_firecaffe.comm.low_rank_sizes import bucket_bytes
    from lightning_firecaffe.comm.savings import gradient_sync_s

    shapes = [(64, 3, 7, 7), (64,), (192, 64, 3, 3), (192,), (1000, 1024), (1000,)] * 4
    workload = Workload("small", 4 * sum(torch_numel(s) for s in shapes), 1 / 300)
    link = LinkModel.from_gbit(10, latency_us=5)
    rows = {(r.algorithm, r.batch_per_gpu): r for r in plan_table(workload, 128, link, [8], shapes=shapes)}
    powersgd, local = rows[("powersgd r4", 8)], rows[("local SGD H=8", 8)]
    assert powersgd.comm_s < rows[("ring", 8)].comm_s
    assert local.comm_s == pytest.approx(gradient_sync_s(bucket_bytes(shapes), 128, link) / 8)
    assert local.iteration_s == local.compute_s + local.comm_s  # an average overlaps nothing
    curves = speedup_curves(workload, 8, link, max_gpus=16, shapes=shapes)
    assert {r.name for r in REDUCERS} <= set(curves) and curves["powersgd r4"][0] == (1, 1.0, 1.0)
    assert "powersgd r4" not in speedup_curves(workload, 8, link, max_gpus=16)  # no shapes, no reducers


def torch_numel(shape):
    import math

    return math.prod(shape)
