"""Emulated cluster: hosts as network namespaces on a bridge, links shaped with tc tbf (root only).

See :mod:`lightning_firecaffe.testing.cluster.netns` and ``python -m lightning_firecaffe.testing.cluster --help``.
No added latency can be emulated on this kernel (no netem): only bandwidth.
"""

from .netns import (
    INTERFACE,
    PREFIX,
    ClusterRunError,
    ClusterTimeoutError,
    EmulatedCluster,
    EmulationUnavailable,
    RankResult,
    can_emulate,
    down_all,
    list_runs,
    require_root,
)

__all__ = [
    "INTERFACE",
    "PREFIX",
    "ClusterRunError",
    "ClusterTimeoutError",
    "EmulatedCluster",
    "EmulationUnavailable",
    "RankResult",
    "can_emulate",
    "down_all",
    "list_runs",
    "require_root",
]
