"""The one registry of backbones: the Hydra configs, the planner and the train benchmark build models by name.

@register_model("nin")
class NiN(nn.Module): ...

build_model("nin", num_classes=10, dropout=0.5)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: make a backbone class (or factory) buildable as ``build_model(name, num_classes, ...)``."""

    def decorator(factory: F) -> F:
        if name in _MODELS and _MODELS[name] is not factory:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return decorator


def model_names() -> tuple[str, ...]:
    return tuple(_MODELS)


def build_model(name: str, num_classes: int = 1000, *, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered backbone; a ValueError naming the choices for an unknown ``name``.

    ``image_size`` reaches only backbones whose constructor takes it (an MLP must know its input width;
    convolutional ones adapt to any size).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_MODELS)}")
    factory = _MODELS[name]
    if image_size is not None and "image_size" in inspect.signature(factory).parameters:
        kwargs["image_size"] = image_size
    return factory(num_classes=num_classes, **kwargs)
