"""Low-rank gradients (PowerSGD, Vogels et al. 2019) as pure tensor logic, in three phases per bucket.

On a link that is already at the bandwidth bound only fewer bytes per image are faster. PowerSGD sends,
for each weight viewed as an ``n x m`` matrix ``M`` (a conv's ``out x in*kh*kw``), two thin factors
instead: ``P = M Q`` (``n x r``) and, after ``P`` is summed across ranks and orthonormalised,
``Q = M^T P`` (``m x r``), summed too. Every rank then applies ``P Q^T``: ``r (n + m)`` numbers on the
wire instead of ``n m``. Tensors for which that saves too little (1-D ones, small matrices: ``n m <=
min_compression_rate * r (n + m)``) travel as they are, in the first message with the ``P`` factors.

Per bucket a :class:`LowRankBucket` yields the two messages and applies the result; *who* sums them
(any registered algorithm, ``auto``, optionally a bf16 wire) is the hook's business, so this module is
tested in one process by summing the messages of simulated ranks.

State per parameter, keyed by name so that it follows DDP's bucket rebuilds (:class:`LowRankState`):

* ``Q`` (warm start): the last step's summed ``Q`` starts the next power iteration (one iteration per
  step is then enough). The first ``Q`` is drawn from a generator seeded by the parameter's name, the
  same on every rank with no communication. ``Q`` is identical on every rank.
* the residual (error feedback): what this rank's gradient lost to the approximation is added to its
  next gradient, so nothing is lost, only delayed. It differs per rank.

The math is torch's ``powerSGD_hook`` (``matrix_approximation_rank``, ``min_compression_rate``, warm start,
error feedback, Gram-Schmidt), with two differences that change no result in exact arithmetic: the hook
gets the bucket already divided by the world size (FireCaffe's convention), so residuals are kept
divided by it too; and tensors that travel uncompressed carry no residual (torch keeps ``M_i - mean(M)``
for them, which sums to zero over the ranks and so never changes an average).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import low_rank_sizes as sizes
from .low_rank_sizes import matrix_shape

ParameterShapes = tuple[tuple[str, tuple[int, ...]], ...]
"""A bucket's parameters in buffer order: (name, shape)."""


@dataclass(frozen=True)
class LowRankConfig:
    """PowerSGD's knobs (the strategy's ``powersgd_*`` options)."""

    rank: int = 4  # r: columns of P and Q
    start_step: int = 10  # optimizer steps that reduce full gradients first
    min_compression_rate: float = 2.0  # compress a matrix only where n m > rate * r (n + m)
    epsilon: float = 1e-8  # added to column norms: a zero column (a layer without gradient) stays finite

    def active(self, step: int) -> bool:
        return step >= self.start_step


def compressed_rank(shape: Sequence[int], config: LowRankConfig) -> int:
    """The rank a tensor of ``shape`` travels at, or 0 when it travels uncompressed (1-D, or too small to save
    ``min_compression_rate``): the rule of :mod:`.low_rank_sizes`, which prices messages from shapes alone."""
    return sizes.compressed_rank(tuple(shape), config.rank, config.min_compression_rate)


def message_numels(shapes: ParameterShapes, config: LowRankConfig) -> tuple[int, int]:
    """Elements of a bucket's two messages: (uncompressed tensors + P factors, Q factors)."""
    return sizes.bucket_message_numels([shape for _, shape in shapes], config.rank, config.min_compression_rate)


def orthonormalise_(p: torch.Tensor, epsilon: float) -> None:
    """Gram-Schmidt on the columns of ``p`` (``n x r``), in place; deterministic, so ranks holding the
    same bits get the same bits."""
    for i in range(p.shape[1]):
        col = p[:, i : i + 1]
        col /= torch.linalg.vector_norm(col) + epsilon
        if i + 1 < p.shape[1]:
            rest = p[:, i + 1 :]
            rest -= (col * rest).sum(dim=0, keepdim=True) * col


