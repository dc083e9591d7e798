"""Triton probe scoring: the same two passes as the CUDA kernel (logits that
read every activation once, then smoothing), registered as the custom op
pykernels::probe_scores_triton.

Registered with torch.library.custom_op + an explicit fake kernel rather than
triton_op, because triton_op's automatic fake kernel fails under
TRITON_INTERPRET=1, where these kernels are tested without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _ops
from ._index import block_range

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _probe_logits_kernel(
    layer_ptrs,
    stride_b_ptr,
    stride_t_ptr,  # per-layer base address and strides (int64 tables)
    w_ptr,
    bias_ptr,
    len_ptr,
    out_ptr,
    T,
    H,
    K,
    L,
    n_tokens,
    DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tok = block_range(tl.program_id(0), BLOCK_T)  # flattened b * T + t
    in_range = tok < n_tokens
    b = tok // T
    t = tok % T
    valid = in_range
    if HAS_LENGTHS:
        length = tl.load(len_ptr + b, mask=in_range, other=0)
        valid = valid & (t < length)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # this program's group of heads
    k_ok = ks < K
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for l in range(L):
        base = tl.load(layer_ptrs + l).to(tl.pointer_type(DTYPE))
        rows = b * tl.load(stride_b_ptr + l) + t * tl.load(stride_t_ptr + l)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            x = tl.load(base + rows[:, None] + hs[None, :], mask=valid[:, None] & h_ok[None, :], other=0.0)
            w = tl.load(w_ptr + (l * H + hs)[:, None] * K + ks[None, :], mask=h_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ks, mask=k_ok, other=0.0)[None, :]
    acc = tl.where(valid[:, None], acc, 0.0)  # padding holds 0
    tl.store(out_ptr + tok[:, None] * K + ks[None, :], acc, mask=in_range[:, None] & k_ok[None, :])


@triton.jit
def _swim_kernel(z_ptr, out_ptr, len_ptr, T, K, n, window, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr):
    i = block_range(tl.program_id(0), BLOCK)  # flattened (b, t, k)
    ok = i < n
    k = i % K
    t = (i // K) % T
    b = i // (K * T)
    valid = ok
    if HAS_LENGTHS:
        valid = valid & (t < tl.load(len_ptr + b, mask=ok, other=0))
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for m in range(0, window):  # summed directly, as in the CPU/CUDA kernels (NaN-exact)
        s = t - m
        total += tl.load(z_ptr + (b * T + s) * K + k, mask=valid & (s >= 0), other=0.0)
    count = tl.minimum(t + 1, window).to(tl.float32)
    tl.store(out_ptr + i, tl.where(valid, total / count, 0.0), mask=ok)


@triton.jit
def _ema_combine(d1, a1, d2, a2):
    # ema_compose of csrc/core/probe_scores.h: (d1, a1) earlier, (d2, a2) later;
    # 2^-126 is the smallest normal float32 (the underflow floor there), written exactly: Triton
    # makes a float literal below 2^-126 (1.17549435e-38) a float64, which breaks the scan's types.
    add = tl.where(d2 == 0.0, a2, d2 * a1 + a2)
    decay = tl.where((d2 == 0.0) | (d1 == 0.0), 0.0, tl.maximum(d2 * d1, 1.1754943508222875e-38))
    return decay, add


@triton.jit
def _ema_kernel(z_ptr, out_ptr, len_ptr, T, K, alpha, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)  # one program per (sequence, head)
    b = seq // K
    k = seq % K
    length = T
    if HAS_LENGTHS:
        length = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), T)
    # The scan's two operands and the carry share z's dtype (Triton 3.6 refuses a float32 decay
    # next to float64 scores).
    carry = tl.zeros([], dtype=z_ptr.dtype.element_ty)
    for t0 in range(0, T, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        valid = t < length
        z = tl.load(z_ptr + (b * T + t) * K + k, mask=valid, other=0.0)
        decay = tl.where(t == 0, 0.0, tl.where(valid, 1.0 - alpha, 1.0)).to(z.dtype)
        add = tl.where(t == 0, z, tl.where(valid, alpha * z, 0.0)).to(z.dtype)
        decay, add = tl.associative_scan((decay, add), 0, _ema_combine)
        e = tl.where(decay == 0.0, add, decay * carry + add)
        tl.store(out_ptr + (b * T + t) * K + k, tl.where(valid, e, 0.0), mask=t < T)
        carry = tl.sum(tl.where(t == t0 + BLOCK - 1, e, 0.0), axis=0)


@torch.library.custom_op("pykernels::probe_scores_triton", mutates_args=())
def probe_scores_triton(
    hidden_states: list[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    smoothing: str,
    window: int,
    ema_alpha: float,
) -> torch.Tensor:
    h0 = hidden_states[0]
    B, T, H = h0.shape
    L, K = len(hidden_states), weight.shape[2]
    out = torch.empty((B, T, K), dtype=torch.float32, device=h0.device)
    if out.numel() == 0:
        return out
    layers = [h if h.shape[2] <= 1 or h.stride(2) == 1 else h.contiguous() for h in hidden_states]
    table = torch.tensor(
        [[h.data_ptr() for h in layers], [h.stride(0) for h in layers], [h.stride(1) for h in layers]],
        dtype=torch.int64,
    )
    if h0.is_cuda:  # from pinned memory the copy is queued on the stream, no host sync
        table = table.pin_memory().to(h0.device, non_blocking=True)
    w = weight.to(torch.float32).contiguous()
    b = bias.to(torch.float32).contiguous() if bias is not None else w
    n_len = lengths.to(torch.int64).contiguous() if lengths is not None else table
    smooth = smoothing == "ema" or (smoothing == "swim" and window > 1)
    raw = torch.empty_like(out) if smooth else out

    # Heads in groups of up to 16 (grid axis 1): the [tokens, hidden, heads] product
    # tile stays small whatever K is; more groups re-read the activations.
    block_k = min(16, triton.next_power_of_2(K))
    # Enough programs to keep every SM streaming (~1k for 4k tokens), up to 16 tokens each.
    block_t = max(2, min(16, triton.next_power_of_2(triton.cdiv(B * T, 1024))))
    block_h = max(16, min(128, 8192 // (block_t * block_k), triton.next_power_of_2(H)))
    _probe_logits_kernel[(triton.cdiv(B * T, block_t), triton.cdiv(K, block_k))](
        table[0],
        table[1],
        table[2],
        w,
        b,
        n_len,
        raw,
        T,
        H,
        K,
        L,
        B * T,
        DTYPE=_TL_DTYPES[h0.dtype],
        HAS_BIAS=bias is not None,
        HAS_LENGTHS=lengths is not None,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_K=block_k,
    )
    if smoothing == "swim" and smooth:
        n = B * T * K
        # A window past T sums what a window of T sums: the loop is bounded by T, not the window.
        _swim_kernel[(triton.cdiv(n, 1024),)](
            raw, out, n_len, T, K, n, min(window, T), HAS_LENGTHS=lengths is not None, BLOCK=1024
        )
    elif smoothing == "ema":
        _ema_kernel[(B * K,)](
            raw,
            out,
            n_len,
            T,
            K,
            float(ema_alpha),
            HAS_LENGTHS=lengths is not None,
            BLOCK=min(1024, triton.next_power_of_2(T)),
        )
    return out


_ops.register_triton_twins("probe_scores")
