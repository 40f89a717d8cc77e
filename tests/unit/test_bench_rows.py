"""The train benchmark's rows by name, the 'not available' check, and the error line of a failed row."""

import json

import pytest

from lightning_firecaffe.bench.row_watch import Outcome, error_line
from lightning_firecaffe.bench.train_rows import ROWS, firecaffe_row, select_rows, unavailable


def test_default_rows_then_named_ones_each_once():
    names = [r.name for r in select_rows(["auto", "ring"], None, ["torch-powersgd", "limit"])]
    assert names == ["ddp", "limit", "firecaffe:auto", "firecaffe:ring", "torch-powersgd"]
    names = [r.name for r in select_rows([], "bf16", [])]
    assert names == ["ddp", "limit", "torch-bf16", "torch-ddp"]
    with pytest.raises(ValueError, match="unknown nope"):
        select_rows([], None, ["nope"])


def test_rows_become_worker_arguments():
    argv = ROWS["torch-powersgd"].worker_args()
    assert argv[:2] == ["-m", "lightning_firecaffe.bench.torch_ddp_worker"]
    assert argv[argv.index("--hook") + 1] == "powersgd" and argv[argv.index("--powersgd-rank") + 1] == "4"
    argv = ROWS["firecaffe-powersgd"].worker_args()
    assert argv[argv.index("--strategy") + 1] == "firecaffe"
    assert json.loads(argv[argv.index("--strategy-kwargs") + 1]) == {
        "compression": "powersgd",
        "powersgd_rank": 4,
        "powersgd_start_step": 2,
    }
    assert ROWS["torch-localsgd"].periodic == ROWS["firecaffe-localsgd"].periodic == 8


def test_auto_measure_is_auto_with_measured_links_and_runs():
    """``--algorithms auto:measure`` was once passed through as an algorithm name, which the strategy
    refuses, so the row was reported "not available" instead of run."""
    row = firecaffe_row("auto:measure", "bf16")
    assert dict(row.options) == {"algorithm": "auto", "link": "measure", "compression": "bf16"}
    assert row.name == "firecaffe:auto:measure+bf16"
    assert unavailable(row) is None


def test_a_mode_the_strategy_lacks_is_not_available_instead_of_crashing():
    class Strategy:  # knows compression and the averaging period, refuses "powersgd"
        def __init__(self, *, compression=None, model_averaging_period=None, **kwargs):
            if compression not in (None, "bf16"):
                raise ValueError(f"FireCaffeStrategy(compression={compression!r}): must be bf16\nmore")

    assert "no option averaging_start_step" in unavailable(ROWS["firecaffe-localsgd"], Strategy)
    assert "no option powersgd_rank, powersgd_start_step" in unavailable(ROWS["firecaffe-powersgd"], Strategy)
    assert unavailable(ROWS["firecaffe-bf16"], Strategy) is None
    assert unavailable(ROWS["torch-powersgd"], Strategy) is None  # torch rows need nothing of ours

    class Refuses(Strategy):
        def __init__(self, *, compression=None, powersgd_rank=1, powersgd_start_step=10, **kwargs):
            super().__init__(compression=compression)

    assert unavailable(ROWS["firecaffe-powersgd"], Refuses) == (
        "ValueError: FireCaffeStrategy(compression='powersgd'): must be bf16"
    )
    assert Outcome("unavailable", detail="x").describe() == "not available in this build: x"


def test_error_line_finds_the_cause():
    gloo_abort = (
        "[W init] something\nterminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
        "  what():  [enforce fail at pair.cc:456] op.preamble.length <= op.nbytes. 2580 vs 2048.\n"
    )
    assert error_line(gloo_abort, -6).startswith("[enforce fail at pair.cc:456] op.preamble.length")
    traceback = (
        "Traceback (most recent call last):\n  File 'x.py', line 1\n    _orthogonalize(p)\nAssertionError\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: worker failed\n"
    )
    assert error_line(traceback) == "AssertionError"
    assert (
        error_line("RuntimeError: Connection closed by peer\n  more detail\n")
        == "RuntimeError: Connection closed by peer"
    )
    assert error_line("", -9) == "killed by signal 9" and error_line("", 3) == "exit code 3"
