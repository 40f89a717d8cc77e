"""Named recipes: the hyper-parameters of published runs, so a config can say ``preset: firecaffe``.

``firecaffe``: FireCaffe's large-batch GoogLeNet (Iandola et al. 2016, recipe as in Intel Caffe's solver
that cites the paper): batch 1024, base LR 0.08, poly power 0.5, momentum 0.9, weight decay 2e-4,
72 epochs, no warm-up. The reference batch is the recipe's own 1024, so at batch 1024 the LR is exactly
the paper's; at other batches it is scaled linearly from there (Goyal et al.), e.g. 0.16 at 2048.
Beyond the paper, for batches above the reference (measured on the demo set, docs/benchmarks.md "Time to
accuracy"): a warm-up that grows by half an epoch per batch multiple above 1 (3.5 epochs more at 8x),
the gradient norm clipped at 2x its recent median (the 8x divergence was one gradient spike of 17-35x at
the peak LR), and no weight decay on biases and normalisation parameters.

``bvlc_googlenet``: the small-batch Caffe model-zoo reference that FireCaffe started from: batch 32,
base LR 0.01, poly 0.5, momentum 0.9, weight decay 2e-4, 60 epochs. Scaled with ``sqrt`` from batch 32
it gives 0.057 at 1024, inside FireCaffe's tuned range (0.06-0.08) - hence ``sqrt`` as its rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..options import require_choice


@dataclass(frozen=True)
class Preset:
    """Callback settings plus the optimizer/trainer values the recipe assumes (``batch_size``, ``max_epochs``
    are informational: the callback reports, not enforces, them)."""

    base_lr: float
    reference_batch: int
    rule: str
    decay: str
    power: float
    warmup: float
    unit: str
    momentum: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    # The large-batch fixes (see large_batch/divergence.py for the divergence they answer):
    warmup_per_multiple: float = 0.0  # warm-up grows by this many `unit`s per batch multiple above the reference
    clip_factor: float | None = None  # clip the gradient norm at this x its recent median (None: never)
    decay_biases: bool = True  # False: no weight decay on biases / normalisation parameters

    def callback_settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch_size")
        d.pop("max_epochs")
        return d


PRESETS: dict[str, Preset] = {
    "firecaffe": Preset(
        base_lr=0.08,
        reference_batch=1024,
        rule="linear",
        decay="poly",
        power=0.5,
        warmup=0,
        unit="epoch",
        momentum=0.9,
        weight_decay=2e-4,
        batch_size=1024,
        max_epochs=72,
        warmup_per_multiple=0.5,
        clip_factor=2.0,
        decay_biases=False,
    ),
    "bvlc_googlenet": Preset(
        base_lr=0.01,
        reference_batch=32,
        rule="sqrt",
        decay="poly",
        power=0.5,
        warmup=0,
        unit="epoch",
        momentum=0.9,
        weight_decay=2e-4,
        batch_size=32,
        max_epochs=60,
    ),
}


def get_preset(name: str, owner: str = "large_batch") -> Preset:
    """The recipe called ``name``; :class:`~lightning_firecaffe.options.InvalidOption` names the known ones."""
    return PRESETS[require_choice(owner, "preset", name, PRESETS)]
