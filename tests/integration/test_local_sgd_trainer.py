"""Local SGD through the Trainer: ``FireCaffeStrategy(model_averaging_period=3)`` on three emulated nodes
(one CPU rank each, launched externally), with gradient accumulation and LargeBatchScaling; a run resumed
from a checkpoint taken between two averages equals the straight run bitwise on every rank.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_firecaffe.testing.ranks import child_environment, free_port

SCRIPT = Path(__file__).parent / "scripts" / "local_sgd_job.py"
WORLD = 3
START, PERIOD, STEPS = 2, 3, 10
AVERAGED_AFTER = {4, 7}  # optimizer steps s >= START with (s - START + 1) % PERIOD == 0


def launch(out: Path, *args: str, timeout: float = 120) -> None:
    """Every "node" is one process; Lightning's environment reads the rank variables. Each rank's output
    goes to a file (a full pipe would block a rank while the test waits on another)."""
    out.mkdir(parents=True, exist_ok=True)
    env = child_environment() | dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    logs = [out / f"output-rank{r}.txt" for r in range(WORLD)]
    procs = []
    for r, log in enumerate(logs):
        with log.open("w") as sink:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), "--out", str(out), *args],
                    env=dict(env, NODE_RANK=str(r), LOCAL_RANK="0", WORLD_SIZE=str(WORLD)),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log.read_text()[-3000:] for log in logs)


def lrs(out: Path) -> list[dict[int, float]]:
    return [{int(k): v for k, v in json.loads((out / f"lr-rank{r}.json").read_text()).items()} for r in range(WORLD)]


def weights(out: Path) -> list[dict[int, torch.Tensor]]:
    return [torch.load(out / f"weights-rank{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(300)
def test_trainer_local_sgd_averages_every_period_and_resumes_between_averages_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(straight)
    runs = weights(straight)
    for step in range(1, STEPS + 1):  # global step after optimizer step ``step - 1``
        agree = all(torch.equal(runs[0][step], w[step]) for w in runs[1:])
        expected = step - 1 < START or step - 1 in AVERAGED_AFTER
        assert agree == expected, f"after optimizer step {step - 1}: replicas {'agree' if agree else 'differ'}"
    # LargeBatchScaling composes: global batch 4 x 3 ranks x 2 accumulated = its reference 24, so the peak is
    # the base LR 0.1; then its decay (power 0.5 over the 8 steps after the 2-step warm-up), alike on every rank
    schedule = lrs(straight)
    assert all(r == schedule[0] for r in schedule[1:])
    expected = {s: 0.1 * (1 - (s - 2) / 8) ** 0.5 if s >= 2 else 0.1 for s in range(STEPS)}
    assert {s: schedule[0][s] for s in range(STEPS)} == pytest.approx(expected, rel=1e-12)
    summary = json.loads((straight / "facts.json").read_text())["summary"]
    assert "Local SGD (average every 3 steps from step 2): 2 parameter average(s) [" in summary, summary
    ckpt = straight / "ckpt" / "epoch=1-step=6.ckpt"  # after step 5: one local step past the average of step 4
    saved = torch.load(ckpt, weights_only=False)["firecaffe"]["local_sgd"]
    assert saved["world_size"] == WORLD and saved["anchor"] is not None and len(saved["replicas"]) == WORLD

    launch(resumed, "--resume", str(ckpt))
    again = weights(resumed)
    for rank in range(WORLD):
        assert sorted(again[rank]) == list(range(6, STEPS + 1))  # 6: the first micro-batch, the restored weights
        for step in again[rank]:
            assert torch.equal(again[rank][step], runs[rank][step]), f"rank {rank} differs at step {step}"
        assert lrs(resumed)[rank] == {s: lr for s, lr in schedule[rank].items() if s >= 6}
