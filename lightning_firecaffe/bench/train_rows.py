"""The rows ``firecaffe-bench train`` can run: one entry per configuration, by name.

A row is a worker (Lightning's :mod:`.train_worker`, or a plain torch loop, :mod:`.torch_ddp_worker`) and
its options: strategy kwargs for Lightning rows, the torch worker's flags for torch rows. A new mode joins
the benchmark as one entry here. A firecaffe row whose options the installed ``FireCaffeStrategy`` does
not name (or refuses) is reported 'not available in this build' instead of running: an unknown keyword
would otherwise be passed on to torch's DDP, and ``model_averaging_period`` is accepted and ignored by
Lightning's DDP on CPU.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

LIGHTNING, TORCH = "lightning", "torch"
LIMIT = "limit"


@dataclass(frozen=True)
class Row:
    name: str
    worker: str  # LIGHTNING or TORCH
    strategy: str = "firecaffe"  # Lightning rows: "ddp" or "firecaffe"
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    periodic: int = 0  # extra work every so many steps (an average): timed by the mean step, not the median

    def worker_args(self) -> list[str]:
        """The worker module and the row's own arguments (the workload's are added by the benchmark)."""
        if self.worker == TORCH:
            flags = [a for k, v in self.options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
            return ["-m", "lightning_firecaffe.bench.torch_ddp_worker", *flags]  # its result names the torch setup
        args = ["-m", "lightning_firecaffe.bench.train_worker", "--strategy", self.strategy, "--label", self.name]
        options = dict(self.options)
        if "algorithm" in options:
            args += ["--algorithm", str(options.pop("algorithm"))]
        if options:
            args += ["--strategy-kwargs", json.dumps(options)]
        return args


def _row(name: str, worker: str, periodic: int = 0, strategy: str = "firecaffe", **options: Any) -> Row:
    return Row(name, worker, strategy, MappingProxyType(options), periodic)


ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        _row("ddp", LIGHTNING, strategy="ddp"),
        _row(LIMIT, TORCH, hook="noop"),  # no communication: the ceiling of any gradient sync on these ranks
        _row("torch-ddp", TORCH, hook="none"),
        _row("torch-bf16", TORCH, hook="bf16"),
        _row("torch-fp16", TORCH, hook="fp16"),
        _row("torch-powersgd", TORCH, hook="powersgd", powersgd_rank=4, powersgd_start=2),
        _row("torch-localsgd", TORCH, periodic=8, hook="localsgd", period=8, localsgd_start=2),
        _row("firecaffe-bf16", LIGHTNING, compression="bf16"),
        _row("firecaffe-powersgd", LIGHTNING, compression="powersgd", powersgd_rank=4, powersgd_start_step=2),
        _row("firecaffe-localsgd", LIGHTNING, periodic=8, model_averaging_period=8, averaging_start_step=2),
    )
}


def firecaffe_row(algorithm: str, compression: str | None = None) -> Row:
    """The classic rows: strategy=firecaffe with one algorithm (``auto:measure``: auto with measured links)."""
    name = f"firecaffe:{algorithm}" + (f"+{compression}" if compression else "")
    name_of_algorithm, _, link = algorithm.partition(":")
    options = {"algorithm": name_of_algorithm} | ({"link": link} if link else {})
    options |= {"compression": compression} if compression else {}
    return Row(name, LIGHTNING, "firecaffe", MappingProxyType(options))


def select_rows(algorithms: list[str], compression: str | None, extra: list[str]) -> list[Row]:
    """Default rows (ddp, limit, firecaffe per algorithm, torch's compress hook and plain torch DDP with
    ``compression``) then the named ``extra`` rows, each once, in that order."""
    unknown = [n for n in extra if n not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    rows = [ROWS["ddp"], ROWS[LIMIT], *(firecaffe_row(a, compression) for a in algorithms)]
    if compression:
        rows += [ROWS[f"torch-{compression}"], ROWS["torch-ddp"]]
    rows += [ROWS[n] for n in extra]
    return list({r.name: r for r in rows}.values())


def unavailable(row: Row, strategy_class: Any = None) -> str | None:
    """Why this build cannot run ``row`` (an option ``FireCaffeStrategy`` does not name or refuses), else None."""
    if row.worker != LIGHTNING or row.strategy != "firecaffe":
        return None
    if strategy_class is None:
        from ..strategy import FireCaffeStrategy as strategy_class
    named = set(inspect.signature(strategy_class).parameters)
    missing = [k for k in row.options if k not in named]
    if missing:
        return f"FireCaffeStrategy has no option {', '.join(missing)}"
    try:
        strategy_class(**row.options)
    except (TypeError, ValueError) as exc:  # InvalidOption is a ValueError
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None
