"""Config checks and resolvers of ``firecaffe-train`` (the Hydra app in :mod:`lightning_firecaffe.train`).

Everything here runs on the composed config before any object is built or any process is started, and
every error names the config keys involved, so ``firecaffe-train global_batch_size=100 trainer.devices=3``
fails at once with a message saying which keys to change.

Resolvers (registered on import):

* ``${per_device_batch:global,devices,num_nodes,accumulate}``: the per-device batch of a global batch;
* ``${run_id:}``: ``slurm-<job>-<step>`` inside a SLURM job step (every task of an ``srun`` writes to the
  same run directory), otherwise the local time ``YYYY-MM-DD_HH-MM-SS``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

FIRECAFFE_TARGETS = ("lightning_firecaffe.FireCaffeStrategy", "lightning_firecaffe.strategy.FireCaffeStrategy")


class ConfigError(ValueError):
    """An invalid combination of config values; the message names the keys."""


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


def register_resolvers() -> None:
    for name, fn in (("per_device_batch", _per_device_batch), ("run_id", _run_id)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "run_id")


register_resolvers()


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _target(node: Any) -> str:
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _train_samples(cfg: DictConfig) -> int | None:
    """The training set size when known without reading the data: ``data.train_samples``, or the demo set's
    metadata when the demo shards already exist."""
    samples = _get(cfg, "data.train_samples")
    if _is_int(samples):
        return samples
    data = cfg.get("data")
    if isinstance(data, DictConfig) and _target(data).endswith("demo_datamodule"):
        from .data.demo_set import VERSION, cache_dir

        root = _get(cfg, "data.root") or os.path.join(cache_dir(), VERSION)
        if os.path.exists(os.path.join(root, "demo.json")):
            from .data import build_demo_set

            return build_demo_set(root).train_samples  # reads the metadata, builds nothing
    return None


def problems(cfg: DictConfig) -> list[str]:
    """Every problem found in ``cfg`` (an empty list when it is valid)."""
    from .large_batch import DECAYS, SCALING_RULES, UNITS, check_warmup_fits, get_preset
    from .strategy import ALGORITHM_CHOICES

    found: list[str] = []
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return ["the config has no trainer group (pick one: trainer=cpu or trainer=gpu)"]

    # --- the global batch and its split across processes -----------------------------------------------------
    layout = {k: _get(cfg, f"trainer.{k}", 1) for k in ("devices", "num_nodes", "accumulate_grad_batches")}
    global_batch = _get(cfg, "global_batch_size")
    if not (_is_int(global_batch) and global_batch >= 1):
        found.append(f"global_batch_size={global_batch!r} must be a positive integer")
    for key, value in layout.items():
        if not (_is_int(value) and value >= 1):
            found.append(
                f"trainer.{key}={value!r} must be a positive integer (global_batch_size is split across "
                f"trainer.devices x trainer.num_nodes x trainer.accumulate_grad_batches)"
            )
    if not found:
        try:
            _per_device_batch(global_batch, *layout.values())
        except ConfigError as exc:
            found.append(str(exc))
    data = cfg.get("data")
    train_samples = _get(cfg, "data.train_samples") if isinstance(data, DictConfig) else None
    if _is_int(global_batch) and _is_int(train_samples) and global_batch > train_samples:
        found.append(f"global_batch_size={global_batch} is larger than data.train_samples={train_samples}")
    if isinstance(data, DictConfig) and "ImageNetShards" in _target(data):
        if _get(cfg, "paths.imagenet") is None and "paths.imagenet" in str(OmegaConf.to_yaml(data, resolve=False)):
            found.append(
                "paths.imagenet is not set: pass paths.imagenet=/path/to/imagenet-shards (or set $IMAGENET_SHARDS)"
            )

    # --- strategy -----------------------------------------------------------------------------------------------
    strategy = cfg.get("strategy")
    if isinstance(strategy, DictConfig) and _target(strategy) in FIRECAFFE_TARGETS:
        algorithm = strategy.get("algorithm", "auto")
        if algorithm not in ALGORITHM_CHOICES:
            found.append(f"strategy.algorithm={algorithm!r} is not one of {', '.join(ALGORITHM_CHOICES)}")
        arity = strategy.get("arity", 2)
        if not (_is_int(arity) and arity >= 2):
            found.append(f"strategy.arity={arity!r} must be an integer >= 2")
        start = strategy.get("start_method", "popen")
        if start not in ("popen", "spawn", "fork", "forkserver"):
            found.append(f"strategy.start_method={start!r} is not one of popen, spawn, fork, forkserver")

    # --- the large-batch callback: choices and a warm-up that fits in training ---------------------------------
    lb = _get(cfg, "callbacks.large_batch")
    if isinstance(lb, DictConfig):
        settings: dict[str, Any] = {}
        preset = lb.get("preset")
        if preset is not None:
            try:
                settings.update(get_preset(preset).callback_settings())
            except ValueError as exc:
                found.append(f"callbacks.large_batch.preset: {exc}")
        settings.update({k: v for k, v in lb.items() if v is not None})
        for key, allowed in (("rule", SCALING_RULES), ("decay", DECAYS), ("unit", UNITS)):
            value = settings.get(key)
            if value is not None and value not in allowed:
                found.append(f"callbacks.large_batch.{key}={value!r} is not one of {', '.join(allowed)}")
        warmup, unit = settings.get("warmup", 0) or 0, settings.get("unit", "epoch")
        if unit in UNITS:
            max_epochs, max_steps = _get(cfg, "trainer.max_epochs"), _get(cfg, "trainer.max_steps")
            try:
                check_warmup_fits(float(warmup), unit, max_epochs=max_epochs, max_steps=max_steps)
            except (TypeError, ValueError) as exc:
                limit = "trainer.max_epochs" if unit == "epoch" else "trainer.max_steps"
                found.append(
                    f"callbacks.large_batch.warmup={warmup!r} ({unit}s) does not fit in training "
                    f"({limit}={max_epochs if unit == 'epoch' else max_steps}): {exc}"
                )
            samples = _train_samples(cfg)
            if unit == "epoch" and warmup and _is_int(max_steps) and max_steps > 0 and samples and not found:
                steps_per_epoch = samples // _get(cfg, "global_batch_size")
                if steps_per_epoch and warmup * steps_per_epoch >= max_steps:
                    found.append(
                        f"callbacks.large_batch.warmup={warmup:g} epochs (= {warmup * steps_per_epoch:g} steps of "
                        f"global_batch_size={_get(cfg, 'global_batch_size')} over {samples} images) is not shorter "
                        f"than trainer.max_steps={max_steps}; lower the warm-up or use callbacks.large_batch.unit=step"
                    )
        for key in ("base_lr",):
            value = settings.get(key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                found.append(f"callbacks.large_batch.{key}={value!r} must be a positive number")
    lr = _get(cfg, "model.lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        found.append(f"model.lr={lr!r} must be a positive number")

    # --- the model's classes and the data's --------------------------------------------------------------------
    model_classes = _get(cfg, "model.backbone.num_classes")
    data_classes = _get(cfg, "data.num_classes")
    if _is_int(model_classes) and _is_int(data_classes) and model_classes != data_classes:
        found.append(f"model.backbone.num_classes={model_classes} differs from data.num_classes={data_classes}")
    return found


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (the message names the keys)."""
    found = problems(cfg)
    if found:
        raise ConfigError("invalid firecaffe-train config:\n  - " + "\n  - ".join(found))
