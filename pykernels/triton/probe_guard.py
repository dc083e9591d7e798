"""Triton kernels of the probe guard, registered as custom ops
pykernels::probe_accumulate_triton_ and pykernels::{probe_stream_step,
probe_stream_step_varlen, softmax_weighted_bce_fwd}_triton
(custom_op + explicit fake kernels, testable under TRITON_INTERPRET=1; see
triton/probe_scores.py). The arithmetic mirrors csrc/core/probe_guard.h.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _ops
from ._index import block_range
from .probe_scores import _TL_DTYPES

# ---------------------------------------------------------------- probe_accumulate_


@triton.jit
def _accumulate_kernel(
    x_ptr,
    row_stride,
    w_ptr,
    acc_ptr,
    N,
    H,
    K,
    DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = block_range(tl.program_id(0), BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    r_ok = rows < N
    k_ok = ks < K
    x_rows = x_ptr.to(tl.pointer_type(DTYPE)) + rows * row_stride
    # Products summed into [BLOCK_N, BLOCK_H, BLOCK_K] partials, reduced over H once after the loop.
    # The first GPU run (H200, Triton 3.6) had a row reduction inside this loop off by about one
    # product at H = 33, K = 9 (tests/probes/test_stream.py), where the interpreter was exact.
    part = tl.zeros([BLOCK_N, BLOCK_H, BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        x = tl.load(x_rows[:, None] + hs[None, :], mask=r_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ks[None, :] * H + hs[:, None], mask=h_ok[:, None] & k_ok[None, :], other=0.0)  # W_t [K, H]
        part += x.to(tl.float32)[:, :, None] * w[None, :, :]
    total = tl.sum(part, axis=1)
    out = acc_ptr + rows[:, None] * K + ks[None, :]
    mask = r_ok[:, None] & k_ok[None, :]
    tl.store(out, tl.load(out, mask=mask, other=0.0) + total, mask=mask)


@torch.library.custom_op("pykernels::probe_accumulate_triton_", mutates_args=("acc",))
def probe_accumulate_triton_(acc: torch.Tensor, hidden: torch.Tensor, weight_l: torch.Tensor) -> None:
    N, H = hidden.shape
    K = weight_l.shape[1]
    if N == 0 or K == 0:
        return
    x = hidden if H <= 1 or hidden.stride(1) == 1 else hidden.contiguous()
    w_t = weight_l.to(torch.float32).t().contiguous()  # no copy for a transposed-contiguous float32 weight
    target = acc if acc.is_contiguous() else torch.zeros_like(acc, memory_format=torch.contiguous_format)
    block_k = triton.next_power_of_2(K)
    block_n = 16
    block_h = max(16, min(128, 8192 // (block_n * block_k), triton.next_power_of_2(H)))
    _accumulate_kernel[(triton.cdiv(N, block_n),)](
        x,
        x.stride(0) if N > 1 else H,
        w_t,
        target,
        N,
        H,
        K,
        DTYPE=_TL_DTYPES[hidden.dtype],
        BLOCK_N=block_n,
        BLOCK_H=block_h,
        BLOCK_K=block_k,
    )
    if target is not acc:
        acc.add_(target)


# ---------------------------------------------------------------- probe_stream_step


@triton.jit
def _segment_in_range(begin, count, N):
    return (begin >= 0) & (begin <= N) & (count >= 0) & (count <= N - begin)  # no overflow


@triton.jit
def _stream_step_kernel(
    state_ptr,
    meta_ptr,
    status_ptr,
    ids_ptr,
    starts_ptr,
    counts_ptr,
    z_ptr,
    active_ptr,
    thr_ptr,
    scores_ptr,
    flagged_ptr,
    S,
    R,
    N,
    K,
    window,
    alpha,
    SEGMENTS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program: rows are few (one per active sequence). Row r steps its slot
    # through token rows [start, start + count) (SEGMENTS), or token row r alone.
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < R
    ids = tl.load(ids_ptr + rows, mask=r_ok, other=0)
    in_range = (ids >= 0) & (ids < S)
    stamp = meta_ptr + ids * 3 + 2
    # Duplicates: every row writes its index to its slot's stamp; a row that
    # reads back another row's index shares the slot.
    tl.store(stamp, rows.to(tl.int64), mask=r_ok & in_range)
    tl.debug_barrier()
    owner = tl.load(stamp, mask=r_ok & in_range, other=0)
    bad_range = tl.max(tl.where(r_ok & ~in_range, 1, 0), axis=0)
    bad_dup = tl.max(tl.where(r_ok & in_range & (owner != rows), 1, 0), axis=0)
    if SEGMENTS:
        starts = tl.load(starts_ptr + rows, mask=r_ok, other=0)
        counts = tl.load(counts_ptr + rows, mask=r_ok, other=0)
        has_prev = r_ok & (rows > 0)
        prev_start = tl.load(starts_ptr + rows - 1, mask=has_prev, other=0)
        prev_count = tl.load(counts_ptr + rows - 1, mask=has_prev, other=0)
        # The order against row r - 1 only when that row is in range (else it is the error).
        ordered = ~_segment_in_range(prev_start, prev_count, N) | (starts >= prev_start + prev_count)
        bad_segment = tl.max(tl.where(r_ok & ~(_segment_in_range(starts, counts, N) & ordered), 1, 0), axis=0)
    else:
        starts = rows.to(tl.int64)
        counts = tl.full([BLOCK_R], 1, tl.int64)
        bad_segment = 0
    error = bad_range * 1 + bad_dup * 2 + bad_segment * 4
    tl.store(status_ptr, tl.load(status_ptr) + 1)
    tl.store(status_ptr + 1, tl.load(status_ptr + 1) | error.to(tl.int64))
    if error != 0:
        # NaN for each segment's tokens that lie in [0, N) (the segment itself may be the error).
        lo = tl.maximum(starts, 0)
        hi = tl.where(starts > N - counts, N, starts + counts)
        span = tl.where(r_ok & (counts > 0) & (starts < N), hi - lo, 0)
        for i in range(0, tl.max(span, axis=0)):
            for k in range(0, K):
                tl.store(scores_ptr + (lo + i) * K + k, float("nan"), mask=i < span)
        tl.store(flagged_ptr + rows, 1, mask=r_ok)
    else:
        live = r_ok
        if HAS_ACTIVE:
            live = live & (tl.load(active_ptr + rows, mask=r_ok, other=0) != 0)
        counts = tl.where(live, counts, 0)
        seen = tl.load(meta_ptr + ids * 3, mask=live, other=0)
        flag_token = tl.load(meta_ptr + ids * 3 + 1, mask=r_ok, other=-1)
        ring = tl.where(window == 0, 1, 2 * window)
        base = state_ptr + ids.to(tl.int64) * ring * K
        if not SEGMENTS:  # an inactive row scores 0 (the varlen op's gaps start from zeros)
            for k in range(0, K):
                tl.store(scores_ptr + rows * K + k, 0.0, mask=r_ok & ~live)
        for i in range(0, tl.max(counts, axis=0)):
            token = live & (i < counts)
            row = starts + i
            crossed = tl.zeros([BLOCK_R], dtype=tl.int1)
            for k in range(0, K):
                z = tl.load(z_ptr + row * K + k, mask=token, other=0.0)
                if window == 0:
                    e_old = tl.load(base + k, mask=token, other=0.0)
                    # alpha == 1 forgets the past exactly (no 0 * NaN), as ema_apply does
                    e = tl.where((seen == 0) | (alpha == 1.0), z, (1.0 - alpha) * e_old + alpha * z)
                    tl.store(base + k, e, mask=token)
                    score = e
                else:
                    pos = seen % window
                    tl.store(base + pos * K + k, z, mask=token)
                    tl.store(base + (pos + window) * K + k, z, mask=token)
                    tl.debug_barrier()
                    t = tl.where(seen < window, seen, pos + window)
                    first = tl.maximum(t + 1 - window, 0)
                    total = tl.zeros([BLOCK_R], dtype=tl.float32)
                    for m in range(0, window):  # oldest first, as swim_at sums
                        total += tl.load(base + (first + m) * K + k, mask=token & (first + m <= t), other=0.0)
                    score = total / (t + 1 - first).to(tl.float32)
                thr = tl.load(thr_ptr + k)
                crossed = crossed | ~(score <= thr)
                tl.store(scores_ptr + row * K + k, score, mask=token)
            flag_token = tl.where(token & crossed & (flag_token < 0), seen, flag_token)
            seen = tl.where(token, seen + 1, seen)
            tl.debug_barrier()  # the next token reads this one's state
        tl.store(meta_ptr + ids * 3 + 1, flag_token, mask=live)
        tl.store(meta_ptr + ids * 3, seen, mask=live)
        tl.store(flagged_ptr + rows, (flag_token >= 0).to(tl.int8), mask=r_ok)


def _launch_stream_step(
    state, meta, status, slot_ids, token_starts, token_counts, token_logits, active, threshold, window, ema_alpha
):
    n = slot_ids.shape[0]
    N, K = token_logits.shape
    segments = token_starts is not None
    # Token rows outside every segment score 0: the one-token kernel writes every row itself.
    scores = (torch.zeros if segments else torch.empty)((N, K), dtype=torch.float32, device=state.device)
    flagged = torch.empty((n,), dtype=torch.bool, device=state.device)
    ids = slot_ids.to(torch.int64).contiguous()
    z = token_logits.to(torch.float32).contiguous()
    starts = token_starts.to(torch.int64).contiguous() if segments else ids
    counts = token_counts.to(torch.int64).contiguous() if segments else ids
    act = active.to(torch.int8).contiguous() if active is not None else ids
    _stream_step_kernel[(1,)](
        state,
        meta,
        status,
        ids,
        starts,
        counts,
        z,
        act,
        threshold.to(torch.float32).contiguous(),
        scores,
        flagged.view(torch.int8),
        state.shape[0],
        n,
        N,
        K,
        window,
        float(ema_alpha),
        SEGMENTS=segments,
        HAS_ACTIVE=active is not None,
        BLOCK_R=max(16, triton.next_power_of_2(n)),
    )
    return scores, flagged


@torch.library.custom_op("pykernels::probe_stream_step_triton", mutates_args=("state", "meta", "status"))
def probe_stream_step_triton(
    state: torch.Tensor,
    meta: torch.Tensor,
    status: torch.Tensor,
    slot_ids: torch.Tensor,
    token_logits: torch.Tensor,
    active: Optional[torch.Tensor],
    threshold: torch.Tensor,
    window: int,
    ema_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_stream_step(
        state, meta, status, slot_ids, None, None, token_logits, active, threshold, window, ema_alpha
    )


@torch.library.custom_op("pykernels::probe_stream_step_varlen_triton", mutates_args=("state", "meta", "status"))
def probe_stream_step_varlen_triton(
    state: torch.Tensor,
    meta: torch.Tensor,
    status: torch.Tensor,
    slot_ids: torch.Tensor,
    token_starts: torch.Tensor,
    token_counts: torch.Tensor,
    token_logits: torch.Tensor,
    threshold: torch.Tensor,
    window: int,
    ema_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_stream_step(
        state, meta, status, slot_ids, token_starts, token_counts, token_logits, None, threshold, window, ema_alpha
    )


# ---------------------------------------------------------------- softmax_weighted_bce


@triton.jit
def _swbce_kernel(
    z_ptr,
    y_ptr,
    len_ptr,
    loss_ptr,
    grad_ptr,
    work_ptr,
    T,
    window,
    window_loop,
    tau_ptr,
    DETACH: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program per sequence, looping over T in blocks like the CUDA kernel: work[b] holds
    # zbar, then d loss / d zbar_t / count_t. window_loop = min(window, T) bounds the window sums.
    tau = tl.load(tau_ptr)
    b = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b), 1), T)
    first = tl.where(n >= window, window - 1, n - 1)
    z_row = z_ptr + b * T
    work_row = work_ptr + b * T
    top = tl.full([BLOCK_T], float("-inf"), dtype=z_ptr.dtype.element_ty)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        pred = (t >= first) & (t < n)
        start = tl.maximum(t + 1 - window, 0)
        zsum = tl.zeros([BLOCK_T], dtype=z_ptr.dtype.element_ty)
        for m in range(0, window_loop):  # oldest first, as swim_at sums
            s = start + m
            zsum += tl.load(z_row + s, mask=pred & (s <= t), other=0.0)
        zbar = zsum / (t + 1 - start).to(zsum.dtype)
        tl.store(work_row + t, zbar, mask=pred)
        scaled = tl.where(pred, zbar / tau, float("-inf"))
        top = tl.maximum(top, tl.where(scaled == scaled, scaled, float("-inf")))  # NaN reaches the loss via exp
    top = tl.max(top, axis=0)
    top = tl.where(top > float("-inf"), top, 0.0)
    y = tl.load(y_ptr + b)
    tl.debug_barrier()
    denom = tl.zeros([BLOCK_T], dtype=z_ptr.dtype.element_ty)
    weighted = tl.zeros([BLOCK_T], dtype=z_ptr.dtype.element_ty)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        pred = (t >= first) & (t < n)
        zbar = tl.load(work_row + t, mask=pred, other=0.0)
        e = tl.where(pred, tl.exp(zbar / tau - top), 0.0)
        bce = tl.maximum(zbar, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(zbar))) - y * zbar
        denom += e
        weighted += tl.where(pred, e * bce, 0.0)
    total = tl.sum(denom, axis=0)
    loss = tl.sum(weighted, axis=0) / total
    tl.store(loss_ptr + b, loss)
    if GRAD:
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            pred = (t >= first) & (t < n)
            zbar = tl.load(work_row + t, mask=pred, other=0.0)
            w = tl.exp(zbar / tau - top) / total
            bce = tl.maximum(zbar, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(zbar))) - y * zbar
            g = w * (1.0 / (1.0 + tl.exp(-zbar)) - y)
            if not DETACH:
                g += w * (bce - loss) / tau
            g = g / tl.minimum(t + 1, window).to(g.dtype)
            tl.store(work_row + t, g, mask=pred)
        tl.debug_barrier()
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            acc = tl.zeros([BLOCK_T], dtype=z_ptr.dtype.element_ty)
            for m in range(0, window_loop):  # predictions u = t + m whose window holds t
                u = t + m
                acc += tl.load(work_row + u, mask=(t < n) & (u >= first) & (u < n), other=0.0)
            tl.store(grad_ptr + b * T + t, acc, mask=t < T)


@torch.library.custom_op("pykernels::softmax_weighted_bce_fwd_triton", mutates_args=())
def softmax_weighted_bce_fwd_triton(
    token_logits: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    window: int,
    tau: float,
    detach_weights: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    z = token_logits.contiguous()
    B, T = z.shape
    loss = torch.empty((B,), dtype=z.dtype, device=z.device)
    grad = torch.empty((B, T) if compute_grad else (0,), dtype=z.dtype, device=z.device)
    if B == 0 or T == 0:
        return loss, grad
    work = torch.empty_like(z)
    _swbce_kernel[(B,)](
        z,
        labels.to(z.dtype).contiguous(),
        lengths.to(torch.int64).contiguous(),
        loss,
        grad if compute_grad else z,
        work,
        T,
        window,
        min(window, T),
        torch.full((1,), tau, dtype=z.dtype, device=z.device),
        DETACH=detach_weights,
        GRAD=compute_grad,
        BLOCK_T=min(1024, triton.next_power_of_2(T)),
    )
    return loss, grad


_ops.register_triton_twins(
    "probe_accumulate_", "probe_stream_step", "probe_stream_step_varlen", "softmax_weighted_bce_fwd"
)
