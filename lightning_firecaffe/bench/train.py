"""``firecaffe-bench train``: steps/s and images/s of each configuration (a row), side by side.

Every row runs the same model, data and steps; results are reported as ratios to ``ddp`` and to ``limit``
(plain torch DDP with torch's ``noop_hook``: no communication, the ceiling of any gradient-sync scheme on
these ranks) measured in the same invocation (absolute numbers on a shared 2-core machine mean little).
Rows are named in :mod:`.train_rows`: by default ddp, limit and firecaffe with each algorithm (with
``--compression``, the firecaffe rows send 16-bit gradients and torch's own compress hook and plain torch
DDP run beside them); ``--rows`` adds named rows (torch's PowerSGD and post-local SGD, the firecaffe
modes). A row that fails, hangs or needs an option this build lacks is reported as such (:mod:`.row_watch`)
and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ..comm.schedules import algorithm_names
from .row_watch import Outcome, watch
from .train_rows import LIGHTNING, LIMIT, ROWS, Row, select_rows, unavailable


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--algorithms",
        default="all",
        help=f"firecaffe algorithms to compare with ddp: 'all' (auto and every registered algorithm), 'none' "
        f"or a list from auto,{','.join(algorithm_names())} ('auto:measure' = auto picking by "
        "the cost model under links timed at start-up, without tuning)",
    )
    parser.add_argument(
        "--rows",
        default="",
        help=f"more rows by name, after the default ones (ddp, limit, the algorithms): {','.join(ROWS)}",
    )
    from ..models import model_names

    parser.add_argument("--model", default="nin", help=f"a registered model: {', '.join(model_names())}")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument(
        "--steps", type=int, default=15, help="timed steps (rows averaging every H steps: use a multiple of H)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed steps first (auto measures its candidates in steps 1-8 by default)",
    )
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument(
        "--hosts-rate",
        default=None,
        help="run on an emulated cluster with one rank per host and links shaped to this rate "
        "(e.g. 1gbit; needs root). Default: loopback",
    )
    parser.add_argument(
        "--compression",
        default=None,
        choices=["bf16", "fp16"],
        help="firecaffe rows send 16-bit gradients; adds torch DDP + its own compress hook",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds a row may take in all")
    parser.add_argument(
        "--stall-timeout", type=float, default=120, help="a row whose steps stop for this long is reported hung"
    )
    parser.add_argument("--out", default="bench_results")


def _row_argv(args: argparse.Namespace, row: Row, out: Path, progress: Path) -> list[str]:
    workload = ["--model", args.model, "--image-size", str(args.image_size), "--batch", str(args.batch)]
    workload += [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--out",
        str(out),
        "--progress",
        str(progress),
    ]
    return [*row.worker_args(), *workload]


def _launch_local(argv: list[str], row: Row, world: int, tmp: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    """Lightning rows: the Trainer starts the other ranks; torch rows: one process per rank, env://."""
    from ..testing.ranks import child_environment, free_port

    env = child_environment()
    if row.worker == LIGHTNING:
        ranks = [({}, [*argv, "--devices", str(world)])]
    else:
        port = str(free_port())
        ranks = [
            (
                dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), LOCAL_RANK=str(r))
                | dict(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)),
                argv,
            )
            for r in range(world)
        ]
    procs, errs = [], []
    for rank, (rank_env, rank_argv) in enumerate(ranks):
        errs.append(tmp / f"stderr{rank}")
        with open(errs[-1], "wb") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *rank_argv],
                    env={**env, **rank_env},
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
    return procs, errs


def run_row(args: argparse.Namespace, row: Row) -> Outcome:
    why = unavailable(row)
    if why:
        return Outcome("unavailable", detail=why)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out, progress = tmp / "result.json", tmp / "progress"
        argv = _row_argv(args, row, out, progress)
        if args.hosts_rate:
            from .cluster_runs import launch_on_cluster, train_cluster

            cluster = train_cluster(args.world_size, args.hosts_rate)
        else:
            cluster = contextlib.nullcontext()
        with cluster:
            if args.hosts_rate:
                procs, errs = launch_on_cluster(cluster, argv, row.worker == LIGHTNING, tmp)
            else:
                procs, errs = _launch_local(argv, row, args.world_size, tmp)
            return watch(procs, errs, out, progress, stall_s=args.stall_timeout, deadline_s=args.timeout)


def step_seconds(row: Row, result: dict) -> float:
    """The median step, or for a row that does extra work every H steps the mean (over the timed steps)."""
    return result["step_mean_s"] if row.periodic else result["step_s"]


def format_table(rows: list[Row], outcomes: list[Outcome], batch: int) -> list[str]:
    images = {}
    for row, o in zip(rows, outcomes):
        if o.status == "ok":
            images[row.name] = o.result["world_size"] * batch / step_seconds(row, o.result)
    lines = [f"{'row':<22} {'steps/s':>8} {'images/s':>9} {'vs ddp':>7} {'vs limit':>9} {'exposed comm':>13}"]
    for row, o in zip(rows, outcomes):
        if o.status != "ok":
            lines.append(f"{row.name:<22} {o.describe()}")
            continue
        r = o.result
        ips = images[row.name]
        share = f"{100 * r['exposed_share']:.0f}%" if r.get("exposed_share") is not None else "-"
        vs = {n: (f"{ips / images[n]:.2f}" if n in images else "-") for n in ("ddp", LIMIT)}
        mean = " (mean step)" if row.periodic else ""
        lines.append(
            f"{row.name:<22} {ips / r['world_size'] / batch:>8.2f} {ips:>9.1f} {vs['ddp']:>7} {vs[LIMIT]:>9} "
            f"{share:>13}{mean}"
        )
    return lines


def run_train_bench(args: argparse.Namespace) -> int:
    algorithms = (
        ["auto", *algorithm_names()]
        if args.algorithms == "all"
        else []
        if args.algorithms == "none"
        else [a for a in args.algorithms.split(",") if a]
    )
    try:
        rows = select_rows(algorithms, args.compression, [n for n in args.rows.split(",") if n])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    for row in rows:
        if row.periodic and args.steps % row.periodic:
            print(f"note: {row.name} averages every {row.periodic} steps; --steps {args.steps} is not a multiple")
    outcomes = []
    for row in rows:
        outcome = run_row(args, row)
        outcomes.append(outcome)
        if outcome.status == "ok":
            print(f"  {row.name:<22} {1 / step_seconds(row, outcome.result):.2f} steps/s", flush=True)
        else:
            print(f"  {row.name:<22} {outcome.describe()}", flush=True)
    where = f"emulated cluster, {args.hosts_rate} links" if args.hosts_rate else "loopback"
    grads = next((o.result["gradient_bytes"] for o in outcomes if o.status == "ok"), 0)
    print(
        f"\n{args.model} {args.image_size}px, {args.batch}/rank, {args.world_size} ranks, {where}; "
        f"gradients {grads / 1e6:.1f} MB"
    )
    print("\n".join(format_table(rows, outcomes, args.batch)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [
        {"row": row.name, "status": o.status, "detail": o.detail, **(o.result or {})} for row, o in zip(rows, outcomes)
    ]
    (out / "train.json").write_text(json.dumps({"where": where, "argv": sys.argv[1:], "results": results}, indent=2))
    print(f"wrote {out / 'train.json'}")
    return 0
