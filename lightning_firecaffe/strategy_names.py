"""The strategy names FireCaffe adds to a Lightning strategy registry (the Trainer's, Fabric's: same API).

Lowercase names, registered idempotently: launchers like ``ddp`` (``firecaffe``, ``firecaffe_spawn``,
``firecaffe_fork``), plus ``firecaffe_<algorithm>`` for every algorithm of the registry, including those
registered later; unregistering an algorithm removes its name from every registry that heard of it.
"""

from __future__ import annotations

from typing import Any

from .comm.schedules import on_register

LAUNCHERS = (("firecaffe", "popen"), ("firecaffe_spawn", "spawn"), ("firecaffe_fork", "fork"))
_SUBSCRIBED: set[int] = set()  # registries that already hear of new algorithms


def register_names(strategy: type, registry: Any) -> None:
    """Register ``strategy`` under FireCaffe's names in ``registry`` (a ``_StrategyRegistry``)."""
    for name, start_method in LAUNCHERS:
        registry.register(
            name,
            strategy,
            description=f"FireCaffe all-reduce (auto), start_method '{start_method}'",
            override=True,
            start_method=start_method,
        )
    if id(registry) in _SUBSCRIBED:
        return
    _SUBSCRIBED.add(id(registry))

    def register_algorithm_name(algorithm: Any) -> None:
        registry.register(
            f"firecaffe_{algorithm.name}",
            strategy,
            description=f"FireCaffe all-reduce '{algorithm.name}': {algorithm.summary}",
            override=True,
            start_method="popen",
            algorithm=algorithm.name,
        )

    on_register(register_algorithm_name, lambda algorithm: registry.pop(f"firecaffe_{algorithm.name}", None))
