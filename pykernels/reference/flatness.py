"""Reference flatness ops (maths: docs/flatness.md; API docs:
pykernels/flatness/ops.py). Plain PyTorch, any float dtype (float64 in tests).
With each forward, its derivative formulas (vjp / jvp), written with the ops
themselves so that every backward is differentiable again: pykernels/_ops.py
registers them on the compiled ops and their Triton twins, pykernels/flatness/ops.py
wraps them in autograd.Functions for forward mode and torch.func."""

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


def energy_vjp(logits, energy, grad):
    """d logits of energy = -logsumexp: -grad * softmax, from the saved output."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    softmax = torch.exp(logits.to(wide) + energy.to(wide).unsqueeze(-1))
    return (-grad.unsqueeze(-1) * softmax).to(logits.dtype)


def logsumexp_hvp_vjp(lse_hvp, logits, tangents, softmax, grad_softmax, grad_energy, grad_hvp):
    """Backward of (s, E, h) = logsumexp_hvp(logits, tangents), with A = diag(s) - s s^T
    (symmetric) and h_i = s * (u_i - s.u_i):
      d logits <- A (g_s + sum_i r_i) - g_E s,  r_i = g_h_i * (u_i - s.u_i) - (g_h_i . s) u_i
      d u_i    <- A g_h_i
    Every product with A is one more `lse_hvp` call, so the result is differentiable again."""
    s = softmax
    through_softmax = torch.zeros_like(logits) if grad_softmax is None else grad_softmax
    if grad_hvp is None:
        grad_logits, grad_tangents = lse_hvp(logits, through_softmax.unsqueeze(0))[2][0], None
    else:
        centred = tangents - (s * tangents).sum(-1, keepdim=True)
        r = grad_hvp * centred - (grad_hvp * s).sum(-1, keepdim=True) * tangents
        through_softmax = through_softmax + r.sum(0)
        products = lse_hvp(logits, torch.cat([through_softmax.unsqueeze(0), grad_hvp]))[2]
        grad_logits, grad_tangents = products[0], products[1:]
    if grad_energy is not None:
        grad_logits = grad_logits - grad_energy.unsqueeze(-1) * s
    return grad_logits, grad_tangents


def logsumexp_hvp_jvp(lse_hvp, logits, tangents, softmax, d_logits, d_tangents):
    """Forward-mode rule of logsumexp_hvp: ds = A dz, dE = -s . dz,
    dh_i = A du_i + ds * (u_i - s.u_i) - s (ds . u_i)."""
    s = softmax
    d_s = lse_hvp(logits, d_logits.unsqueeze(0))[2][0]
    d_h = lse_hvp(logits, d_tangents)[2] if d_tangents is not None else torch.zeros_like(tangents)
    centred = tangents - (s * tangents).sum(-1, keepdim=True)
    d_h = d_h + d_s * centred - s * (d_s * tangents).sum(-1, keepdim=True)
    return d_s, -(s * d_logits).sum(-1), d_h


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


def fill_probes_(out: torch.Tensor, seed: int, offset: int, kind: str) -> None:
    """Fills out with the probes of (seed, offset + i) for its elements i (row-major)."""
    out.copy_(probes(tuple(out.shape), seed, kind, offset=offset, dtype=out.dtype))


def probe_dots(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[s, b] = v[s, b] . w[s, b] over the flattened trailing dims."""
    return (v * w).flatten(2).sum(-1)


def curvature_step_(tangents: torch.Tensor, d1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """One elementwise op y = sigma(a) of a forward tangent pass, in place. tangents [R, *shape]
    are the tangents t of a; d1, c2 [P, *shape] (R a multiple of P; row r uses factor row r % P)
    hold sigma'(a) and lambda * sigma''(a). Returns out[r] = sum c2 t^2 over the trailing dims
    (that op's term of v . H v) and overwrites the tangents with d1 * t (those of y)."""
    R, P = tangents.shape[0], d1.shape[0]
    t = tangents.unflatten(0, (R // P if P else 0, P))  # a view: the writes reach tangents
    out = (c2 * t * t).reshape(R, math.prod(tangents.shape[1:])).sum(-1)
    t.mul_(d1)
    return out


def probe_dots_vjp(v, w, grad):
    """(d v, d w) of probe_dots given the output's gradient."""
    return grad.unsqueeze(-1) * w, grad.unsqueeze(-1) * v


def probe_dots_jvp(v, w, d_v, d_w):
    """Forward-mode rule of probe_dots (None: no tangent for that input)."""
    out = v.new_zeros(v.shape[:2])
    if d_v is not None:
        out = out + (d_v * w).flatten(2).sum(-1)
    if d_w is not None:
        out = out + (v * d_w).flatten(2).sum(-1)
    return out
