"""Large-batch hyper-parameters as pure logic (no Lightning): LR scaling, warm-up, decay, LARS, presets."""

from .divergence import DivergenceRule, LossHistory, TrainingDiverged, clip_threshold
from .lars import apply_lars, is_lars_exempt, trust_ratio
from .ownership import lr_owner
from .presets import PRESETS, Preset, get_preset
from .rules import (
    DECAYS,
    SCALING_RULES,
    UNITS,
    LRPlan,
    check_choice,
    check_decay_params,
    check_lr,
    check_warmup,
    check_warmup_fits,
    decay_factor,
    scale_factor,
    warmup_for_batch,
    warmup_limit,
)

__all__ = [
    "DECAYS",
    "DivergenceRule",
    "LossHistory",
    "TrainingDiverged",
    "clip_threshold",
    "warmup_for_batch",
    "PRESETS",
    "SCALING_RULES",
    "UNITS",
    "LRPlan",
    "Preset",
    "apply_lars",
    "check_choice",
    "check_decay_params",
    "check_lr",
    "check_warmup",
    "check_warmup_fits",
    "decay_factor",
    "get_preset",
    "is_lars_exempt",
    "lr_owner",
    "scale_factor",
    "trust_ratio",
    "warmup_limit",
]
