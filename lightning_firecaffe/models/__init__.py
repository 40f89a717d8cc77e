"""Models: BVLC GoogLeNet, ImageNet NiN, a wide MLP (plain torch), their registry, and ``ImageClassifier``."""

from .classifier import ImageClassifier
from .googlenet import GoogLeNet
from .mlp import WideMLP
from .nin import NiN
from .registry import build_model, model_names, register_model

__all__ = ["GoogLeNet", "ImageClassifier", "NiN", "WideMLP", "build_model", "model_names", "register_model"]
