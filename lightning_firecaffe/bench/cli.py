"""``firecaffe-bench``: ``comm`` (measure all-reduce), ``plan`` (predict scaling), ``train`` (end to end),
``accuracy`` (time to accuracy of the real app)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from ..comm.cost_model import LinkModel
from ..comm.schedules import algorithm_names
from ..units import parse_rate_bytes_per_s, parse_size


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def comm_algorithms(text: str) -> list[str]:
    """``--algorithms`` of ``comm``: ``all`` (auto, every registered algorithm, torch's) or a checked list."""
    from .comm import TORCH

    known = ("auto", *algorithm_names(), TORCH)
    algorithms = list(known) if text == "all" else _csv(text)
    for a in algorithms:
        if a not in known:
            raise SystemExit(f"--algorithms: unknown {a!r}; choose from {', '.join(known)}")
    return algorithms


def model_shapes(model: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a registered model as the benchmarks build it (1000 classes)."""
    from .plan import build_workload_model

    return [tuple(p.shape) for p in build_workload_model(model).parameters() if p.requires_grad]


def message_sizes_of(text: str, shapes_of=model_shapes) -> tuple[list[int], list[str]]:
    """``--sizes`` of ``comm``: plain sizes (``64KB``) and ``powersgd:MODEL:RANK[:MIN_RATE]``, the distinct
    P and Q message bytes of MODEL's DDP buckets at that rank (fp32, P with the uncompressed tensors).
    Returns the sorted sizes and a line per expanded spec saying which message is which."""
    from ..comm.low_rank_sizes import message_sizes

    sizes, notes = set(), []
    for token in _csv(text):
        kind, _, rest = token.partition(":")
        if kind != "powersgd":
            sizes.add(parse_size(token))
            continue
        model, _, rank_text = rest.partition(":")
        rank_text, _, rate = rank_text.partition(":")
        if not model or not rank_text.isdigit():
            raise SystemExit(f"--sizes: {token!r}: expected powersgd:MODEL:RANK[:MIN_RATE], e.g. powersgd:nin:4")
        messages = message_sizes(shapes_of(model), int(rank_text), float(rate or 2.0))
        sizes.update(n for pq in messages for n in pq if n)
        notes.append(f"{token}: " + "; ".join(f"bucket {i}: P {p:,} B, Q {q:,} B" for i, (p, q) in enumerate(messages)))
    return sorted(sizes), notes


def cmd_comm(args: argparse.Namespace) -> int:
    from .comm import CommSpec, format_table, measure, save

    algorithms = comm_algorithms(args.algorithms)
    sizes, notes = message_sizes_of(args.sizes)
    for note in notes:
        print(note)
    spec = CommSpec(
        sizes=sizes,
        algorithms=algorithms,
        reps=args.reps,
        arity=args.arity,
        chunk_bytes=parse_size(args.chunk),
        ranks_per_node=args.ranks_per_host,
        compression=args.compression,
    )
    reports = []
    for world in [int(w) for w in _csv(args.world_sizes)]:
        if args.hosts_rate is None:
            from ..testing.ranks import first_result, run_ranks

            reports.append(first_result(run_ranks(measure, world, spec, timeout=args.timeout)))
            where = "loopback"
        else:
            from .cluster_runs import measure_on_cluster

            reports.append(measure_on_cluster(spec, world, args.hosts_rate, args.ranks_per_host, args.timeout))
            where = f"emulated cluster, {args.hosts_rate} links"
        print(format_table([reports[-1]]), flush=True)
    meta = {"where": where, "python": platform.python_version(), "argv": sys.argv[1:], "sizes": notes}
    save(reports, Path(args.out) / "comm.json", Path(args.out) / "comm.png", meta)
    print(f"wrote {Path(args.out) / 'comm.json'} and {Path(args.out) / 'comm.png'}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import Workload, build_workload_model, format_plan, gradient_bytes, plan_table, speedup_curves
    from .plots import plot_speedup

    module = None if args.model.isdigit() else build_workload_model(args.model)
    name = f"{int(args.model):,} parameters" if module is None else args.model
    grad_bytes = 4 * int(args.model) if module is None else gradient_bytes(module)
    seconds_per_image = 1.0 / args.images_per_s
    if args.measure_compute:
        from .plan import measure_seconds_per_image

        if module is None:
            raise SystemExit("--measure-compute needs a model (a registered name or package.module:Class)")
        seconds_per_image = measure_seconds_per_image(module, args.image_size)
        print(f"measured forward+backward on this machine: {1e3 * seconds_per_image:.2f} ms per image")
    workload = Workload(name, grad_bytes, seconds_per_image)
    link = LinkModel(
        latency_s=args.latency_us * 1e-6,
        bandwidth_Bps=parse_rate_bytes_per_s(args.bandwidth),
        ranks_per_node=args.gpus_per_node,
    )
    batches = [int(b) for b in _csv(args.batches)]
    shapes = None if module is None else [tuple(p.shape) for p in module.parameters() if p.requires_grad]
    chunk = parse_size(args.chunk)
    rows = plan_table(workload, args.gpus, link, batches, shapes=shapes, chunk_bytes=chunk)
    print(format_plan(rows, workload, link))
    curves = speedup_curves(workload, args.plot_batch, link, args.max_gpus, shapes=shapes, chunk_bytes=chunk)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_speedup(curves, out / "plan.png", title=f"{name}, {args.plot_batch} images/GPU, {args.bandwidth} links")
    (out / "plan.json").write_text(
        json.dumps(
            {
                "workload": workload.__dict__,
                "link": link.__dict__,
                "table": [r.__dict__ | {"speedup": r.speedup, "efficiency": r.efficiency} for r in rows],
                "curves": curves,
            },
            indent=2,
        )
    )
    print(f"wrote {out / 'plan.png'} and {out / 'plan.json'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run_train_bench

    return run_train_bench(args)


def cmd_accuracy(args: argparse.Namespace) -> int:
    from .accuracy import run_accuracy_bench

    return run_accuracy_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firecaffe-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    comm = sub.add_parser("comm", help="time every all-reduce algorithm vs dist.all_reduce")
    comm.add_argument("--world-sizes", default="2,4", help="comma-separated, e.g. 2,4,8")
    comm.add_argument(
        "--sizes",
        default="4KB,1MB,25MB",
        help="message sizes, e.g. 1KB,1MB,25MB; powersgd:MODEL:RANK[:MIN_RATE] adds the P and Q message sizes "
        "of MODEL's DDP buckets at that rank (e.g. powersgd:nin:4)",
    )
    comm.add_argument(
        "--algorithms", default="all", help=f"'all' or a list from auto,{','.join(algorithm_names())},dist.all_reduce"
    )
    comm.add_argument("--reps", type=int, default=5)
    comm.add_argument("--arity", type=int, default=2)
    comm.add_argument("--chunk", default="1MiB", help="chunk size of the pipelined algorithms")
    comm.add_argument(
        "--hosts-rate",
        default=None,
        help="run on an emulated cluster (one network namespace per host, links shaped to this rate, e.g. "
        "1gbit; needs root). Added latency cannot be emulated on this kernel (no netem). Default: loopback",
    )
    comm.add_argument("--ranks-per-host", type=int, default=1)
    comm.add_argument(
        "--compression",
        default=None,
        choices=["bf16", "fp16"],
        help="every algorithm sends 16-bit values; adds a row for torch's compress hook on torch DDP",
    )
    comm.add_argument("--timeout", type=float, default=600)
    comm.add_argument("--out", default="bench_results")
    comm.set_defaults(fn=cmd_comm)

    plan = sub.add_parser("plan", help="predict communication, speedup and efficiency on a cluster")
    plan.add_argument(
        "--model",
        default="googlenet",
        help="a registered model (see --help of train), package.module:Class or #parameters",
    )
    plan.add_argument("--gpus", type=int, default=128)
    plan.add_argument("--gpus-per-node", type=int, default=1)
    plan.add_argument("--images-per-s", type=float, default=300.0, help="training images/s of one GPU")
    plan.add_argument("--measure-compute", action="store_true", help="time forward+backward here instead")
    plan.add_argument("--image-size", type=int, default=224, help="with --measure-compute")
    plan.add_argument("--bandwidth", default="56gbit", help="per-node link, e.g. 1gbit, 10gbit, 56gbit")
    plan.add_argument("--latency-us", type=float, default=5.0)
    plan.add_argument("--batches", default="8,16,32,64,128", help="per-GPU batch sizes for the table")
    plan.add_argument(
        "--plot-batch", type=int, default=8, help="per-GPU batch of the speedup plot (FireCaffe: 1024 over 128 GPUs)"
    )
    plan.add_argument("--max-gpus", type=int, default=1024)
    plan.add_argument("--chunk", default="1MiB")
    plan.add_argument("--out", default="bench_results")
    plan.set_defaults(fn=cmd_plan)

    train = sub.add_parser("train", help="steps/s of strategy=firecaffe (each algorithm) vs ddp")
    from .train import add_train_arguments

    add_train_arguments(train)
    train.set_defaults(fn=cmd_train)

    accuracy = sub.add_parser(
        "accuracy", help="time to a target top-1 of firecaffe-train per configuration (Hydra overrides) and seed"
    )
    from .accuracy import add_accuracy_arguments

    add_accuracy_arguments(accuracy)
    accuracy.set_defaults(fn=cmd_accuracy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
