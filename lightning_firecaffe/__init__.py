"""lightning_firecaffe: FireCaffe-style data-parallel training for PyTorch Lightning.

``import lightning_firecaffe`` registers ``Trainer(strategy="firecaffe")`` and ``Fabric(strategy="firecaffe")``
(and ``firecaffe_spawn``, ``firecaffe_fork``, ``firecaffe_<algorithm>`` for every registered all-reduce
algorithm) in Lightning's two strategy registries.

The tree shows the layers: ``comm/`` (pure schedules and their registry -> cost model and simulator ->
executor -> DDP comm hook), ``gradient_path.py`` (what both strategies build), ``strategy.py`` (the Trainer's strategy), ``fabric.py``
(Fabric's), ``models/``, ``data/``,
``large_batch/`` + ``callbacks/`` (the LR rules and their callback), ``train.py`` (the Hydra app),
``bench/`` (benchmarks and the planner) and ``testing/`` (harnesses: local ranks, emulated cluster, SLURM).
"""

from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

from . import fabric
from .comm.cost_model import LinkModel
from .comm.schedules import algorithm_names, register_algorithm
from .errors import PeerStallError
from .options import InvalidOption
from .strategy import FireCaffeStrategy
from .strategy_options import FireCaffeOptions
from .watchdog import STALL_EXIT_CODE

FireCaffeStrategy.register_strategies(StrategyRegistry)
fabric.FireCaffeStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)

__version__ = "0.1.0"
__all__ = [
    "FireCaffeOptions",
    "FireCaffeStrategy",
    "InvalidOption",
    "LinkModel",
    "PeerStallError",
    "STALL_EXIT_CODE",
    "__version__",
    "algorithm_names",
    "register_algorithm",
]
