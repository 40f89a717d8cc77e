"""Lightning callbacks of lightning_firecaffe."""

from .comm_telemetry import CommTelemetry
from .large_batch import LargeBatchScaling

__all__ = ["CommTelemetry", "LargeBatchScaling"]
