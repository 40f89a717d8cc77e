"""GoogLeNet (Inception v1) as in the BVLC Caffe reference: LRN, no batch norm, dropout 0.4, two optional
auxiliary classifiers (weighted 0.3 in the loss). 6,998,552 parameters for 1000 classes without the
auxiliary heads, 13,378,280 with them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import CaffeMaxPool, conv_relu, xavier_init
from .registry import register_model


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.branch1 = conv_relu(cin, c1, 1)
        self.branch3 = nn.Sequential(conv_relu(cin, c3r, 1), conv_relu(c3r, c3, 3, padding=1))
        self.branch5 = nn.Sequential(conv_relu(cin, c5r, 1), conv_relu(c5r, c5, 5, padding=2))
        self.branch_pool = nn.Sequential(CaffeMaxPool(3, 1, 1), conv_relu(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class AuxClassifier(nn.Module):
    """loss1/loss2 heads: 5x5/3 average pool (to 4x4), 1x1 conv 128, fc 1024, dropout 0.7, fc classes."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.conv = conv_relu(cin, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = F.avg_pool2d(x, 5, 3, ceil_mode=True) if x.shape[-1] == 14 else F.adaptive_avg_pool2d(x, 4)
        x = torch.flatten(self.conv(x), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


@register_model("googlenet")
class GoogLeNet(nn.Module):
    """Returns logits; in training mode with ``aux_logits`` a tuple ``(main, aux1, aux2)``.

    Works at 224 px and at small inputs (32-64 px): pools clip to the input, the head pools globally.
    """

    def __init__(self, num_classes: int = 1000, aux_logits: bool = False, dropout: float = 0.4):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.aux_logits = num_classes, aux_logits
        lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)  # noqa: E731
        self.stem = nn.Sequential(
            conv_relu(3, 64, 7, 2, 3),
            CaffeMaxPool(3, 2),
            lrn(),
            conv_relu(64, 64, 1),
            conv_relu(64, 192, 3, padding=1),
            lrn(),
            CaffeMaxPool(3, 2),
        )
        self.inception3 = nn.Sequential(
            Inception(192, 64, 96, 128, 16, 32, 32), Inception(256, 128, 128, 192, 32, 96, 64), CaffeMaxPool(3, 2)
        )
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4bcd = nn.Sequential(
            Inception(512, 160, 112, 224, 24, 64, 64),
            Inception(512, 128, 128, 256, 24, 64, 64),
            Inception(512, 112, 144, 288, 32, 64, 64),
        )
        self.inception4e = nn.Sequential(Inception(528, 256, 160, 320, 32, 128, 128), CaffeMaxPool(3, 2))
        self.inception5 = nn.Sequential(
            Inception(832, 256, 160, 320, 32, 128, 128), Inception(832, 384, 192, 384, 48, 128, 128)
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        self.aux1 = AuxClassifier(512, num_classes) if aux_logits else None
        self.aux2 = AuxClassifier(528, num_classes) if aux_logits else None
        xavier_init(self, conv_bias=0.2)  # BVLC: xavier weights, conv biases 0.2, classifier bias 0

    def forward(self, x):
        x = self.inception4a(self.inception3(self.stem(x)))
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4bcd(x)
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.inception5(self.inception4e(x))
        x = self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
        return (x, aux1, aux2) if aux1 is not None else x
