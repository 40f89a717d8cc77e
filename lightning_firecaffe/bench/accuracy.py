"""``firecaffe-bench accuracy``: time to accuracy of the real app, configuration by configuration.

Each configuration is a name and a list of Hydra overrides of ``firecaffe-train``; for every configuration
and seed the benchmark runs the app (shards, DataModule, callbacks, strategy) on loopback or on the
emulated cluster (one rank per host), reads validation top-1 against training wall-clock from the run's
CSV log (``TrainingClock``), and reports time to a target top-1 and the speedups
(:mod:`.time_to_accuracy`), as JSON and a PNG. A new strategy option is a new row: ``--config 'name:
override override ...'``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from .time_to_accuracy import Point, Run, compare, format_table, read_curve

DIVERGED_EXIT_CODE = 3  # lightning_firecaffe.train.DIVERGED_EXIT_CODE (not imported: it pulls in Hydra's app)
REFERENCE_BATCH = 32  # the demo's reference batch: model.lr is tuned there
MULTIPLES = (4, 8, 16)
DDP_MULTIPLES = (4, 8, 16)  # ddp with the same preset at these multiples: the batch's share of a speedup
#: the modes that cut synchronisations or bytes far beyond 16 bits, each a row at 4x (the user's choice, never auto's)
NEAR_LIMIT = {
    "powersgd": ("strategy.compression=powersgd", "strategy.powersgd_rank=4"),
    "localsgd": ("strategy.model_averaging_period=8",),
}


@dataclass(frozen=True)
class Configuration:
    name: str
    overrides: tuple[str, ...]


def parse_configuration(text: str) -> Configuration:
    """``"name: override override ..."`` (shell quoting allowed) -> a configuration."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() for c in name):
        raise ValueError(f"configuration {text!r}: expected 'name: override override ...'")
    return Configuration(name, tuple(shlex.split(rest)))


def large_batch_preset(multiple: int, reference_batch: int = REFERENCE_BATCH) -> tuple[str, ...]:
    """The firecaffe large-batch preset at ``multiple`` x the reference batch, with the demo's LR at the
    reference batch (model.lr) and a warm-up in steps (the demo's epochs are short)."""
    return (
        f"global_batch_size={multiple * reference_batch}",
        "callbacks.large_batch.preset=firecaffe",
        f"callbacks.large_batch.reference_batch={reference_batch}",
        "callbacks.large_batch.base_lr=${model.lr}",
        "callbacks.large_batch.weight_decay=${model.weight_decay}",
        "callbacks.large_batch.unit=step",
        "callbacks.large_batch.warmup_per_multiple=2",
    )


def default_configurations(reference_batch: int = REFERENCE_BATCH) -> list[Configuration]:
    """ddp at the reference batch (the baseline), firecaffe there, the preset at 4x, 8x and 16x alone and
    with bf16 gradients, low-rank gradients and local SGD at 4x, and ddp with the same preset at 4x, 8x and
    16x (the batch's share of a speedup)."""
    rows = [
        Configuration("ddp", ("strategy=ddp", f"global_batch_size={reference_batch}")),
        Configuration("firecaffe", (f"global_batch_size={reference_batch}",)),
    ]
    for k in MULTIPLES:
        preset = large_batch_preset(k, reference_batch)
        rows.append(Configuration(f"firecaffe_{k}x", preset))
        rows.append(Configuration(f"firecaffe_{k}x_bf16", (*preset, "strategy.compression=bf16")))
    preset = large_batch_preset(4, reference_batch)
    rows += [Configuration(f"firecaffe_4x_{mode}", (*preset, *overrides)) for mode, overrides in NEAR_LIMIT.items()]
    rows += [
        Configuration(f"ddp_{k}x", ("strategy=ddp", *large_batch_preset(k, reference_batch))) for k in DDP_MULTIPLES
    ]
    return rows


def same_batch_rows(configs: list[Configuration]) -> dict[str, str]:
    """Each firecaffe row -> the ddp row with the same ``global_batch_size`` override, if there is one."""

    def batch(c: Configuration) -> str | None:
        return next((o.split("=", 1)[1] for o in c.overrides if o.startswith("global_batch_size=")), None)

    ddp = {batch(c): c.name for c in configs if "strategy=ddp" in c.overrides}
    return {c.name: ddp[batch(c)] for c in configs if "strategy=ddp" not in c.overrides and batch(c) in ddp}


