"""``firecaffe-train``: the Hydra app. Compose the config, check it, build everything, fit, report.

    firecaffe-train                                   # the embedded demo: NiN, demo shards, 2 CPU processes
    firecaffe-train model=googlenet trainer.max_epochs=2 strategy.algorithm=ring
    firecaffe-train experiment=paper_googlenet_1024 paths.imagenet=/data/imagenet-wds trainer=gpu
    firecaffe-train -m hydra/launcher=submitit_slurm trainer.devices=2    # on SLURM
    python -m lightning_firecaffe.train --cfg job                         # print the composed config

The configs live in ``conf/`` at the repository root and ship inside the package as
``lightning_firecaffe/conf`` (a symlink in the source tree, regular files in a wheel). This module only
composes, validates and instantiates (:func:`lightning_firecaffe.app_checks.build`: every group is built
before launch, so each constructor checks its own settings) and calls ``fit``; all behaviour lives in the
objects the configs name.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, read_write

from . import app_checks
from .large_batch import TrainingDiverged
from .process_groups import end_process_groups

DIVERGED_EXIT_CODE = 3  # the divergence guard stopped the run (LargeBatchScaling, callbacks.large_batch.guard)
CONFIG_PATH = "conf"  # relative to this file: lightning_firecaffe/conf -> ../conf
CONFIG_NAME = "config"
CONFIG_DIR = str(Path(__file__).resolve().parent / CONFIG_PATH)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class _JobIsolation:
    """A job that succeeded ends its process group (:func:`end_process_groups`: gloo may abort the process at exit
    otherwise). Under ``-m`` the basic launcher runs the jobs one after another in this process: undo what
    a job's launch left behind (``sys.argv``, ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT``..., the process
    group, even after a failure), or the next job's Trainer would think its processes are created externally
    and wait for dead peers."""

    def __enter__(self) -> None:
        self.active = _in_multirun()
        if self.active:
            self.argv, self.environ = list(sys.argv), dict(os.environ)
            _child_argv_for_multirun()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None or self.active:
            end_process_groups()
        if not self.active:
            return
        sys.argv[:] = self.argv
        os.environ.clear()
        os.environ.update(self.environ)


def _child_argv_for_multirun() -> None:
    """Under ``-m`` with the basic launcher, Lightning's popen launcher would re-run ``sys.argv`` (the whole
    sweep) in each child process. Give the children this job's overrides instead, and the job's output
    directory as their run dir, so that they compose the same config and write into the same directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    flags, args, i = [], sys.argv[1:], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-m", "--multirun"):
            pass
        elif arg in ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir") and i + 1 < len(args):
            flags += [arg, args[i + 1]]
            i += 1
        elif arg.startswith("-"):
            flags.append(arg)
        i += 1
    skip = ("hydra.mode", "hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper", "hydra.sweep")
    hydra_overrides = [o for o in hc.overrides.hydra if not o.lstrip("+~").startswith(skip)]
    sys.argv[1:] = flags + hydra_overrides + list(hc.overrides.task)
    with read_write(hc.run):  # Lightning passes HydraConfig.get().run.dir to the children
        hc.run.dir = hc.runtime.output_dir


