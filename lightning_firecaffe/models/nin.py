"""Network-in-Network for ImageNet as in the Caffe model zoo: four mlpconv blocks (a conv and two 1x1
convs), max pooling between them, dropout 0.5 before the last block, global average pooling, no fully
connected layer. 7,595,176 parameters for 1000 classes."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import CaffeMaxPool, conv_relu
from .registry import register_model


def mlpconv(
    cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, last: int | None = None, last_relu: bool = True
):
    """conv + two 1x1 "cccp" convs; ``last`` sets the final width (the class count in block 4)."""
    final = conv_relu(cout, last or cout, 1) if last_relu else nn.Conv2d(cout, last or cout, 1)
    return nn.Sequential(conv_relu(cin, cout, kernel, stride, padding), conv_relu(cout, cout, 1), final)


@register_model("nin")
class NiN(nn.Module):
    """Returns logits. Works at 224 px and at small inputs (32-64 px): pools clip to the input.

    ``final_relu``: the zoo model has a ReLU on the class maps (relu12) before average pooling. Off by
    default: non-negative logits can all die at once (loss stuck at log(num_classes)), which we saw within a
    few steps from scratch; it adds no parameters either way.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, final_relu: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.features = nn.Sequential(
            mlpconv(3, 96, 11, 4),
            CaffeMaxPool(3, 2),
            mlpconv(96, 256, 5, padding=2),
            CaffeMaxPool(3, 2),
            mlpconv(256, 384, 3, padding=1),
            CaffeMaxPool(3, 2),
            nn.Dropout(dropout),
            mlpconv(384, 1024, 3, padding=1, last=num_classes, last_relu=final_relu),
        )
        self._init()

    def _init(self) -> None:
        # Caffe's "msra" filler (He et al.): keeps activations at scale through 12 ReLU layers without batch
        # norm; the zoo's small gaussians (std 0.01/0.05) and xavier both make the first epochs crawl.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
