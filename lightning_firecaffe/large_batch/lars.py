"""LARS (You et al. 2017): a per-layer trust ratio that rescales each layer's step to its weight norm.

Why: with very large batches the ratio ||w|| / ||grad|| differs by orders of magnitude between layers, so
one global LR is too large for some layers and too small for others. The local LR is
``eta x ||w|| / (||g|| + beta x ||w||)`` with ``beta`` the weight decay. Biases and normalisation
parameters (every tensor with at most one dimension) keep the plain global LR, as is usual.

The update is applied the LARC way (NVIDIA apex): ``g <- ratio x (g + wd x w)``, the global LR then
multiplying it in the optimizer. Because SGD adds ``wd x w`` itself afterwards, the gradient is written as
``ratio x (g + wd x w) - wd x w`` so that the optimizer's own weight decay completes it exactly, without
touching the optimizer's settings.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def trust_ratio(w_norm: float, g_norm: float, eta: float = 0.001, beta: float = 0.0, eps: float = 0.0) -> float:
    """Local LR multiplier ``eta ||w|| / (||g|| + beta ||w|| + eps)``; 1 when either norm is zero."""
    if w_norm <= 0 or g_norm <= 0:
        return 1.0
    return eta * w_norm / (g_norm + beta * w_norm + eps)


def is_lars_exempt(param: torch.Tensor) -> bool:
    """Biases and normalisation weights/biases (0-d or 1-d tensors) keep the global LR."""
    return param.ndim <= 1


@torch.no_grad()
def apply_lars(param_groups: Iterable[dict], eta: float = 0.001, eps: float = 1e-9) -> list[float]:
    """Rewrite the gradients of every non-exempt parameter in place; return the ratios (for logging/tests).

    Each group's ``weight_decay`` (0 if absent) plays the role of ``beta``. Assumes coupled (L2) weight
    decay as in SGD, which adds ``weight_decay x w`` to the gradient inside its step.
    """
    ratios: list[float] = []
    for group in param_groups:
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        for p in group["params"]:
            if p.grad is None or is_lars_exempt(p):
                continue
            w_norm = float(torch.linalg.vector_norm(p.detach()))
            g_norm = float(torch.linalg.vector_norm(p.grad))
            ratio = trust_ratio(w_norm, g_norm, eta=eta, beta=wd, eps=eps)
            if wd:
                p.grad.add_(p.detach(), alpha=wd).mul_(ratio).sub_(p.detach(), alpha=wd)
            else:
                p.grad.mul_(ratio)
            ratios.append(ratio)
    return ratios