def max_time(seconds: int) -> str:
    """Lightning's ``DD:HH:MM:SS`` (two digits each: a budget of 900 s is ``00:00:15:00``)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def common_overrides(args: argparse.Namespace) -> list[str]:
    """What every run shares: the budget, validation every ``--val-every`` of an epoch, no checkpoints."""
    seconds = int(args.budget_s)
    return [
        "task_name=accuracy",
        f"model.lr={args.lr}",
        f"trainer.max_epochs={args.max_epochs}",
        f"+trainer.max_time='{max_time(seconds)}'",
        f"+trainer.val_check_interval={args.val_every}",
        "trainer.log_every_n_steps=1",
        "callbacks.large_batch.decay=constant",
        "~callbacks.checkpoint",
        "+trainer.enable_checkpointing=false",
        "callbacks.progress_bar.refresh_rate=0",
    ]


def _app_argv(config: Configuration, seed: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    where = (
        ["trainer.devices=1", f"trainer.num_nodes={args.hosts}"] if args.hosts else [f"trainer.devices={args.devices}"]
    )
    if args.demo:
        where.append(f"paths.demo={args.demo}")
    return [
        sys.executable,
        "-m",
        "lightning_firecaffe.train",
        f"hydra.run.dir={run_dir}",
        f"seed={seed}",
        *common_overrides(args),
        *where,
        *config.overrides,
    ]


def run_one(config: Configuration, seed: int, run_dir: Path, args: argparse.Namespace, cluster=None) -> Run:
    """One seed of one configuration through the real app; its curve from the run's CSV log."""
    argv = _app_argv(config, seed, run_dir, args)
    timeout = args.budget_s + args.startup_s
    if cluster is not None:
        results = cluster.run(argv, timeout=timeout, backend=None, check=False)
        code = results[0].returncode
        output = (results[0].stderr or "") + (results[0].stdout or "")
    else:
        from ..testing.ranks import run_launcher_script

        proc = run_launcher_script(argv[1:], timeout=timeout)
        code, output = proc.returncode, proc.stderr + proc.stdout
    metrics = run_dir / "csv" / "metrics.csv"
    points = read_curve(str(metrics)) if metrics.exists() else []
    diverged = code == DIVERGED_EXIT_CODE
    message = next((line for line in output.splitlines() if "training diverged" in line), "")
    if code not in (0, DIVERGED_EXIT_CODE):
        raise RuntimeError(f"{config.name} seed {seed} failed (exit {code}):\n{output[-4000:]}")
    return Run(config.name, seed, points, exit_code=code or 0, diverged=diverged, message=message)


def _progress(run: Run, done: int, total: int, started: float) -> str:
    final = f"{100 * run.final_top1:.1f} %" if run.final_top1 is not None else "-"
    rate = f"{run.images_per_s:.0f} img/s" if run.images_per_s else "-"
    state = "DIVERGED" if run.diverged else f"final top-1 {final}"
    last = run.points[-1].seconds if run.points else 0.0
    return (
        f"[{done}/{total}, {time.monotonic() - started:.0f} s] {run.config} seed {run.seed}: {state}, "
        f"{len(run.points)} validations over {last:.0f} s of training, {rate}"
    )


def run_accuracy_bench(args: argparse.Namespace) -> int:
    from ..data import build_demo_set

    if args.report:
        return re_report(args)
    configs = [] if args.no_defaults else default_configurations()
    configs += [parse_configuration(text) for text in args.config or []]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c.name for c in configs})
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {', '.join(unknown)}")
        configs = [c for c in configs if c.name in wanted]
    names = [c.name for c in configs]
    if len(set(names)) != len(names) or args.baseline not in names:
        raise SystemExit(f"configurations {names}: names must be unique and include the baseline {args.baseline!r}")
    seeds = list(range(args.seeds))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    build_demo_set(args.demo)  # once, before any rank starts
    runs: list[Run] = []
    started = time.monotonic()
    with ExitStack() as stack:
        cluster = None
        if args.hosts:
            from ..testing.cluster import EmulatedCluster, require_root

            require_root()
            cluster = stack.enter_context(EmulatedCluster(hosts=args.hosts, rate=args.hosts_rate))
        total = len(configs) * len(seeds)
        for seed in seeds:  # seed-major: a drift of the machine's speed spreads over every configuration
            for config in configs:
                run = run_one(config, seed, out / "runs" / config.name / f"seed{seed}", args, cluster)
                runs.append(run)
                print(_progress(run, len(runs), total, started), flush=True)
    where = f"emulated cluster, {args.hosts} hosts, {args.hosts_rate} links" if args.hosts else "loopback"
    report(runs, configs, args, out, where, common_overrides(args))
    return 0


