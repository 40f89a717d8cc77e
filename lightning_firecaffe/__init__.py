"""lightning_firecaffe: FireCaffe-style data-parallel training for PyTorch Lightning.

``import lightning_firecaffe`` registers ``Trainer(strategy="firecaffe")`` (and ``firecaffe_spawn``,
``firecaffe_fork``, ``firecaffe_<algorithm>``) in Lightning's strategy registry.
"""

from lightning.pytorch.strategies import StrategyRegistry

from .cost_model import LinkModel
from .executor import PeerStallError
from .schedules import ALGORITHMS
from .strategy import ALGORITHM_CHOICES, FireCaffeStrategy

FireCaffeStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"
__all__ = ["ALGORITHMS", "ALGORITHM_CHOICES", "FireCaffeStrategy", "LinkModel", "PeerStallError", "__version__"]
