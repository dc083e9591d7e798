"""Triton model-selection ops: the same algorithms as the CUDA kernels (csrc/core/parc_cuda.cu),
registered as the custom ops pykernels::{pairwise_corr_distance,spearman,parc_spearman}_triton.

Triton has no device-wide sort, so the ranking ops sort with torch.sort between two kernels:
one that builds the sort keys, one that turns sorted keys into ranks / rank sums by binary
search (tie groups are found as [lower_bound, upper_bound) of each value). The ranking kernels
run one program per (row, block of BLOCK values), flattened onto grid axis 0 (up to 2^31 - 1
programs; axes 1 and 2 stop at 65,535, which M = N(N-1)/2 pairs passes at N ~ 11,600).
parc_spearman works through the models in chunks (one model's keys at least), like the CUDA
path, so its scratch does not grow with the batch, and it never syncs with the host. Registered with
torch.library.custom_op + explicit fake kernels rather than triton_op (testable under
TRITON_INTERPRET=1; see pykernels/triton/probe_scores.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _ops
from ._index import triu_offset

_KEY_BYTES_PER_CHUNK = 1 << 28  # parc_spearman: sort keys of this many bytes of models at a time


@triton.jit
def _normalize_rows_kernel(x_ptr, z_ptr, D, BLOCK_D: tl.constexpr):
    """z_row = (x_row - mean) / |x_row - mean|, statistics in float64; NaN for an undefined row."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * D
    total = tl.zeros([BLOCK_D], dtype=tl.float64)
    first = tl.load(x_row)
    varies = tl.zeros([BLOCK_D], dtype=tl.int32)  # a constant row is undefined however its mean rounds
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_row + ks, mask=ks < D, other=0.0)
        total += x.to(tl.float64)
        varies += tl.where((ks < D) & (x != first), 1, 0)
    mean = tl.sum(total, axis=0) / D
    squares = tl.zeros([BLOCK_D], dtype=tl.float64)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        c = tl.load(x_row + ks, mask=ks < D, other=0.0).to(tl.float64) - mean
        squares += tl.where(ks < D, c * c, 0.0)
    norm2 = tl.sum(squares, axis=0)
    inv = 1.0 / tl.sqrt(norm2)
    valid = (tl.sum(varies, axis=0) > 0) & (norm2 > 0.0) & (norm2 < float("inf")) & (inv == inv)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        c = tl.load(x_row + ks, mask=ks < D, other=0.0).to(tl.float64) - mean
        z = tl.where(valid, c * inv, float("nan"))
        tl.store(z_ptr + row * D + ks, z.to(z_ptr.dtype.element_ty), mask=ks < D)


@triton.jit
def _tile_correlation(
    z_ptr, b, i, j, N, D, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr
):
    """r[i, j] = <z_i, z_j> for a BLOCK_I x BLOCK_J tile of model b, clipped to [-1, 1]."""
    base = z_ptr + b.to(tl.int64) * N * D
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=z_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        zi = tl.load(base + i[:, None] * D + ks[None, :], mask=(i[:, None] < N) & (ks[None, :] < D), other=0.0)
        zj = tl.load(base + j[:, None] * D + ks[None, :], mask=(j[:, None] < N) & (ks[None, :] < D), other=0.0)
        if USE_DOT:
            acc += tl.dot(zi, tl.trans(zj), input_precision="ieee")
        else:
            acc += tl.sum(zi[:, None, :] * zj[None, :, :], axis=2)
    # Bit-equal rows (duplicated samples) correlate exactly 1, exact negatives -1 (see
    # duplicate_correlation in csrc/core/parc.h); the 0.999 gate only saves work.
    near = (acc >= 0.999) | (acc <= -0.999)
    if tl.max(near.to(tl.int32)) > 0:
        equal = near & (acc > 0)
        negated = near & (acc < 0)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            zi = tl.load(base + i[:, None] * D + ks[None, :], mask=(i[:, None] < N) & (ks[None, :] < D), other=0.0)
            zj = tl.load(base + j[:, None] * D + ks[None, :], mask=(j[:, None] < N) & (ks[None, :] < D), other=0.0)
            a = zi[:, None, :]
            c = zj[None, :, :]
            equal = equal & (tl.max(tl.where(a != c, 1, 0), axis=2) == 0)
            negated = negated & (tl.max(tl.where(a != -c, 1, 0), axis=2) == 0)
        acc = tl.where(equal, 1.0, tl.where(negated, -1.0, acc))
    # Comparisons are false for NaN, so an undefined row stays NaN.
    return tl.where(acc > 1.0, 1.0, tl.where(acc < -1.0, -1.0, acc))


