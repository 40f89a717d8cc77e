"""Pre-launch checks and resolvers of ``firecaffe-train`` (the Hydra app in :mod:`lightning_firecaffe.train`).

Each setting has one owner. The constructors (strategy, model, callbacks, loggers, data) check their own
arguments and raise :class:`~lightning_firecaffe.options.InvalidOption`; :func:`build` builds every group
before any process starts and only adds the config key the error came from
(``strategy.arity=1 must be an integer >= 2``). What stays here are the checks that span config groups,
which no constructor can see: the global batch against the processes and accumulation, the warm-up against
the run length, the model's classes against the data's, and paths. Every problem is collected and reported
at once in a :class:`ConfigError`.

Resolvers (registered by :func:`register_resolvers`, which ``firecaffe-train`` calls; importing this module
changes nothing global):

* ``${per_device_batch:global,devices,num_nodes,accumulate}``: the per-device batch of a global batch;
* ``${run_id:}``: ``slurm-<job>-<step>`` inside a SLURM job step (every task of an ``srun`` writes to the
  same run directory), otherwise the local time ``YYYY-MM-DD_HH-MM-SS``.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from .options import InvalidOption, is_int


class ConfigError(ValueError):
    """An invalid config: the message lists every problem, each naming its config keys."""


# ------------------------------------------------------------------------------------------------ resolvers
def _per_device_batch(global_batch: Any, devices: Any, num_nodes: Any, accumulate: Any = 1) -> int:
    try:
        g, d, n, a = (int(v) for v in (global_batch, devices, num_nodes, accumulate))
    except (TypeError, ValueError):
        raise ConfigError(
            f"cannot split global_batch_size={global_batch!r} across trainer.devices={devices!r} x "
            f"trainer.num_nodes={num_nodes!r} x trainer.accumulate_grad_batches={accumulate!r}: all must be integers"
        ) from None
    parts = d * n * a
    if parts < 1 or g % parts:
        raise ConfigError(
            f"global_batch_size={g} does not divide across trainer.devices={d} x trainer.num_nodes={n} x "
            f"trainer.accumulate_grad_batches={a} (= {parts}); use a multiple of {parts}"
        )
    return g // parts


def _run_id() -> str:
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job and step:
        return f"slurm-{job}-{step}"
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


RESOLVERS = {"per_device_batch": _per_device_batch, "run_id": _run_id}


def register_resolvers() -> None:
    """Make the app's resolvers known to OmegaConf (idempotent: a name already registered is left as it is).

    Called by the app, not on import: a library import must not change OmegaConf's process-wide registry
    (another project's resolver of the same name would be shadowed, or refuse ours)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "run_id")


# ------------------------------------------------------------------------------------------------ helpers
def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _target(node: Any) -> str:
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


# ------------------------------------------------------------------------------------------------ cross-group checks
def problems(cfg: DictConfig) -> list[str]:
    """The problems of ``cfg`` that span config groups and need nothing built (an empty list when none)."""
    if not isinstance(cfg.get("trainer"), DictConfig):
        return ["the config has no trainer group (pick one: trainer=cpu or trainer=gpu)"]
    return _batch_split_problems(cfg) + _path_problems(cfg) + _class_problems(cfg)


def _batch_split_problems(cfg: DictConfig) -> list[str]:
    """global_batch_size must split evenly across trainer.devices x num_nodes x accumulate_grad_batches."""
    found: list[str] = []
    layout = {k: _get(cfg, f"trainer.{k}", 1) for k in ("devices", "num_nodes", "accumulate_grad_batches")}
    global_batch = _get(cfg, "global_batch_size")
    if not (is_int(global_batch) and global_batch >= 1):
        found.append(f"global_batch_size={global_batch!r} must be a positive integer")
    for key, value in layout.items():
        if not (is_int(value) and value >= 1):
            found.append(
                f"trainer.{key}={value!r} must be a positive integer (global_batch_size is split across "
                f"trainer.devices x trainer.num_nodes x trainer.accumulate_grad_batches)"
            )
    if not found:
        try:
            _per_device_batch(global_batch, *layout.values())
        except ConfigError as exc:
            found.append(str(exc))
    train_samples = _get(cfg, "data.train_samples")
    if is_int(global_batch) and is_int(train_samples) and global_batch > train_samples:
        found.append(f"global_batch_size={global_batch} is larger than data.train_samples={train_samples}")
    return found


def _path_problems(cfg: DictConfig) -> list[str]:
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "ImageNetShards" in _target(data) and _get(cfg, "paths.imagenet") is None:
        if "paths.imagenet" in OmegaConf.to_yaml(data, resolve=False):
            return ["paths.imagenet is not set: pass paths.imagenet=/path/to/imagenet-shards (or set $IMAGENET_SHARDS)"]
    return []


def _class_problems(cfg: DictConfig) -> list[str]:
    model_classes, data_classes = _get(cfg, "model.backbone.num_classes"), _get(cfg, "data.num_classes")
    if is_int(model_classes) and is_int(data_classes) and model_classes != data_classes:
        return [f"model.backbone.num_classes={model_classes} differs from data.num_classes={data_classes}"]
    return []


def _warmups(built: Built) -> list[tuple[str, Any]]:
    """``(config key, callback)`` of every LargeBatchScaling with a warm-up, as the callback resolved it."""
    from .callbacks import LargeBatchScaling

    return [
        (f"callbacks.{name}", cb)
        for name, cb in built.callbacks.items()
        if isinstance(cb, LargeBatchScaling) and cb.warmup
    ]


def _warmup_limit_problems(cfg: DictConfig, built: Built) -> list[str]:
    """A warm-up must be shorter than trainer.max_epochs (in epochs) or trainer.max_steps (in steps)."""
    from .large_batch import warmup_limit

    found: list[str] = []
    max_epochs, max_steps = _get(cfg, "trainer.max_epochs"), _get(cfg, "trainer.max_steps")
    for key, cb in _warmups(built):
        exceeded = warmup_limit(cb.warmup, cb.unit, max_epochs=max_epochs, max_steps=max_steps)
        if exceeded is not None:
            found.append(
                f"{key}.warmup={cb.warmup:g} {cb.unit}s is not shorter than training "
                f"(trainer.{exceeded[0]}={exceeded[1]})"
            )
    return found


def _warmup_steps_problems(cfg: DictConfig, built: Built) -> list[str]:
    """A warm-up in epochs must be shorter than trainer.max_steps, given the data's size (once it is built)."""
    found: list[str] = []
    max_steps, batch = _get(cfg, "trainer.max_steps"), _get(cfg, "global_batch_size")
    samples = getattr(built.data, "train_samples", None)
    if not (is_int(max_steps) and max_steps > 0 and is_int(samples) and is_int(batch)):
        return found
    for key, cb in _warmups(built):
        steps = cb.warmup * (samples // batch)
        if cb.unit == "epoch" and steps >= max_steps:
            found.append(
                f"{key}.warmup={cb.warmup:g} epochs (= {steps:g} steps of global_batch_size={batch} over "
                f"{samples} images) is not shorter than trainer.max_steps={max_steps}; lower the warm-up or "
                f"use {key}.unit=step"
            )
    return found


def _lr_owner_problems(built: Built) -> list[str]:
    """The model must not schedule the LR when a callback owns it (the model's own rule, asked before launch)."""
    check = getattr(built.model, "check_lr_owner", None)
    if not callable(check):
        return []
    try:
        check(built.callbacks.values())
    except InvalidOption as exc:
        return [exc.under("model")]
    return []


# ------------------------------------------------------------------------------------------------ building
@dataclass
class Built:
    """Every group's object, built (so checked by its constructor) before launch; the app fits with these."""

    model: Any = None
    strategy: Any = "auto"
    callbacks: dict[str, Any] = field(default_factory=dict)  # config key under callbacks -> callback
    loggers: dict[str, Any] = field(default_factory=dict)  # config key under logger -> logger
    data: Any = None


def _reason(exc: BaseException, key: str) -> str | None:
    """A constructor's complaint as ``<config key>...``, or None when ``exc`` is not about a setting.

    Hydra wraps what a target raises in an ``InstantiationException`` naming the nested node
    (``full_key: model.backbone``); an :class:`InvalidOption` becomes ``model.backbone.num_classes=0 ...``.
    """
    chain, cause = [], exc
    while cause is not None and cause not in chain:  # as a traceback shows it: causes, then unsuppressed contexts
        chain.append(cause)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    match = re.search(r"^full_key: (\S+)$", str(exc), re.MULTILINE) if isinstance(exc, InstantiationException) else None
    where = match.group(1) if match else key
    for err in chain:
        if isinstance(err, InvalidOption):
            return err.under(where)
        if isinstance(err, ConfigError):  # a resolver (e.g. ${per_device_batch:...}) refused the config
            return str(err)
    for err in chain:
        if isinstance(err, (ValueError, TypeError)) and not isinstance(err, InstantiationException):
            return f"{where}: {err}"
    return None


def _instantiate(node: Any, key: str, found: list[str]) -> Any:
    """Build one config node; a bad setting goes to ``found`` (and None is returned)."""
    try:
        return hydra.utils.instantiate(node)
    except Exception as exc:  # noqa: BLE001  (only setting errors are reported; the rest propagate)
        reason = _reason(exc, key)
        if reason is None:
            raise
        if reason not in found:
            found.append(reason)
        return None


def _instantiate_dict(node: Any, group: str, found: list[str]) -> dict[str, Any]:
    """Build every entry of a config dict (``callbacks``, ``logger``); ``null`` entries are dropped."""
    objects: dict[str, Any] = {}
    for name, conf in (node or {}).items():
        if conf is None:
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            found.append(f"{group}.{name} must be a config with a _target_ (or null to drop it)")
            continue
        built = _instantiate(conf, f"{group}.{name}", found)
        if built is not None:
            objects[name] = built
    return objects


def build(cfg: DictConfig) -> Built:
    """Check ``cfg`` and build every group before any process starts; raise :class:`ConfigError` listing
    every problem (the cross-group checks and each constructor's complaint, with its config key).

    The data is built last and only when everything else is valid: the demo datamodule writes its shards
    on first use, which is worth doing only for a run that will start.
    """
    found = problems(cfg)
    built = Built(model=_instantiate(cfg.get("model"), "model", found))
    if cfg.get("strategy"):
        built.strategy = _instantiate(cfg.strategy, "strategy", found)
    built.callbacks = _instantiate_dict(cfg.get("callbacks"), "callbacks", found)
    built.loggers = _instantiate_dict(cfg.get("logger"), "logger", found)
    found += _lr_owner_problems(built) + _warmup_limit_problems(cfg, built)
    if not found and cfg.get("data") is not None:
        built.data = _instantiate(cfg.data, "data", found)
        found += _warmup_steps_problems(cfg, built)
    if found:
        raise ConfigError("invalid firecaffe-train config:\n  - " + "\n  - ".join(found))
    return built


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (builds everything, as :func:`build`)."""
    build(cfg)
