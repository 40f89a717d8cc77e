"""Benchmark tooling: the comm benchmark writes valid JSON and a PNG; the planner's predictions behave."""

import json
import subprocess
import sys

import pytest

from lightning_firecaffe.bench.cli import main
from lightning_firecaffe.bench.plan import Workload, plan_point
from lightning_firecaffe.bench.units import parse_rate_bytes_per_s, parse_size
from lightning_firecaffe.cost_model import LinkModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_units():
    assert parse_size("25MB") == 25_000_000 and parse_size("1MiB") == 1 << 20 and parse_size("4KB") == 4000
    assert parse_rate_bytes_per_s("1gbit") == 1.25e8
    with pytest.raises(ValueError, match="bad size"):
        parse_size("12 parsecs")


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_comm_bench_on_loopback_writes_json_and_png(tmp_path):
    argv = ["comm", "--world-sizes", "2,3", "--sizes", "1KB,64KB", "--reps", "2", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_firecaffe.bench", *argv], capture_output=True, text=True, timeout=170
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dist.all_reduce" in proc.stdout and "busbw" in proc.stdout
    data = json.loads((tmp_path / "comm.json").read_text())
    assert [r["world_size"] for r in data["reports"]] == [2, 3]
    rows = data["reports"][1]["results"]
    assert {r["algorithm"] for r in rows} >= {"tree", "ring", "parameter_server", "dist.all_reduce", "auto"}
    for r in rows:
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["predicted_s"] > 0 and r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * 2 * 2 / 3)
        # small messages: two rounds in flight, each with at most three 64 KB receive buffers
        assert 0 < r["peak_extra_bytes"] <= 2 * 3 * 64_000
    assert (tmp_path / "comm.png").read_bytes()[:8] == PNG_MAGIC


GOOGLENET = Workload("googlenet", 4 * 6_998_552, 1 / 300)


@pytest.mark.parametrize("algorithm", ["tree", "pipelined_tree", "double_tree", "ring", "parameter_server"])
def test_plan_speedup_rises_with_batch_and_falls_with_bandwidth(algorithm):
    fast = LinkModel.from_gbit(56, latency_us=5)
    slow = LinkModel.from_gbit(10, latency_us=5)
    by_batch = [plan_point(GOOGLENET, algorithm, 128, b, fast).speedup_no_overlap for b in (8, 16, 32, 64)]
    assert by_batch == sorted(by_batch) and by_batch[-1] > by_batch[0]
    for b in (8, 32):
        assert plan_point(GOOGLENET, algorithm, 128, b, slow).speedup_no_overlap < plan_point(
            GOOGLENET, algorithm, 128, b, fast
        ).speedup_no_overlap


def test_plan_reproduces_the_papers_ordering():
    """On 128 GPUs with FireCaffe's batch (8/GPU = 1024), a tree beats the parameter server by >10x."""
    link = LinkModel.from_gbit(56, latency_us=5)
    tree = plan_point(GOOGLENET, "tree", 128, 8, link).speedup_no_overlap
    ps = plan_point(GOOGLENET, "parameter_server", 128, 8, link).speedup_no_overlap
    assert tree > 10 * ps


def test_plan_cli_for_googlenet_on_128_gpus(tmp_path, capsys):
    assert main(["plan", "--model", "googlenet", "--gpus", "128", "--max-gpus", "128", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "googlenet: 28.0 MB of gradients" in out and "parameter_server" in out and "double_tree" in out
    assert (tmp_path / "plan.png").read_bytes()[:8] == PNG_MAGIC
    table = json.loads((tmp_path / "plan.json").read_text())["table"]
    assert {row["gpus"] for row in table} == {128}


def test_plan_can_measure_compute_here(capsys, tmp_path):
    argv = ["plan", "--model", "nin", "--measure-compute", "--image-size", "32", "--gpus", "4", "--max-gpus", "4",
            "--batches", "8", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "measured forward+backward on this machine" in out and "nin: 30.4 MB of gradients" in out