@triton.jit
def _distance_kernel(
    z_ptr,
    out_ptr,
    N,
    D,
    TRIU: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    if TRIU and tl.program_id(2) * BLOCK_J + BLOCK_J <= tl.program_id(1) * BLOCK_I:
        return  # tile wholly below the diagonal
    r = _tile_correlation(z_ptr, b, i, j, N, D, BLOCK_I, BLOCK_J, BLOCK_D, USE_DOT)
    dist = 1.0 - r
    ii, jj = i[:, None], j[None, :]
    inside = (ii < N) & (jj < N)
    if TRIU:
        tl.store(out_ptr + triu_offset(b, ii, jj, N), dist.to(out_ptr.dtype.element_ty), mask=inside & (ii < jj))
    else:
        dist = tl.where(ii == jj, tl.where(r == r, 0.0, r), dist)  # zero diagonal, NaN if undefined
        tl.store(out_ptr + b.to(tl.int64) * N * N + ii * N + jj, dist.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _parc_keys_kernel(
    z_ptr, block_end_ptr, keys_ptr, N, D, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Sort keys of every pair of model b in class order (see parc_pair_key in csrc/core/parc.h):
    the distance's bits, with the sign bit set for a same-class pair."""
    b = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    if tl.program_id(2) * BLOCK_J + BLOCK_J <= tl.program_id(1) * BLOCK_I:
        return
    dist = 1.0 - _tile_correlation(z_ptr, b, i, j, N, D, BLOCK_I, BLOCK_J, BLOCK_D, False)
    dist = tl.where(dist == 0.0, 0.0, dist)  # -0 -> +0
    ii, jj = i[:, None], j[None, :]
    ok = (ii < N) & (jj < N) & (ii < jj)
    end = tl.load(block_end_ptr + i, mask=i < N, other=0)[:, None]
    bits = dist.to(tl.int64, bitcast=True)
    keys = tl.where(jj < end, bits | -9223372036854775808, bits)
    tl.store(keys_ptr + triu_offset(b, ii, jj, N), keys, mask=ok)


@triton.jit
def _bound(row_ptr, lo0, hi0, target, ok, STEPS: tl.constexpr, STRICT: tl.constexpr):
    """First position in [lo0, hi0) of a sorted row whose value is >= target (STRICT: > target)."""
    lo = lo0
    hi = hi0
    for _ in range(STEPS):
        active = ok & (lo < hi)
        mid = (lo + hi) // 2
        v = tl.load(row_ptr + mid, mask=active, other=0)
        right = (v <= target) if STRICT else (v < target)
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _row_block(M, BLOCK: tl.constexpr):
    """(row, positions of this block in the row) of a program on the flat 1-D grid of
    rows x cdiv(M, BLOCK) blocks; the program id is also the index of its partial result."""
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(M, BLOCK)
    return pid // blocks, (pid % blocks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _midrank_kernel(sorted_ptr, index_ptr, ranks_ptr, ties_ptr, M, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """Doubled average ranks from one sorted row: the tie group of position p is
    [lower_bound, upper_bound) of its value, and 2 * rank = lower + upper + 1."""
    row, p = _row_block(M, BLOCK)
    ok = p < M
    srow = sorted_ptr + row * M
    v = tl.load(srow + p, mask=ok, other=0)
    zero = tl.zeros([BLOCK], dtype=tl.int64)
    lo = _bound(srow, zero, zero + M, v, ok, STEPS, False)
    hi = _bound(srow, zero, zero + M, v, ok, STEPS, True)
    idx = tl.load(index_ptr + row * M + p, mask=ok, other=0)
    tl.store(ranks_ptr + row * M + idx, lo + hi + 1, mask=ok)
    t = (hi - lo).to(tl.float64)
    tl.store(ties_ptr + tl.program_id(0), tl.sum(tl.where(ok & (p == lo), t * t * t - t, 0.0), axis=0))


@triton.jit
def _rank_products_kernel(rx_ptr, ry_ptr, out_ptr, M, Y_STRIDE, BLOCK: tl.constexpr):
    """Per block: sum of (2 r_x - M - 1)(2 r_y - M - 1); each product is exact in int64."""
    row, p = _row_block(M, BLOCK)
    ok = p < M
    cx = tl.load(rx_ptr + row * M + p, mask=ok, other=0) - M - 1
    cy = tl.load(ry_ptr + row * Y_STRIDE + p, mask=ok, other=0) - M - 1
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.where(ok, (cx * cy).to(tl.float64), 0.0), axis=0))


@triton.jit
def _parc_count_kernel(keys_ptr, n_same_ptr, twice_u_ptr, ties_ptr, M, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """From one model's sorted keys [same-class | different-class]: per block, 2U (each
    different-class value against the same-class values below / equal to it) and the tie sum.
    n_same (the same-class pair count) is read from device memory: no host sync."""
    b, p = _row_block(M, BLOCK)
    ok = p < M
    n_same = tl.load(n_same_ptr)
    row = keys_ptr + b * M
    key = tl.load(row + p, mask=ok, other=0)
    is_same = p < n_same
    value_bits = key & 9223372036854775807
    zero = tl.zeros([BLOCK], dtype=tl.int64)
    # Same-class values equal to this value: [lo, hi) of the same-class part.
    same_key = value_bits | -9223372036854775808
    lo = _bound(row, zero, zero + n_same, same_key, ok, STEPS, False)
    hi = _bound(row, zero, zero + n_same, same_key, ok, STEPS, True)
    # This value's run in its own part.
    run_end = _bound(row, p, tl.where(is_same, n_same, M), key, ok, STEPS, True)
    prev = tl.load(row + p - 1, mask=ok & (p > 0), other=0)
    first = ok & ((p == 0) | (p == n_same) | (prev != key))
    a = (hi - lo).to(tl.float64)
    c = (run_end - p).to(tl.float64)
    # Tie groups: a same-class run counts a^3 - a; a different-class run of c values equal to a
    # same-class ones adds the rest of (a + c)^3 - (a + c).
    t = tl.where(is_same, a * a * a - a, (a + c) * (a + c) * (a + c) - (a + c) - (a * a * a - a))
    tl.store(ties_ptr + tl.program_id(0), tl.sum(tl.where(first, t, 0.0), axis=0))
    u = tl.where(ok & ~is_same, 2 * lo + (hi - lo), 0)
    tl.store(twice_u_ptr + tl.program_id(0), tl.sum(u, axis=0))


def _steps(n: int) -> int:
    return max(1, int(n).bit_length())


def _normalized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    B, N, D = x.shape
    z = torch.empty((B, N, D), dtype=dtype, device=x.device)
    if z.numel():
        _normalize_rows_kernel[(B * N,)](x, z, D, BLOCK_D=min(1024, triton.next_power_of_2(D)))
    return z


def _check_feature_dims(features: torch.Tensor, op: str) -> None:
    # The same check as the C++ bindings: a row of no values has no mean.
    torch._check(
        features.shape[2] > 0,
        lambda: f"{op}: features need at least one feature dim (D > 0), got {list(features.shape)}",
    )


def _tile_grid(B: int, N: int, block: int):
    # Models on axis 0 (up to 2^31 - 1); tiles on axes 1-2 (65,535 each) allow N up to ~1M samples,
    # whose N^2 distances are far past any GPU's memory.
    return (B, triton.cdiv(N, block), triton.cdiv(N, block))


@torch.library.custom_op("pykernels::pairwise_corr_distance_triton", mutates_args=())
def pairwise_corr_distance_triton(features: torch.Tensor, triu: bool) -> torch.Tensor:
    _check_feature_dims(features, "pairwise_corr_distance")
    B, N, D = features.shape
    x = features.contiguous()
    out = torch.empty((B, N * (N - 1) // 2) if triu else (B, N, N), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    z = _normalized(x, x.dtype)
    use_dot = x.dtype == torch.float32
    block = 32 if use_dot else 16
    _distance_kernel[_tile_grid(B, N, block)](
        z, out, N, D, TRIU=triu, BLOCK_I=block, BLOCK_J=block, BLOCK_D=32 if use_dot else 8, USE_DOT=use_dot
    )
    return out


def _twice_ranks(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Doubled average ranks [R, M] (int64) and tie sums [R] of each row of a NaN-free [R, M]."""
    R, M = values.shape
    ordered, index = torch.sort(values, dim=1, stable=True)
    ranks = torch.empty((R, M), dtype=torch.int64, device=values.device)
    blocks = triton.cdiv(M, block)
    ties = torch.empty((R, blocks), dtype=torch.float64, device=values.device)
    _midrank_kernel[(R * blocks,)](
        ordered.contiguous(), index.contiguous(), ranks, ties, M, STEPS=_steps(M), BLOCK=block
    )
    return ranks, ties.sum(1)


@torch.library.custom_op("pykernels::spearman_triton", mutates_args=())
def spearman_triton(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    R, M = x.shape
    out = torch.full((R,), float("nan"), dtype=torch.float64, device=x.device)
    if R == 0 or M < 2:
        return out
    block = 1024
    nan_row = torch.isnan(x).any(1) | torch.isnan(y).any(1)
    # NaN rows are ranked with their NaNs zeroed and masked out of the result afterwards.
    rx, tx = _twice_ranks(torch.nan_to_num(x, nan=0.0), block)
    shared = y.stride(0) == 0
    ry, ty = _twice_ranks(torch.nan_to_num(y[:1] if shared else y, nan=0.0), block)
    blocks = triton.cdiv(M, block)
    partial = torch.empty((R, blocks), dtype=torch.float64, device=x.device)
    _rank_products_kernel[(R * blocks,)](rx, ry, partial, M, 0 if shared else M, BLOCK=block)
    cube = float(M) ** 3 - M
    rho = 3.0 * partial.sum(1) / torch.sqrt((cube - tx) * (cube - ty))
    return torch.where(nan_row, out, rho)


def _label_side(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples ordered by class, the end of each position's class block, and n_same (a 0-d
    device tensor): built with tensor ops of fixed output size, as the CUDA binding does, so that
    nothing waits for the device."""
    n = classes.shape[0]
    order = torch.argsort(classes, stable=True)
    ordered = classes[order]
    position = torch.arange(n, device=classes.device)
    run_last = torch.ones(n, dtype=torch.bool, device=classes.device)
    run_last[:-1] = ordered[:-1] != ordered[1:]
    # The end of a position's run is the first run end at or after it: a reverse running minimum.
    run_end = torch.where(run_last, position + 1, n)
    block_end = torch.cummin(run_end.flip(0), 0).values.flip(0).contiguous()
    return order, block_end, (block_end - position - 1).sum()


@torch.library.custom_op("pykernels::parc_spearman_triton", mutates_args=())
def parc_spearman_triton(features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    _check_feature_dims(features, "parc_spearman")
    B, N, D = features.shape
    M = N * (N - 1) // 2
    out = torch.full((B,), float("nan"), dtype=torch.float64, device=features.device)
    if B == 0 or M == 0:
        return out
    # One-sided labels (n_same or n_diff = 0) give NaN at the end rather than an early return:
    # knowing that up front would need a host sync, and pykernels.parc rejects them before here.
    order, block_end, n_same = _label_side(classes)
    n_diff = M - n_same
    count_block = 1024
    blocks = triton.cdiv(M, count_block)
    # Keys of `chunk` models at once; torch.sort needs about twice as much again (values, indices).
    chunk = max(1, min(B, _KEY_BYTES_PER_CHUNK // (8 * M)))
    for b0 in range(0, B, chunk):
        x = features[b0 : b0 + chunk]
        z = _normalized(x.index_select(1, order).contiguous(), torch.float64)
        keys = torch.empty((x.shape[0], M), dtype=torch.int64, device=features.device)
        _parc_keys_kernel[_tile_grid(x.shape[0], N, 16)](z, block_end, keys, N, D, BLOCK_I=16, BLOCK_J=16, BLOCK_D=8)
        keys = torch.sort(keys, dim=1).values
        twice_u = torch.empty((x.shape[0], blocks), dtype=torch.int64, device=features.device)
        ties = torch.empty((x.shape[0], blocks), dtype=torch.float64, device=features.device)
        _parc_count_kernel[(x.shape[0] * blocks,)](keys, n_same, twice_u, ties, M, STEPS=_steps(M), BLOCK=count_block)
        del keys
        spread = (float(M) ** 3 - M - ties.sum(1)) / (12.0 * M)
        numerator = (twice_u.sum(1) - n_same * n_diff).double()
        rho = numerator / (2.0 * torch.sqrt(n_same * n_diff * spread))
        undefined = torch.isnan(z[:, :, 0]).any(1) | ~(spread > 0) | (n_same == 0) | (n_diff == 0)
        out[b0 : b0 + chunk] = torch.where(undefined, out[b0 : b0 + chunk], rho)
    return out


_ops.register_triton_twins("pairwise_corr_distance", "spearman", "parc_spearman")
