"""Triton flatness kernels, the same arithmetic as csrc/core/flatness.h, registered
as custom ops pykernels::{energy, logsumexp_hvp, probe_dots}_triton and the in-place
pykernels::{fill_probes, curvature_step}_triton_ (custom_op + explicit fake kernels,
testable under TRITON_INTERPRET=1), with the autograd and vmap rules of the compiled ops
(pykernels/_ops.py)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _ops
from ..reference.flatness import probe_key
from ._index import block_range

_ACC = {torch.float64: tl.float64}  # every other input dtype computes in float32
_KINDS = {"rademacher": 0, "gaussian": 1}


@triton.jit
def _row_logsumexp(z_ptr, rows, row_ok, stride_n, K, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # lse_max_step / lse_term / lse_finish of csrc/core/flatness.h, BLOCK_N rows at a time. The
    # loops keep [BLOCK_N, BLOCK_K] partials and reduce once after: a row reduction inside the
    # loop whose result is used twice fails Triton 3.6's OptimizeThreadLocality pass on sm_90.
    m_part = tl.full([BLOCK_N, BLOCK_K], float("-inf"), ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < K)[None, :]
        x = tl.load(z_ptr + rows[:, None] * stride_n + ks[None, :], mask=mask, other=float("-inf")).to(ACC)
        m_part = tl.maximum(m_part, x)
    m = tl.max(m_part, axis=1)
    part = tl.zeros([BLOCK_N, BLOCK_K], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < K)[None, :]
        x = tl.load(z_ptr + rows[:, None] * stride_n + ks[None, :], mask=mask, other=0.0).to(ACC)
        term = tl.where(x == m[:, None], 1.0, tl.exp(x - m[:, None]))
        part += tl.where(mask, term, 0.0)
    total = tl.sum(part, axis=1)
    total = tl.where(row_ok, total, 1.0)  # rows past the end: keep their (unstored) arithmetic quiet
    return tl.where((m == float("inf")) & (total == total), m, m + tl.log(total))


@triton.jit
def _softmax_at(x, lse):
    # softmax_at of csrc/core/flatness.h: NaN throughout a row whose lse is +inf
    return tl.where(lse == float("inf"), float("nan"), tl.exp(x - lse))


@triton.jit
def _energy_kernel(z_ptr, out_ptr, N, K, stride_n, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = block_range(tl.program_id(0), BLOCK_N)
    row_ok = rows < N
    lse = _row_logsumexp(z_ptr, rows, row_ok, stride_n, K, ACC, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows, -lse, mask=row_ok)


@triton.jit
def _logsumexp_hvp_kernel(
    z_ptr,
    u_ptr,
    s_ptr,
    e_ptr,
    h_ptr,
    N,
    K,
    S,
    stride_zn,
    stride_us,
    stride_un,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program (row block, tangent i); the i == 0 programs also write softmax and energy.
    rows = block_range(tl.program_id(0), BLOCK_N)
    i = tl.program_id(1)
    row_ok = rows < N
    lse = _row_logsumexp(z_ptr, rows, row_ok, stride_zn, K, ACC, BLOCK_N, BLOCK_K)
    if i == 0:
        tl.store(e_ptr + rows, -lse, mask=row_ok)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (ks < K)[None, :]
            x = tl.load(z_ptr + rows[:, None] * stride_zn + ks[None, :], mask=mask, other=0.0).to(ACC)
            tl.store(s_ptr + rows[:, None] * K + ks[None, :], _softmax_at(x, lse[:, None]), mask=mask)
    if i < S:
        u_base = u_ptr + i.to(tl.int64) * stride_us + rows[:, None] * stride_un
        dot_part = tl.zeros([BLOCK_N, BLOCK_K], ACC)  # reduced after the loop, as in _row_logsumexp
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (ks < K)[None, :]
            x = tl.load(z_ptr + rows[:, None] * stride_zn + ks[None, :], mask=mask, other=0.0).to(ACC)
            u = tl.load(u_base + ks[None, :], mask=mask, other=0.0).to(ACC)
            dot_part += tl.where(mask, _softmax_at(x, lse[:, None]) * u, 0.0)
        dot = tl.sum(dot_part, axis=1)
        h_base = h_ptr + (i.to(tl.int64) * N + rows[:, None]) * K
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (ks < K)[None, :]
            x = tl.load(z_ptr + rows[:, None] * stride_zn + ks[None, :], mask=mask, other=0.0).to(ACC)
            u = tl.load(u_base + ks[None, :], mask=mask, other=0.0).to(ACC)
            tl.store(h_base + ks[None, :], _softmax_at(x, lse[:, None]) * (u - dot[:, None]), mask=mask)


@triton.jit
def _mix32(x):
    # lowbias32 on uint32 (wrapping multiplies)
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _fill_probes_kernel(out_ptr, n, offset, k1, k2, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = block_range(tl.program_id(0), BLOCK)
    ok = i < n
    index = offset + i
    key1 = k1.to(tl.uint32)
    key2 = k2.to(tl.uint32)
    block = _mix32((index >> 32).to(tl.uint32) ^ key1)
    a = _mix32((index & 0xFFFFFFFF).to(tl.uint32) ^ block)
    r1 = _mix32(a ^ key2)
    if KIND == 0:
        value = tl.where((r1 >> 31) == 1, -1.0, 1.0).to(ACC)
    else:
        r2 = _mix32(a ^ key2 ^ 0x27D4EB2F)
        # In float64 for every output dtype, then rounded (gaussian_from_bits in csrc/core/flatness.h).
        u1 = ((r1 >> 8).to(tl.float64) + 0.5) * 5.9604644775390625e-08
        u2 = (r2 >> 8).to(tl.float64) * 5.9604644775390625e-08
        value = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
    tl.store(out_ptr + i, value, mask=ok)


@triton.jit
def _probe_dots_kernel(v_ptr, w_ptr, out_ptr, B, D, v_ss, v_sb, w_ss, w_sb, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # = s * B + b
    s = r // B
    b = r % B
    acc = tl.zeros([BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        ok = ds < D
        v = tl.load(v_ptr + s * v_ss + b * v_sb + ds, mask=ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + s * w_ss + b * w_sb + ds, mask=ok, other=0.0).to(ACC)
        acc += v * w
    tl.store(out_ptr + r, tl.sum(acc, axis=0))


@triton.jit
def _curvature_step_kernel(t_ptr, d1_ptr, c2_ptr, out_ptr, P, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    f = r % P  # the factor row
    acc = tl.zeros([BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        ok = ds < D
        t = tl.load(t_ptr + r * D + ds, mask=ok, other=0.0)
        c2 = tl.load(c2_ptr + f * D + ds, mask=ok, other=0.0)
        d1 = tl.load(d1_ptr + f * D + ds, mask=ok, other=0.0)
        acc += (c2 * t * t).to(ACC)
        tl.store(t_ptr + r * D + ds, t * d1, mask=ok)
    tl.store(out_ptr + r, tl.sum(acc, axis=0))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [N, K] with a unit-stride last dim (a view when possible)."""
    K = t.shape[-1]
    r = t.reshape(math.prod(t.shape[:-1]), K)
    return r.contiguous() if K > 1 and r.stride(1) != 1 else r