def report(
    runs: list[Run],
    configs: list[Configuration],
    args: argparse.Namespace,
    out: Path,
    where: str,
    common: list[str],
    argv: list[str] | None = None,
) -> None:
    """Summarise ``runs``: print the table, write ``accuracy.json`` (every curve included) and the PNG."""
    from .plots import plot_time_to_accuracy

    target, summaries = compare(runs, args.baseline, args.target, same_batch_rows(configs))
    seeds = sorted({r.seed for r in runs})
    table = format_table(target, summaries, args.baseline)
    print(f"\n{where}; budget {args.budget_s:g} s of training per run, {len(seeds)} seeds\n{table}")
    document = {
        "where": where,
        "argv": argv if argv is not None else sys.argv[1:],
        "budget_s": args.budget_s,
        "target": target,
        "baseline": args.baseline,
        "common_overrides": common,
        "configurations": [asdict(c) for c in configs],
        "summaries": [asdict(s) for s in summaries],
        "runs": [asdict(r) for r in runs],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(document, indent=1))
    plot_time_to_accuracy(runs, target, out / "accuracy.png", title=f"NiN on the demo set, {where}")
    print(f"wrote {out / 'accuracy.json'} and {out / 'accuracy.png'}")


def re_report(args: argparse.Namespace) -> int:
    """``--report FILE``: summarise the runs of an earlier ``accuracy.json`` again (another ``--target`` or
    ``--baseline``) without running anything."""
    doc = json.loads(Path(args.report).read_text())
    runs = [Run(**{**r, "points": [Point(**p) for p in r["points"]]}) for r in doc["runs"]]
    configs = [Configuration(c["name"], tuple(c["overrides"])) for c in doc["configurations"]]
    args.budget_s = doc.get("budget_s", args.budget_s)
    report(runs, configs, args, Path(args.out).resolve(), doc["where"], doc["common_overrides"], doc["argv"])
    return 0


def add_accuracy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per configuration")
    parser.add_argument("--budget-s", type=float, default=30, help="training budget per run (Trainer max_time)")
    parser.add_argument("--max-epochs", type=int, default=20, help="upper bound on epochs (the LR plan's length)")
    parser.add_argument("--val-every", type=float, default=0.05, help="validate every this fraction of an epoch")
    parser.add_argument("--lr", type=float, default=0.003, help=f"model.lr at the reference batch {REFERENCE_BATCH}")
    parser.add_argument("--target", type=float, default=None, help="target top-1 (fraction); default: baseline - 0.005")
    parser.add_argument("--baseline", default="ddp", help="the configuration speedups are measured against")
    parser.add_argument(
        "--config",
        action="append",
        help="an extra configuration 'name: override override ...' (repeatable), e.g. "
        "'arity3: global_batch_size=32 strategy.algorithm=tree strategy.arity=3'",
    )
    parser.add_argument("--only", default=None, help="run only these configurations (comma-separated names)")
    parser.add_argument("--no-defaults", action="store_true", help="only the --config rows")
    parser.add_argument("--devices", type=int, default=4, help="ranks on loopback (without --hosts)")
    parser.add_argument("--hosts", type=int, default=None, help="run on an emulated cluster of N hosts (root)")
    parser.add_argument("--hosts-rate", default="1gbit", help="link rate of the emulated cluster")
    parser.add_argument("--demo", default=None, help="demo shards folder (default: the cache)")
    parser.add_argument("--startup-s", type=float, default=240, help="allowance per run beyond the budget")
    parser.add_argument("--report", default=None, help="re-summarise an earlier accuracy.json instead of running")
    parser.add_argument("--out", default="bench_results/accuracy")
