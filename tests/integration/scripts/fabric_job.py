"""A plain Fabric training loop on 2 CPU ranks, run as a user runs it, for the Fabric strategy's tests.

``--runs`` lists ``<strategy>:<config>`` runs done one after another in the same launched processes (the
first one's launcher starts the ranks; later ``Fabric`` objects find them launched). Every rank writes its
final weights to ``OUT/<strategy>-<config>-rank<r>.pt``. Configs: ``plain``, ``accum`` (2 micro-batches
under ``fabric.no_backward_sync``), ``bf16`` (bf16-mixed precision), ``ef`` (bf16 wire with error feedback,
tuned ``auto``: 8 steps straight, saving with ``fabric.save`` after step 3: tuned choices follow timings,
so the straight run is the one that saved), ``ef_resume`` (``fabric.load``, then steps 4-7), ``stall``
(rank 1 sleeps in its own loop after step 3).
Works under ``fabric run`` too (no ``launch()`` then). A script with a ``ddp`` run ends its process groups
itself, as any DDP script should; one with only firecaffe runs leaves that to the strategy, and each
rank's last exit handler writes whether the groups were still alive to ``OUT/exit-rank<r>.json``.
"""

import argparse
import atexit
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric import Fabric

import lightning_firecaffe  # noqa: F401  (registers strategy="firecaffe" with Fabric)
from lightning_firecaffe.process_groups import end_process_groups

STEPS = {"ef": 8, "ef_resume": 8}
SAVE_AT = 4  # ef: steps done when it saves
BATCH = 8


def batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data for a step: a function of (step, micro-batch, rank) only, so a resumed run sees
    exactly what the straight one saw."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randn(BATCH, 16, generator=g)
    return x, (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4


def strategy_options(config: str, stall_timeout: float) -> dict:
    if config.startswith("ef"):
        return {"compression": "bf16", "compression_error_feedback": True, "auto_repetitions": 1}
    return {"stall_timeout": stall_timeout} if config == "stall" else {}


class HeadFirst(torch.nn.Module):
    """Parameters registered in the order backward produces their gradients, so DDP's first bucket (in
    registration order) is laid out like the buckets it rebuilds after the first step. A resumed run's
    first step runs before that rebuild: with a layout-dependent algorithm (``double_tree`` splits the
    bucket by position, and the root of each half keeps that half's rounding residual) and error feedback,
    a different first layout would change the bits. Tuned ``auto`` may pick such an algorithm."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(64, 4, bias=False)
        self.body = torch.nn.Linear(16, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def train(fabric: Fabric, name: str, config: str, out: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    if config.startswith("ef"):
        model = HeadFirst()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    start, accumulate = 0, 2 if config == "accum" else 1
    checkpoint = out / "ef.ckpt"
    if config == "ef_resume":
        state = {"model": model, "optimizer": optimizer, "step": 0}
        remainder = fabric.load(checkpoint, state)
        start = state["step"]
        assert "firecaffe" not in remainder, remainder.keys()
        (out / f"restored-choices-rank{fabric.global_rank}.json").write_text(json.dumps(auto_choices(fabric)))
    for step in range(start, STEPS.get(config, 6)):
        for micro in range(accumulate):
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                x, y = batch(step, micro, fabric.global_rank)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                fabric.backward(loss / accumulate)
        optimizer.step()
        optimizer.zero_grad()
        if config == "ef" and step + 1 == SAVE_AT:
            fabric.save(checkpoint, {"model": model, "optimizer": optimizer, "step": SAVE_AT})
            (out / f"saved-choices-rank{fabric.global_rank}.json").write_text(json.dumps(auto_choices(fabric)))
        if hasattr(fabric.strategy, "comm_metrics"):
            fabric.log_dict(fabric.strategy.comm_metrics(), step=step)
        if config == "stall" and step == 3 and fabric.global_rank == 1:
            (out / "fault_at").write_text(str(time.time()))
            time.sleep(300)  # the user's own code hangs between steps (finite: a leftover cannot live forever)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(weights, out / f"{name}-{config}-rank{fabric.global_rank}.pt")
    if hasattr(fabric.strategy, "comm_stats"):
        stats = fabric.strategy.comm_stats
        facts = {"steps": stats.completed_steps, "metrics": fabric.strategy.comm_metrics()}
        facts["comm_hook"] = fabric.strategy._ddp._get_ddp_logging_data().get("comm_hook")
        (out / f"facts-{name}-{config}-rank{fabric.global_rank}.json").write_text(json.dumps(facts))


def auto_choices(fabric: Fabric) -> dict:
    return {str(k): v for k, v in fabric.strategy.auto_choices().items()}


def run(fabric: Fabric, name: str, config: str, out: Path) -> None:
    pids = out / "pids"
    pids.mkdir(exist_ok=True)
    (pids / f"rank{fabric.global_rank}-{os.getpid()}").write_text(str(os.getpid()))
    train(fabric, name, config, out)
    fabric.barrier()
    EXIT_RECORD.update(out=out, rank=fabric.global_rank)
    if hasattr(fabric.strategy, "gradient_path"):
        fabric.strategy.teardown()  # the next run's strategy starts its own watchdog


def record_groups_at_exit() -> None:
    if EXIT_RECORD:  # a process that trained (not the spawn launcher's parent)
        out, rank = EXIT_RECORD["out"], EXIT_RECORD["rank"]
        (out / f"exit-rank{rank}.json").write_text(json.dumps({"groups_alive": dist.is_initialized()}))


EXIT_RECORD: dict = {}
atexit.register(record_groups_at_exit)  # at import, before any strategy's handler: so it runs after them


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", nargs="+", required=True, help="<strategy>:<config> ...")
    p.add_argument("--stall-timeout", type=float, default=60.0)
    args = p.parse_args()
    for entry in args.runs:
        name, config = entry.split(":")
        options = strategy_options(config, args.stall_timeout) if name.startswith("firecaffe") else {}
        strategy = lightning_firecaffe.fabric.FireCaffeStrategy(**options) if options else name
        if options and name == "firecaffe_spawn":
            strategy = lightning_firecaffe.fabric.FireCaffeStrategy(start_method="spawn", **options)
        precision = "bf16-mixed" if config == "bf16" else "32-true"
        fabric = Fabric(strategy=strategy, accelerator="cpu", devices=2, precision=precision)
        if name.endswith("_spawn"):
            fabric.launch(run, name, config, args.out)
            continue
        if not fabric._launched:  # under `fabric run`, or a later run: the ranks exist already
            fabric.launch()
        run(fabric, name, config, args.out)
    if any(not entry.startswith("firecaffe") for entry in args.runs):
        end_process_groups()


if __name__ == "__main__":
    main()
