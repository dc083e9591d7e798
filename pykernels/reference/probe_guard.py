"""Reference probe-guard ops (maths: docs/probes.md; API docs:
pykernels/probes/stream.py and training.py). Plain PyTorch, any float dtype,
differentiable where a gradient is meaningful."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .probe_scores import swim

# status[1] error bits, as in csrc/core/probe_guard.h
SLOT_OUT_OF_RANGE, SLOT_DUPLICATED, SEGMENT_OUT_OF_RANGE = 1, 2, 4
COUNT, FLAG_TOKEN, STAMP = 0, 1, 2  # meta columns


def probe_accumulate_(acc: torch.Tensor, hidden: torch.Tensor, weight_l: torch.Tensor) -> None:
    """acc[n, k] += hidden[n, :] . weight_l[:, k], in float32."""
    acc.add_(hidden.float() @ weight_l.float())


def probe_stream_step(state, meta, status, slot_ids, token_logits, active, threshold, window: int, ema_alpha: float):
    """One streaming step over per-slot state; the layout and rules of
    csrc/core/probe_guard.h (window 0 = EMA). Returns (scores [n, K], flagged [n])."""
    n = slot_ids.shape[0]
    return _steps(
        state,
        meta,
        status,
        slot_ids,
        torch.arange(n),
        torch.ones(n, dtype=torch.int64),
        token_logits,
        active,
        threshold,
        window,
        ema_alpha,
        segmented=False,
    )


def probe_stream_step_varlen(
    state, meta, status, slot_ids, token_starts, token_counts, token_logits, threshold, window: int, ema_alpha: float
):
    """probe_stream_step over a segment per slot: slot slot_ids[r] steps through token rows
    [token_starts[r], token_starts[r] + token_counts[r]) in order. Returns (scores [N, K]
    (0 outside every segment), flagged [n])."""
    return _steps(
        state,
        meta,
        status,
        slot_ids,
        token_starts,
        token_counts,
        token_logits,
        None,
        threshold,
        window,
        ema_alpha,
        segmented=True,
    )


def _segments_ok(starts: list, counts: list, tokens: int) -> bool:
    end = 0
    for begin, count in zip(starts, counts):
        if not (end <= begin <= tokens and 0 <= count <= tokens - begin):
            return False
        end = begin + count
    return True


def _steps(
    state, meta, status, slot_ids, starts, counts, token_logits, active, threshold, window, ema_alpha, segmented
):
    S, _, K = state.shape
    n, N = slot_ids.shape[0], token_logits.shape[0]
    ids = slot_ids.long()
    starts, counts = starts.long().tolist(), counts.long().tolist()
    status[0] += 1
    error = 0
    if ((ids < 0) | (ids >= S)).any():
        error |= SLOT_OUT_OF_RANGE
    elif ids.unique().numel() != n:
        error |= SLOT_DUPLICATED
    if segmented and not _segments_ok(starts, counts, N):
        error |= SEGMENT_OUT_OF_RANGE
    scores = torch.zeros(N, K, device=state.device)
    if error:
        status[1] |= error
        for begin, count in zip(starts, counts):  # NaN for the segments' tokens inside [0, N)
            lo, hi = max(begin, 0), min(begin + count, N)
            if hi > lo:
                scores[lo:hi] = float("nan")
        return scores, torch.ones(n, dtype=torch.bool, device=state.device)
    flagged = torch.zeros(n, dtype=torch.bool, device=state.device)
    for r in range(n):
        s = int(ids[r])
        m = meta[s]
        if active is None or bool(active[r]):
            for i in range(starts[r], starts[r] + counts[r]):
                scores[i] = _token(state[s], m, token_logits[i].float(), threshold, window, ema_alpha)
        flagged[r] = bool(m[FLAG_TOKEN] >= 0)
    return scores, flagged


def _token(state, m, z, threshold, window: int, ema_alpha: float):
    """Appends logits z [K] to one slot's state and meta row; returns the smoothed scores."""
    count = int(m[COUNT])
    if window == 0:
        # alpha == 1 forgets the past exactly (no 0 * NaN), as ema_apply does
        e = z if count == 0 or ema_alpha == 1.0 else ema_alpha * z + (1.0 - ema_alpha) * state[0]
        state[0] = e
        score = e
    else:
        pos = count % window
        state[pos] = z
        state[pos + window] = z
        t = count if count < window else pos + window
        first = max(0, t + 1 - window)
        total = torch.zeros_like(z)
        for i in range(first, t + 1):  # oldest first, as swim_at sums
            total = total + state[i]
        score = total / (t + 1 - first)
    crossed = bool((~(score <= threshold.float())).any())  # NaN crosses (fail closed)
    if crossed and int(m[FLAG_TOKEN]) < 0:
        m[FLAG_TOKEN] = count
    m[COUNT] = count + 1
    return score


