"""``firecaffe-bench train``: steps/s and images/s of ``strategy=firecaffe`` (each algorithm) vs ``ddp``.

Every configuration runs the same model, data and steps; results are reported as ratios to ``ddp``
measured in the same invocation (absolute numbers on a shared 2-core machine mean little). With
``--compression`` the firecaffe rows send 16-bit gradients and a row for torch's own compress hook on
plain torch DDP (:mod:`.torch_ddp_worker`) runs beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from ..comm.schedules import algorithm_names
from ..testing.ranks import run_launcher_script


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--algorithms",
        default="all",
        help=f"firecaffe algorithms to compare with ddp: 'all' (auto and every registered algorithm) "
        f"or a list from auto,{','.join(algorithm_names())} ('auto:measure' = auto picking by "
        "the cost model under links timed at start-up, without tuning)",
    )
    from ..models import model_names

    parser.add_argument("--model", default="nin", help=f"a registered model: {', '.join(model_names())}")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--steps", type=int, default=15, help="timed steps")
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
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default="bench_results")


TORCH_HOOK = "torch_ddp_hook"  # the strategy name of the plain-torch-DDP row


def _worker_args(args: argparse.Namespace, strategy: str, algorithm: str, out: str) -> list[str]:
    """The worker module and its arguments for one configuration (Lightning's, or plain torch DDP's)."""
    common = [
        "--model",
        args.model,
        "--image-size",
        str(args.image_size),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--out",
        out,
    ]
    if strategy == TORCH_HOOK:
        return ["-m", "lightning_firecaffe.bench.torch_ddp_worker", "--hook", algorithm, *common]
    compression = ["--compression", args.compression] if strategy == "firecaffe" and args.compression else []
    return [
        "-m",
        "lightning_firecaffe.bench.train_worker",
        "--strategy",
        strategy,
        "--algorithm",
        algorithm,
        *compression,
        *common,
    ]


def run_one_local(args: argparse.Namespace, strategy: str, algorithm: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = _worker_args(args, strategy, algorithm, out)
        if strategy == TORCH_HOOK:  # plain torch: torchrun starts the ranks
            cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.world_size), *cmd]
        else:
            cmd += ["--devices", str(args.world_size)]
        proc = run_launcher_script(cmd, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{strategy}/{algorithm} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())


def run_train_bench(args: argparse.Namespace) -> int:
    names = ["auto", *algorithm_names()] if args.algorithms == "all" else [a for a in args.algorithms.split(",") if a]
    configs = [("ddp", "-")] + [("firecaffe", a) for a in names]
    if args.compression:  # the best existing equivalent, and plain torch DDP to tell Lightning's own cost apart
        configs += [(TORCH_HOOK, args.compression), (TORCH_HOOK, "none")]
    results = []
    for strategy, algorithm in configs:
        if args.hosts_rate:
            from .cluster_runs import train_on_cluster

            result = train_on_cluster(args, strategy, algorithm, _worker_args)
        else:
            result = run_one_local(args, strategy, algorithm)
        results.append(result)
        print(f"  {result['strategy']:<30} {result['steps_per_s']:.2f} steps/s", flush=True)
    base = results[0]["images_per_s"]
    where = f"emulated cluster, {args.hosts_rate} links" if args.hosts_rate else "loopback"
    print(
        f"\n{args.model} {args.image_size}px, {args.batch}/rank, {args.world_size} ranks, {where}; "
        f"gradients {results[0]['gradient_bytes'] / 1e6:.1f} MB"
    )
    print(f"{'strategy':<30} {'steps/s':>8} {'images/s':>9} {'vs ddp':>7} {'exposed comm':>16}")
    for r in results:
        share = f"{100 * r['exposed_share']:.0f}%" if r["exposed_share"] is not None else "-"
        print(
            f"{r['strategy']:<30} {r['steps_per_s']:>8.2f} {r['images_per_s']:>9.1f} "
            f"{r['images_per_s'] / base:>7.2f} {share:>16}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps({"where": where, "results": results}, indent=2))
    print(f"wrote {out / 'train.json'}")
    return 0
