"""Reference flatness ops (maths: docs/flatness.md; API docs:
pykernels/flatness/ops.py). Plain PyTorch, any float dtype (float64 in tests)."""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def energy(logits: torch.Tensor) -> torch.Tensor:
    """E = -logsumexp over the last (class) dim."""
    return -torch.logsumexp(logits, dim=-1)


def logsumexp_hvp(logits: torch.Tensor, tangents: torch.Tensor):
    """(softmax s, energy, (diag(s) - s s^T) u for every u in tangents [S, *logits.shape])."""
    s = torch.softmax(logits, dim=-1)
    hvp = s * (tangents - (s * tangents).sum(-1, keepdim=True))
    return s, energy(logits), hvp


# ---- probes: the counter-based generator of csrc/core/flatness.h, on int64 tensors ----


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x < 2^32 without overflowing int64: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    return int(mix32(torch.tensor([x & _MASK32], dtype=torch.int64))[0])


def probe_key(seed: int) -> tuple[int, int]:
    """The two 32-bit keys of a seed (any Python int; taken modulo 2^64)."""
    seed &= (1 << 64) - 1
    k1 = _mix32_int((seed & _MASK32) ^ _mix32_int((seed >> 32) ^ 0x9E3779B9))
    return k1, _mix32_int(k1 ^ 0x85EBCA6B)


def probe_bits(seed: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """32 random bits (as int64) for each element index (int64, >= 0)."""
    k1, k2 = probe_key(seed)
    block = mix32((index >> 32) ^ k1)
    a = mix32((index & _MASK32) ^ block)
    return mix32(a ^ k2 ^ (0x27D4EB2F if stream else 0))


def probes(shape, seed: int, kind: str = "rademacher", *, offset: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Probe vectors of `shape`: element i (row-major) is drawn from (seed, offset + i).

    rademacher: +-1 from the top bit. gaussian: Box-Muller on two 24-bit uniforms,
    u1 in (0, 1), u2 in [0, 1). Computed in float64, then cast to `dtype`.
    """
    n = math.prod(shape)
    index = torch.arange(offset, offset + n, dtype=torch.int64)
    r1 = probe_bits(seed, index, 0)
    if kind == "rademacher":
        out = torch.where((r1 >> 31) == 1, -1.0, 1.0).double()
    elif kind == "gaussian":
        r2 = probe_bits(seed, index, 1)
        u1 = ((r1 >> 8).double() + 0.5) * 2.0**-24
        u2 = (r2 >> 8).double() * 2.0**-24
        out = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    else:
        raise ValueError(f"kind must be 'rademacher' or 'gaussian', got {kind!r}")
    return out.reshape(shape).to(dtype)


def probe_dots(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[s, b] = v[s, b] . w[s, b] over the flattened trailing dims."""
    return (v * w).flatten(2).sum(-1)
