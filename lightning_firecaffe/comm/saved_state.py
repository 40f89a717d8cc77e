"""What a checkpoint keeps of the gradient path, in one object, so that a resumed run continues exactly.

``auto``'s choice per bucket size (no re-tuning after a resume) and compression's state: fp16's scale and,
with error feedback, every rank's residual (they differ per rank; the strategy gathers them to rank 0
while the checkpoint is assembled, a collective every rank takes part in); PowerSGD's state: the Q
factors (the same on every rank) and every rank's residuals; local SGD's last average (anchor) and, between
two averages, every rank's own weights and optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHECKPOINT_KEY = "firecaffe"


@dataclass
class SavedCommState:
    auto_choices: dict[int, str] = field(default_factory=dict)  # bucket bytes on the wire -> algorithm
    compression: dict[str, Any] | None = None  # GradientCompression.state_dict() + "error_feedback"
    low_rank: dict[str, Any] | None = None  # {"world_size", "qs", "residuals": [per rank]} (PowerSGD)
    local_sgd: dict[str, Any] | None = None  # ParameterAverager.state_dict() + every rank's "replicas"

    def to_dict(self) -> dict[str, Any]:
        choices = {int(k): v for k, v in self.auto_choices.items()}
        return {
            "auto_choices": choices,
            "compression": self.compression,
            "low_rank": self.low_rank,
            "local_sgd": self.local_sgd,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any] | None) -> SavedCommState:
        state = state or {}
        choices = {int(k): str(v) for k, v in (state.get("auto_choices") or {}).items()}
        return cls(choices, state.get("compression"), low_rank=state.get("low_rank"), local_sgd=state.get("local_sgd"))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> SavedCommState | None:
        """The state in a checkpoint: under ``firecaffe``, or (checkpoints of 0.1) in CommTelemetry's
        callback state; None when there is none."""
        if CHECKPOINT_KEY in checkpoint:
            return cls.from_dict(checkpoint[CHECKPOINT_KEY])
        for name, state in (checkpoint.get("callbacks") or {}).items():
            if str(name).startswith("CommTelemetry") and isinstance(state, dict) and "auto_choices" in state:
                return cls.from_dict(state)
        return None
