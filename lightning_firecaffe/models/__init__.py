"""Models: BVLC GoogLeNet, ImageNet NiN (plain torch) and the ``ImageClassifier`` LightningModule."""

from .classifier import ImageClassifier
from .googlenet import GoogLeNet
from .nin import NiN

__all__ = ["GoogLeNet", "ImageClassifier", "NiN"]
