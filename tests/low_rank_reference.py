"""The reference PowerSGD the tests compare with: torch's powerSGD_hook's math, written out small here,
and this package's PowerSGD on simulated ranks (shared by the unit and the multi-rank tests)."""

import math

import torch

from lightning_firecaffe.comm.low_rank import LowRankBucket, LowRankState, compressed_rank, initial_q, matrix_shape

SHAPES = (("conv.weight", (8, 3, 3, 3)), ("conv.bias", (8,)), ("fc.weight", (16, 64)), ("tiny.weight", (2, 3)))


def reference_powersgd(grads_per_step, shapes, config, world_size):
    """torch's powerSGD_hook, written out: undivided inputs, error feedback on the whole bucket
    (``error = M_i - mean approximation``, uncompressed tensors included), warm-started Q (orthonormalised
    before use), P summed then orthonormalised, Q summed and divided by the world size. Returns the
    averaged gradient every step (the same on every rank)."""

    def orthonormalise(m):
        m = m.clone()
        for i in range(m.shape[1]):
            col = m[:, i : i + 1]
            col /= torch.linalg.vector_norm(col) + config.epsilon
            if i + 1 < m.shape[1]:
                m[:, i + 1 :] -= (col * m[:, i + 1 :]).sum(dim=0, keepdim=True) * col
        return m

    errors = [torch.zeros(sum(math.prod(s) for _, s in shapes), dtype=torch.float64) for _ in range(world_size)]
    qs = {}
    out = []
    for grads in grads_per_step:
        inputs = [g.double() + e for g, e in zip(grads, errors)]
        result = torch.empty_like(inputs[0])
        offset = 0
        for name, shape in shapes:
            numel = math.prod(shape)
            pieces = [x[offset : offset + numel] for x in inputs]
            r = compressed_rank(shape, config)
            if not r:
                result[offset : offset + numel] = sum(pieces) / world_size
            else:
                n, m = matrix_shape(shape)
                ms = [p.view(n, m) for p in pieces]
                q = qs.get(name)
                q = orthonormalise(initial_q(name, m, r, torch.float64) if q is None else q)
                p = orthonormalise(sum(mi @ q for mi in ms))
                q = sum(mi.t() @ p for mi in ms) / world_size
                qs[name] = q
                result[offset : offset + numel] = (p @ q.t()).reshape(-1)
            offset += numel
        errors = [x - result for x in inputs]
        out.append(result)
    return out


def simulate(grads_per_step, shapes, config, world_size, dtype=torch.float32):
    """This module's PowerSGD on ``world_size`` simulated ranks: the averaged bucket of every rank, per step."""
    states = [LowRankState(config) for _ in range(world_size)]
    out = []
    for grads in grads_per_step:
        buckets = [LowRankBucket(s, (g / world_size).to(dtype), shapes, world_size) for s, g in zip(states, grads)]
        firsts = [b.first_message() for b in buckets]
        total = sum(firsts)
        seconds = [b.second_message(total.clone()) for b in buckets]
        total = sum(seconds)
        for b in buckets:
            b.finish(total.clone())
        out.append([b.buffer for b in buckets])
    return out, states


def gradients(world_size, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    numel = sum(math.prod(s) for _, s in SHAPES)
    return [[torch.randn(numel, generator=g) for _ in range(world_size)] for _ in range(steps)]
