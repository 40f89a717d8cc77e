"""Lightning callbacks of lightning_firecaffe."""

from .comm_telemetry import CommTelemetry
from .large_batch import LargeBatchScaling
from .training_clock import TrainingClock

__all__ = ["CommTelemetry", "LargeBatchScaling", "TrainingClock"]