class RankReport(Callback):
    """Writes ``<dir>/rank<N>.json`` per rank at the end of training: how it ran (strategy, cluster
    environment, world size, SLURM variables, the DDP comm hook) - for checking a launch from outside."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model
        stats = getattr(trainer.strategy, "comm_stats", None)
        hook = ddp._get_ddp_logging_data().get("comm_hook") if hasattr(ddp, "_get_ddp_logging_data") else None
        facts = {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
            "global_step": trainer.global_step,
            "comm_hook": hook,
            "bytes_sent": stats.totals.bytes_sent if stats is not None else None,
            # what the gradient all-reduce ran with: bucket bytes -> algorithm, ranks per node (two_level)
            "algorithms": {str(k): v for k, v in sorted(stats.algorithms.items())} if stats is not None else None,
            "ranks_per_node": _ranks_per_node(trainer.strategy),
            "weights_sha256": _weights_digest(pl_module),  # bitwise comparisons between runs
            "gradient_bytes": sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad),
            "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            **{f"slurm_{k.lower()}": os.environ.get(f"SLURM_{k}") for k in ("JOB_ID", "PROCID", "NTASKS", "LOCALID")},
        }
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(facts, f, indent=1)


def _weights_digest(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _ranks_per_node(strategy) -> int | None:
    state = getattr(strategy, "_hook_state", None)
    return state.selector.link.ranks_per_node if state is not None else None


def _metric(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _comm_summary(trainer) -> dict[str, Any] | None:
    stats = getattr(trainer.strategy, "comm_stats", None)
    from .strategy import FireCaffeStrategy

    if stats is None or not isinstance(trainer.strategy, FireCaffeStrategy):
        return None
    t = stats.totals
    return {
        "algorithm": trainer.strategy.algorithm,
        "steps": t.steps,
        "busy_s": t.busy_s,
        "exposed_s": t.exposed_s,
        "mb_sent": t.bytes_sent / 1e6,
        "mb_received": t.bytes_received / 1e6,
        "wire_format": stats.wire_format,
        "mb_saved": t.bytes_saved / 1e6,
        "skipped_steps": len(stats.skipped_steps),
        "buckets": {str(k): v for k, v in sorted(stats.algorithms.items())},
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg`` by building the objects it names, fit (and test when asked); returns the run's summary."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden

    import lightning_firecaffe  # noqa: F401  (registers strategy names for trainer.strategy strings)

    app_checks.register_resolvers()  # again: a submitit job runs this function without main()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model's weights are drawn
    built = app_checks.build(cfg)  # every group, each checked by its constructor, before anything is launched
    model, datamodule = built.model, built.data  # the demo data writes its shards on first use, once
    output_dir = str(cfg.paths.output_dir)
    callbacks = list(built.callbacks.values())
    if cfg.get("rank_reports"):
        callbacks.append(RankReport(os.path.join(output_dir, "ranks")))
    loggers = list(built.loggers.values())
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, strategy=built.strategy, callbacks=callbacks, logger=loggers or False
    )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last":
        ckpt_path = os.path.join(output_dir, "checkpoints", "last.ckpt")

    with _JobIsolation():
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_s = time.perf_counter() - start
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if "val/top1" not in metrics and trainer.num_val_batches:  # stopped mid-epoch (max_steps): validate
            trainer.validate(model, datamodule=datamodule, verbose=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        if cfg.get("test"):
            if is_overridden("test_dataloader", datamodule):
                trainer.test(model, datamodule=datamodule, ckpt_path="best" if trainer.checkpoint_callback else None)
                metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")})
            elif trainer.is_global_zero:
                print(f"test=true: {type(datamodule).__name__} has no test set; the validation set was used in fit")
        summary = _summary(trainer, output_dir, fit_s, metrics)
    if trainer.is_global_zero:
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(report(summary), flush=True)
    return summary


def _summary(trainer, output_dir: str, fit_s: float, metrics: dict[str, float]) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    return {
        "output_dir": os.path.abspath(output_dir),
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "fit_seconds": fit_s,
        "val_top1": _metric(metrics, "val/top1"),
        "val_top5": _metric(metrics, "val/top5"),
        "metrics": metrics,
        "communication": _comm_summary(trainer),
        "loggers": {type(lg).__name__: os.path.abspath(lg.log_dir) for lg in trainer.loggers if lg.log_dir},
        "checkpoints": os.path.abspath(checkpoint.dirpath) if checkpoint and checkpoint.dirpath else None,
        "best_checkpoint": os.path.abspath(checkpoint.best_model_path)
        if checkpoint and checkpoint.best_model_path
        else None,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report(s: dict[str, Any]) -> str:
    lines = [
        "",
        f"firecaffe-train: {s['global_step']} steps on {s['world_size']} processes ({s['strategy']}) "
        f"in {s['fit_seconds']:.1f} s",
        f"  final validation top-1 {_pct(s['val_top1'])}, top-5 {_pct(s['val_top5'])}",
    ]
    c = s["communication"]
    if c:
        lines.append(
            f"  gradient communication ({c['algorithm']}, rank 0): {c['busy_s']:.2f} s over {c['steps']} steps "
            f"({1e3 * c['busy_s'] / max(1, c['steps']):.1f} ms/step; {c['exposed_s']:.2f} s not hidden behind "
            f"backward), {c['mb_sent']:.1f} MB sent"
            + (f" as {c['wire_format']} ({c['mb_saved']:.1f} MB saved)" if c.get("wire_format") else "")
        )
    else:
        lines.append(f"  gradient communication: not measured ({s['strategy']} is not FireCaffeStrategy)")
    lines.append(f"  run directory: {s['output_dir']}  (config in .hydra/, summary.json)")
    for name, path in s["loggers"].items():
        lines.append(f"  logs ({name}): {path}")
    if s["checkpoints"]:
        lines.append(
            f"  checkpoints: {s['checkpoints']}"
            + (f"  (best: {os.path.basename(s['best_checkpoint'])})" if s["best_checkpoint"] else "")
        )
    return "\n".join(lines)


def _diverged_cause(exc: BaseException | None) -> TrainingDiverged | None:
    """The divergence guard's exception behind ``exc``, if any. Lightning's teardown after an exception ends
    the DataLoader workers, and torch's SIGCHLD handler then raises its own error on top of ours."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TrainingDiverged):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except app_checks.ConfigError as exc:  # no traceback: the message names the keys to change
        print(f"firecaffe-train: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as exc:
        diverged = _diverged_cause(exc)
        if diverged is None:
            raise
        # the divergence guard: the message names the step, the LR and the settings to change
        print(f"firecaffe-train: {diverged}", file=sys.stderr, flush=True)
        raise SystemExit(DIVERGED_EXIT_CODE) from None
    return summary["val_top1"]  # the objective for Hydra sweepers


def main() -> None:
    """Console script ``firecaffe-train``; ``python -m lightning_firecaffe.train``."""
    # conf/hydra/launcher/submitit_slurm.yaml lists every key of the plugin's schema of the same name (to wire
    # tasks_per_node/nodes); Hydra 1.3 still matches the two and warns that it will stop doing so: harmless.
    warnings.filterwarnings("ignore", message=".*validated against ConfigStore schema with the same name")
    app_checks.register_resolvers()  # ${per_device_batch:...}, ${run_id:}: before Hydra resolves the run dir
    _hydra_main()


if __name__ == "__main__":
    main()
