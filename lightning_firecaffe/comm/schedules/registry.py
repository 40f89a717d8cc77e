"""The one registry of all-reduce algorithms: every consumer of an algorithm name reads it.

A new algorithm is one file: a schedule builder decorated with :func:`register_algorithm`, which says how
the algorithm cuts a buffer into chunks, which knobs (``arity``, ranks per node) it uses and when ``auto``
should consider it (eligibility lives with the algorithm, as in msccl-tools' synthesis plans). The cost
model, ``auto``, the strategy's choices and registered strategy names, the planner, the benchmarks, the
README's algorithm table and the tests' parametrisation all iterate this registry; nothing else lists
algorithm names.

    @register_algorithm("star", chunking=whole_buffer, summary="everyone to the last rank and back",
                        cost="2 (p-1) N/B")
    def star(world_size, num_chunks=1, **_):
        ...
        return build("star", world_size, num_chunks, transfers)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from .core import Schedule

Chunking = Callable[[int, int, int], int]
"""``(nbytes, world_size, chunk_bytes) -> num_chunks``: how an algorithm cuts a buffer."""

Eligibility = Callable[[int, int], bool]
"""``(world_size, ranks_per_node) -> bool``: whether ``auto`` should consider an algorithm there."""


def whole_buffer(nbytes: int, world_size: int, chunk_bytes: int) -> int:
    """One chunk: every message carries the whole buffer (FireCaffe's tree, the parameter server)."""
    return 1


def pieces(nbytes: int, world_size: int, chunk_bytes: int) -> int:
    """``chunk_bytes`` pieces, for algorithms that stream a buffer through a pipeline."""
    return max(1, math.ceil(nbytes / chunk_bytes))


def paired_pieces(nbytes: int, world_size: int, chunk_bytes: int) -> int:
    """An even number of ``chunk_bytes`` pieces: half for each of two trees."""
    return 2 * max(1, math.ceil(pieces(nbytes, world_size, chunk_bytes) / 2))


def always(world_size: int, ranks_per_node: int) -> bool:
    return True


@dataclass(frozen=True)
class Algorithm:
    """A registered all-reduce algorithm. ``auto`` considers it where ``auto`` and ``eligible`` say so."""

    name: str
    build: Callable[..., Schedule]
    chunking: Chunking
    summary: str  # one line for tables and help texts
    cost: str = ""  # time for N bytes, p ranks, link bandwidth B (a formula, for the README table)
    uses_arity: bool = False
    uses_ranks_per_node: bool = False
    auto: bool = True
    eligible: Eligibility = always
    collective: bool = False  # run as the backend's own all_reduce; the schedule only models it
    order: int = 100  # position in every listing, and ``auto``'s tie-break (lower first); then the name
    identical_results: bool = True  # every rank ends with the same bits (local SGD's parameter average needs it)

    def num_chunks(self, nbytes: int, world_size: int, chunk_bytes: int) -> int:
        return int(self.chunking(nbytes, world_size, chunk_bytes))

    def schedule(self, world_size: int, num_chunks: int = 1, arity: int = 2, ranks_per_node: int = 1) -> Schedule:
        """Build (and cache) the schedule; knobs the algorithm ignores do not fragment the cache."""
        return _build_cached(
            self,
            world_size,
            num_chunks,
            arity if self.uses_arity else 2,
            ranks_per_node if self.uses_ranks_per_node else 1,
        )

    def schedule_for_bytes(
        self, nbytes: int, world_size: int, *, chunk_bytes: int, arity: int = 2, ranks_per_node: int = 1
    ) -> Schedule:
        return self.schedule(world_size, self.num_chunks(nbytes, world_size, chunk_bytes), arity, ranks_per_node)

    def considered_by_auto(self, world_size: int, ranks_per_node: int) -> bool:
        return self.auto and bool(self.eligible(world_size, ranks_per_node))


@lru_cache(maxsize=512)
def _build_cached(algorithm: Algorithm, world_size: int, num_chunks: int, arity: int, ranks_per_node: int) -> Schedule:
    return algorithm.build(world_size=world_size, num_chunks=num_chunks, arity=arity, ranks_per_node=ranks_per_node)


_REGISTRY: dict[str, Algorithm] = {}
_LISTENERS: list[tuple[Callable[[Algorithm], None], Callable[[Algorithm], None] | None]] = []


def register_algorithm(
    name: str,
    *,
    chunking: Chunking,
    summary: str,
    cost: str = "",
    uses_arity: bool = False,
    uses_ranks_per_node: bool = False,
    auto: bool = True,
    eligible: Eligibility = always,
    collective: bool = False,
    order: int = 100,
    identical_results: bool = True,
    override: bool = False,
) -> Callable[[Callable[..., Schedule]], Callable[..., Schedule]]:
    """Decorator: register a schedule builder ``f(world_size, num_chunks, arity, ranks_per_node)``.

    Names are lower-case identifiers (they become strategy names ``firecaffe_<name>``). Registering a
    taken name raises unless ``override=True``. ``collective=True``: the executor calls the backend's own
    ``all_reduce`` and the schedule only models it (for the cost model and the simulator). ``order``
    places it in every listing and breaks ``auto``'s ties (lower first, then the name): the built-ins use
    10-70, so a plugin's default 100 comes after them whatever the import order. ``identical_results=False``:
    ranks may end with different bits (local SGD refuses it: its replicas must agree after an average). Listeners (e.g. the strategy-name registration) hear of
    every algorithm, also of those registered after they subscribed.
    """
    if not (name.isidentifier() and name == name.lower()) or name == "auto":
        raise ValueError(f"algorithm name {name!r} must be a lower-case identifier other than 'auto'")

    def decorator(build: Callable[..., Schedule]) -> Callable[..., Schedule]:
        if name in _REGISTRY and not override:
            raise ValueError(f"algorithm {name!r} is already registered (pass override=True to replace it)")
        algorithm = Algorithm(
            name,
            build,
            chunking,
            summary,
            cost,
            uses_arity,
            uses_ranks_per_node,
            auto,
            eligible,
            collective,
            order,
            identical_results=identical_results,
        )
        _REGISTRY[name] = algorithm
        _sort_registry()
        for added, _ in list(_LISTENERS):
            added(algorithm)
        return build

    return decorator


def _sort_registry() -> None:
    ordered = sorted(_REGISTRY.values(), key=lambda a: (a.order, a.name))
    _REGISTRY.clear()
    _REGISTRY.update((a.name, a) for a in ordered)


def unregister_algorithm(name: str) -> None:
    """Remove an algorithm (for tests and plugins that register temporary ones), and undo what its
    registration did through listeners (e.g. its ``firecaffe_<name>`` strategy names)."""
    algorithm = _REGISTRY.pop(name, None)
    if algorithm is None:
        return
    _build_cached.cache_clear()
    for _, removed in list(_LISTENERS):
        if removed is not None:
            removed(algorithm)


def on_register(
    listener: Callable[[Algorithm], None], on_unregister: Callable[[Algorithm], None] | None = None
) -> None:
    """Call ``listener`` for every registered algorithm now and for each one registered later, and
    ``on_unregister`` for each one removed."""
    _LISTENERS.append((listener, on_unregister))
    for algorithm in list(_REGISTRY.values()):
        listener(algorithm)


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm called ``name``; a ValueError naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(algorithm_names())}") from None


def algorithm_names() -> tuple[str, ...]:
    """Every registered algorithm name, in ``order`` (then name) order."""
    return tuple(_REGISTRY)


def algorithms() -> tuple[Algorithm, ...]:
    return tuple(_REGISTRY.values())


def auto_candidates(world_size: int, ranks_per_node: int = 1) -> tuple[str, ...]:
    """The algorithms ``auto`` weighs at this world size and node layout (each says where it is eligible)."""
    return tuple(a.name for a in _REGISTRY.values() if a.considered_by_auto(world_size, ranks_per_node))


def markdown_table() -> str:
    """The README's algorithm table, generated from the registry (a test keeps the README in sync)."""
    rows = ["| algorithm | what it does | time for N bytes, p ranks, link bandwidth B | `auto` |", "|---|---|---|---|"]
    for a in _REGISTRY.values():
        rows.append(f"| `{a.name}` | {a.summary} | {a.cost} | {'yes' if a.auto else 'no'} |")
    return "\n".join(rows)
