"""CLI: ``python -m lightning_firecaffe.testing.cluster up|down|run|list|check``.

up    --hosts 4 --rate 1gbit          build a cluster and leave it up; prints its description (JSON)
down  RUN_ID | --all                  remove one cluster, or every one left behind (prefix fcn-)
run   --hosts 4 --rate 1gbit -- CMD   build a cluster, run CMD once per rank inside its host's namespace
                                      (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, GLOO_SOCKET_IFNAME
                                      set), print each rank's output, tear down; exit code = worst rank's
run   --attach RUN_ID -- CMD          the same on a cluster made by `up` (left up)
list                                  clusters present
check                                 can a cluster be built here? (exit 0 or 1 with the reason)
"""

from __future__ import annotations

import argparse
import json
import sys

from .netns import PREFIX, ClusterRunError, EmulatedCluster, can_emulate, down_all, list_runs

LATENCY_NOTE = (
    "Links are shaped for bandwidth only: added latency cannot be emulated on this kernel (no netem), so "
    "per-message latency is that of a veth pair (tens of microseconds). Needs root, `ip` and `tc`."
)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", type=int, default=4, help="number of hosts (network namespaces), default 4")
    p.add_argument(
        "--rate",
        default="1gbit",
        help="per-link rate, each direction, in bits/s as tc writes it: 100mbit, 1gbit, 10gbit; "
        "'none' = unshaped (default 1gbit)",
    )
    p.add_argument("--ranks-per-host", type=int, default=1, help="ranks per host (multi-GPU node), default 1")
    p.add_argument("--subnet", default="10.77.0", help="first three octets of the hosts' /24 (default 10.77.0)")
    p.add_argument("--burst", type=int, default=None, help="tbf burst in bytes (default 2 ms at rate, >= 64 KiB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_firecaffe.testing.cluster",
        description="Emulated cluster: N hosts as network namespaces joined by a Linux bridge, every link "
        "shaped with tc tbf in both directions. " + LATENCY_NOTE,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="build a cluster and leave it up", description=LATENCY_NOTE)
    _cluster_args(up)
    up.add_argument("--run-id", default=None, help="name suffix (default: random)")

    down = sub.add_parser("down", help="remove a cluster, or --all leftovers")
    down.add_argument("run_id", nargs="?", help="run id printed by `up`")
    down.add_argument(
        "--all",
        action="store_true",
        help=f"remove every cluster named {PREFIX}* (its processes too), even ones still in use",
    )

    run = sub.add_parser(
        "run", help="run a command once per rank on a (new or attached) cluster", description=LATENCY_NOTE
    )
    _cluster_args(run)
    run.add_argument("--attach", metavar="RUN_ID", default=None, help="use a cluster made by `up` (left up)")
    run.add_argument("--world-size", type=int, default=None, help="ranks to start (default hosts x ranks-per-host)")
    run.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds; ranks are killed then")
    run.add_argument("--quiet", action="store_true", help="do not print the ranks' output")
    run.add_argument("--stream", action="store_true", help="let ranks write straight to this terminal")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- command and arguments")

    sub.add_parser("list", help="list clusters present")
    sub.add_parser("check", help="can an emulated cluster be built here?")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        ok, reason = can_emulate()
        print(reason)
        return 0 if ok else 1
    if args.command == "list":
        print(json.dumps(list_runs(), indent=2))
        return 0
    if args.command == "down":
        if args.all == bool(args.run_id):
            print("down: give a RUN_ID or --all", file=sys.stderr)
            return 2
        removed = down_all(run_id=None if args.all else args.run_id)
        print(json.dumps({"removed": removed}))
        return 0
    if args.command == "up":
        cluster = EmulatedCluster(
            args.hosts,
            args.rate,
            args.ranks_per_host,
            subnet=args.subnet,
            run_id=args.run_id,
            burst=args.burst,
            keep=True,
        )
        cluster.up()
        print(json.dumps(cluster.describe(), indent=2))
        return 0

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        print("run: give a command after --", file=sys.stderr)
        return 2
    if args.attach:
        cluster = EmulatedCluster.attach(args.attach, ranks_per_host=args.ranks_per_host)
    else:
        cluster = EmulatedCluster(args.hosts, args.rate, args.ranks_per_host, subnet=args.subnet, burst=args.burst)
    try:
        cluster.up()
        print(
            f"# cluster {cluster.run_id}: {cluster.hosts} hosts x {cluster.ranks_per_host} ranks, links "
            f"{cluster.rate}, master {cluster.master_addr}",
            file=sys.stderr,
            flush=True,
        )
        try:
            results = cluster.run(
                command, world_size=args.world_size, timeout=args.timeout, check=False, capture=not args.stream
            )
        except ClusterRunError as exc:  # pragma: no cover - check=False
            results = exc.results
        for r in results:
            if not args.quiet and not args.stream:
                for stream, text in (("out", r.stdout), ("err", r.stderr)):
                    for line in (text or "").splitlines():
                        print(f"[rank {r.rank} {stream}] {line}", file=sys.stdout if stream == "out" else sys.stderr)
            state = "killed at deadline" if r.timed_out else ("killed" if r.killed else f"exit {r.returncode}")
            print(f"# rank {r.rank} (host {r.host}): {state} after {r.duration:.2f} s", file=sys.stderr)
        codes = [124 if r.timed_out else (r.returncode if r.returncode is not None else 137) for r in results]
        return next((c for c in codes if c != 0), 0)
    finally:
        if not args.attach:
            cluster.down()
        else:
            cluster._kill_procs()


def _entry() -> int:
    """Console-script entry point: Ctrl-C exits with 130 after teardown (SIGTERM/SIGHUP with 128 + signal)."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted; cluster torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_entry())
