"""A wide MLP: big gradients, little compute; the communication-bound workload of the benchmarks."""

from __future__ import annotations

from torch import nn

from .registry import register_model


@register_model("mlp")
class WideMLP(nn.Sequential):
    """Flatten -> ``width`` -> ``width`` -> classes (ReLU between); ~12.6 M parameters at 32 px, width 2048."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, width: int = 2048) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(3 * image_size * image_size, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )
        self.num_classes = num_classes