def _blocks(K: int) -> tuple[int, int]:
    block_k = min(1024, triton.next_power_of_2(max(K, 1)))
    return max(1, min(64, 2048 // block_k)), block_k


@torch.library.custom_op("pykernels::energy_triton", mutates_args=())
def energy_triton(logits: torch.Tensor) -> torch.Tensor:
    z = _rows(logits)
    N, K = z.shape[0], logits.shape[-1]
    acc = _ACC.get(logits.dtype, tl.float32)
    out = torch.empty(N, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32, device=logits.device)
    if N:
        block_n, block_k = _blocks(K)
        _energy_kernel[(triton.cdiv(N, block_n),)](z, out, N, K, z.stride(0), ACC=acc, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.to(logits.dtype).reshape(logits.shape[:-1])


@torch.library.custom_op("pykernels::logsumexp_hvp_triton", mutates_args=())
def logsumexp_hvp_triton(
    logits: torch.Tensor, tangents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K, S = logits.shape[-1], tangents.shape[0]
    z = _rows(logits)
    N = z.shape[0]
    u = tangents.reshape(S, N, K)
    if K > 1 and u.stride(2) != 1:
        u = u.contiguous()
    s = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    e = torch.empty(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    h = torch.empty(tangents.shape, dtype=logits.dtype, device=logits.device)
    if N:
        block_n, block_k = _blocks(K)
        _logsumexp_hvp_kernel[(triton.cdiv(N, block_n), max(S, 1))](
            z,
            u,
            s,
            e,
            h,
            N,
            K,
            S,
            z.stride(0),
            u.stride(0),
            u.stride(1),
            ACC=_ACC.get(logits.dtype, tl.float32),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
    return s, e, h


@torch.library.custom_op("pykernels::fill_probes_triton_", mutates_args=("out",))
def fill_probes_triton_(out: torch.Tensor, seed: int, offset: int, kind: str) -> None:
    buf = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    n = buf.numel()
    if n:
        k1, k2 = probe_key(seed)
        block = 1024
        _fill_probes_kernel[(triton.cdiv(n, block),)](
            buf, n, offset, k1, k2, KIND=_KINDS[kind], ACC=_ACC.get(out.dtype, tl.float32), BLOCK=block
        )
    if buf is not out:
        out.copy_(buf)


@torch.library.custom_op("pykernels::probe_dots_triton", mutates_args=())
def probe_dots_triton(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    S, B, D = v.shape
    v = v.contiguous() if D > 1 and v.stride(2) != 1 else v
    w = w.contiguous() if D > 1 and w.stride(2) != 1 else w
    out = torch.empty((S, B), dtype=v.dtype, device=v.device)
    if S * B:
        _probe_dots_kernel[(S * B,)](
            v,
            w,
            out,
            B,
            D,
            v.stride(0),
            v.stride(1),
            w.stride(0),
            w.stride(1),
            ACC=_ACC.get(v.dtype, tl.float32),
            BLOCK_D=min(4096, triton.next_power_of_2(max(D, 1))),
        )
    return out


@torch.library.custom_op("pykernels::curvature_step_triton_", mutates_args=("tangents",))
def curvature_step_triton_(tangents: torch.Tensor, d1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    R, P = tangents.shape[0], d1.shape[0]
    D = math.prod(tangents.shape[1:])
    rows = tangents.contiguous()  # a strided tangents: computed in a copy, written back below
    out = torch.empty(R, dtype=tangents.dtype, device=tangents.device)
    if R:
        _curvature_step_kernel[(R,)](
            rows,
            d1.contiguous(),
            c2.contiguous(),
            out,
            P,
            D,
            ACC=_ACC.get(tangents.dtype, tl.float32),
            BLOCK_D=min(4096, triton.next_power_of_2(max(D, 1))),
        )
    if rows is not tangents:
        tangents.copy_(rows)
    return out


_ops.register_triton_twins("energy", "logsumexp_hvp", "fill_probes_", "probe_dots", "curvature_step_")
