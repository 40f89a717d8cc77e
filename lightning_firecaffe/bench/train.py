"""``firecaffe-bench train`` (placeholder until the training benchmark lands)."""

from __future__ import annotations

import argparse


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench_results")


def run_train_bench(args: argparse.Namespace) -> int:
    raise SystemExit("firecaffe-bench train: not implemented yet")
