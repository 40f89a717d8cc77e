"""Caffe-style building blocks shared by the models."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class CaffeMaxPool(nn.Module):
    """Caffe max pooling (ceil mode) that also accepts inputs smaller than the kernel (small test images):
    the window is then clipped to the input instead of raising."""

    def __init__(self, kernel_size: int, stride: int, padding: int = 0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        k = min(self.kernel_size, x.shape[-1] + 2 * self.padding, x.shape[-2] + 2 * self.padding)
        return F.max_pool2d(x, k, self.stride, min(self.padding, k // 2), ceil_mode=True)


def conv_relu(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU(inplace=True))


def xavier_init(module: nn.Module, conv_bias: float = 0.0) -> None:
    """Caffe's ``xavier`` filler (uniform, fan-in) for weights; constant biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = (3.0 / fan_in) ** 0.5
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.constant_(m.bias, conv_bias if isinstance(m, nn.Conv2d) else 0.0)