def _predictions(z: torch.Tensor, lengths: torch.Tensor, window: int):
    """SWiM logits [B, T] and the mask of the positions that make predictions:
    t in [window - 1, n - 1], or only t = n - 1 when n < window."""
    t = torch.arange(z.shape[1], device=z.device)[None, :]
    n = lengths.to(z.device).long()[:, None]
    # Padding is never read: zeroed before anything touches it, so a NaN / Inf there reaches
    # neither the loss nor (through 0 * NaN in a backward) the gradient.
    z = torch.where(t < n, z, torch.zeros((), dtype=z.dtype, device=z.device))
    zbar = swim(z[:, :, None], window)[:, :, 0]
    first = torch.where(n >= window, torch.full_like(n, window - 1), n - 1)
    return zbar, (t >= first) & (t < n)


def softmax_weighted_bce(token_logits, labels, lengths, window=16, tau=1.0, detach_weights=False, reduction="mean"):
    """The paper's loss: softmax(zbar / tau)-weighted BCE over the SWiM predictions."""
    zbar, pred = _predictions(token_logits, lengths, window)
    y = labels.to(zbar.dtype)[:, None]
    w = torch.softmax(torch.where(pred, zbar / tau, torch.full_like(zbar, float("-inf"))), dim=1)
    if detach_weights:
        w = w.detach()
    bce = torch.logaddexp(zbar, torch.zeros_like(zbar)) - y * zbar  # softplus, exact past F.softplus' threshold
    loss = (w * torch.where(pred, bce, torch.zeros_like(bce))).sum(1)
    return loss.mean() if reduction == "mean" else loss


def softmax_weighted_bce_fwd(
    token_logits, labels, lengths, window: int, tau: float, detach_weights: bool, compute_grad: bool
):
    """The fused kernels' contract: (per-sequence losses [B], and when compute_grad their
    gradient d loss_b / d token_logits [B, T], else an empty [0])."""
    if not compute_grad:
        loss = softmax_weighted_bce(token_logits, labels, lengths, window, tau, detach_weights, reduction="none")
        return loss, token_logits.new_empty((0,))
    with torch.enable_grad():
        z = token_logits.detach().requires_grad_(True)
        loss = softmax_weighted_bce(z, labels, lengths, window, tau, detach_weights, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


def _mean_bce_of_probabilities(p, labels, pred, reduction):
    y = labels.to(p.dtype)[:, None].expand_as(p)
    bce = F.binary_cross_entropy(p.clamp(0.0, 1.0), y, reduction="none")
    loss = torch.where(pred, bce, torch.zeros_like(bce)).sum(1) / pred.sum(1)
    return loss.mean() if reduction == "mean" else loss


def cumulative_max_bce(token_logits, labels, lengths, window=16, reduction="mean"):
    """Uniformly weighted BCE of p_t = max over predictions s <= t of sigmoid(zbar_s)."""
    zbar, pred = _predictions(token_logits, lengths, window)
    p = torch.where(pred, torch.sigmoid(zbar), torch.zeros_like(zbar)).cummax(dim=1).values
    return _mean_bce_of_probabilities(p, labels, pred, reduction)


def annealed_bce(token_logits, labels, lengths, mix, window=16, reduction="mean"):
    """Uniformly weighted BCE of (1 - mix) * sigmoid(zbar_t) + mix * max_{s <= t} sigmoid(zbar_s);
    the caller raises `mix` from 0 to 1 over training."""
    zbar, pred = _predictions(token_logits, lengths, window)
    p = torch.where(pred, torch.sigmoid(zbar), torch.zeros_like(zbar))
    q = (1.0 - mix) * p + mix * p.cummax(dim=1).values
    return _mean_bce_of_probabilities(q, labels, pred, reduction)