def initial_q(name: str, m: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """The first Q of a parameter: the same on every rank (seeded by its name), orthonormalised."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(m, r, generator=generator, dtype=torch.float32).to(dtype)
    orthonormalise_(q, 0.0)
    return q


@dataclass
class LowRankState:
    """One rank's PowerSGD state: each compressed parameter's Q (identical on every rank) and residual."""

    config: LowRankConfig
    qs: dict[str, torch.Tensor] = field(default_factory=dict)
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)

    def q_for(self, name: str, m: int, r: int, like: torch.Tensor) -> torch.Tensor:
        q = self.qs.get(name)
        if q is None or q.shape != (m, r):
            q = self.qs[name] = initial_q(name, m, r, like.dtype).to(like.device)
        return q

    def residual_for(self, name: str, like: torch.Tensor) -> torch.Tensor:
        residual = self.residuals.get(name)
        if residual is None or residual.shape != like.shape:
            residual = self.residuals[name] = torch.zeros_like(like)
        return residual

    def state_dict(self) -> dict[str, Any]:
        """Q factors (the same everywhere) and this rank's residuals, on the CPU."""
        return {
            "qs": {k: v.detach().cpu().clone() for k, v in self.qs.items()},
            "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: Any = "cpu") -> None:
        self.qs = {k: v.to(device).clone() for k, v in (state.get("qs") or {}).items()}
        self.residuals = {k: v.to(device).clone() for k, v in (state.get("residuals") or {}).items()}


class LowRankBucket:
    """One bucket's PowerSGD round on one rank: ``first_message`` -> (sum it) -> ``second_message(first)``
    -> (sum it) -> ``finish(second)``, which writes the averaged low-rank gradient into the bucket.

    ``buffer`` holds this rank's gradient already divided by ``world_size``, laid out as ``shapes``.
    """

    def __init__(self, state: LowRankState, buffer: torch.Tensor, shapes: ParameterShapes, world_size: int) -> None:
        self.state, self.buffer, self.world_size = state, buffer, world_size
        self.matrices: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # name, M (view into buffer), Q
        self.uncompressed: list[torch.Tensor] = []  # views into buffer
        offset = 0
        for name, shape in shapes:
            numel = sizes.numel(shape)
            view = buffer[offset : offset + numel]
            offset += numel
            r = compressed_rank(shape, state.config)
            if not r:
                self.uncompressed.append(view)
                continue
            n, m = matrix_shape(shape)
            matrix = view.view(n, m)
            matrix.add_(state.residual_for(name, matrix))  # error feedback: last step's loss travels now
            self.matrices.append((name, matrix, state.q_for(name, m, r, matrix)))
        if offset != buffer.numel():
            raise ValueError(f"bucket layout has {offset} elements, the bucket {buffer.numel()}")
        self._ps: list[torch.Tensor] = []  # the summed, orthonormalised P factors (views into the first message)

    @property
    def compressed(self) -> bool:
        return bool(self.matrices)

    def first_message(self) -> torch.Tensor:
        """The uncompressed tensors, then every matrix's ``P = M Q`` (Q orthonormalised first, as torch's
        warm start does), in one flat buffer to be summed across ranks."""
        numel_u = sum(t.numel() for t in self.uncompressed)
        numel_p = sum(matrix.shape[0] * q.shape[1] for _, matrix, q in self.matrices)
        message = self.buffer.new_empty(numel_u + numel_p)
        if self.uncompressed:
            torch.cat(self.uncompressed, out=message[:numel_u])
        offset = numel_u
        for _, matrix, q in self.matrices:
            orthonormalise_(q, self.state.config.epsilon)
            p = message[offset : offset + matrix.shape[0] * q.shape[1]].view(matrix.shape[0], q.shape[1])
            torch.matmul(matrix, q, out=p)
            offset += p.numel()
        return message

    def second_message(self, first: torch.Tensor) -> torch.Tensor:
        """After the first message was summed in place: unpack the averaged uncompressed tensors,
        orthonormalise each summed P and send ``Q = M^T P``."""
        offset = 0
        for view in self.uncompressed:
            view.copy_(first[offset : offset + view.numel()])
            offset += view.numel()
        message = self.buffer.new_empty(sum(matrix.shape[1] * q.shape[1] for _, matrix, q in self.matrices))
        self._ps, at = [], 0
        for _, matrix, q in self.matrices:
            p = first[offset : offset + matrix.shape[0] * q.shape[1]].view(matrix.shape[0], q.shape[1])
            offset += p.numel()
            orthonormalise_(p, self.state.config.epsilon)
            self._ps.append(p)
            torch.matmul(matrix.t(), p, out=message[at : at + q.numel()].view(q.shape))
            at += q.numel()
        return message

    def finish(self, second: torch.Tensor) -> None:
        """After the second message was summed in place: keep each Q for the next step, write ``P Q^T``
        (the averaged low-rank gradient) into the bucket and keep what this rank's gradient lost."""
        offset = 0
        for (name, matrix, q), p in zip(self.matrices, self._ps):
            q.copy_(second[offset : offset + q.numel()].view(q.shape))
            offset += q.numel()
            # this rank's share of the loss, M_i - P Q^T / p (torch keeps M_i - P Q^T undivided; residuals here
            # are divided), in one fused pass; then P Q^T itself (Q summed M_i / p: it approximates the average)
            torch.addmm(matrix, p, q.t(), alpha=-1.0 / self.world_size, out=self.state.residuals[name])
            torch.matmul(p, q.t(), out=matrix)
