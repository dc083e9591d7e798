"""Reference probe scoring (maths: docs/probes.md; API docs:
pykernels/probes/scoring.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def probe_logits(
    layers: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """z[b, t, k] = sum_l layers[l][b, t, :] . weight[l, :, k] + bias[k], in `dtype`.

    Summed layer by layer (the concatenation over layers is never built).
    """
    z = None
    for l, h in enumerate(layers):
        term = torch.matmul(h.to(dtype), weight[l].to(dtype))
        z = term if z is None else z + term
    if bias is not None:
        z = z + bias.to(dtype)
    return z


def window_sum(z: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of z over the last `window` tokens (fewer at the start), along dim 1
    of z [B, T, K]. Each window is summed on its own (no running sum), so a NaN
    affects exactly the windows that contain it."""
    if z.shape[1] == 0:
        return z.clone()
    window = min(window, z.shape[1])  # a longer window sums the same tokens
    padded = F.pad(z.transpose(1, 2), (window - 1, 0))  # [B, K, T + window - 1], zeros in front
    return padded.unfold(2, window, 1).sum(-1).transpose(1, 2)


def window_counts(T: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """[1, T, 1]: how many tokens the window ending at t covers, min(t + 1, window)."""
    return torch.arange(1, T + 1, device=like.device).clamp(max=window).to(like.dtype)[None, :, None]


def swim(z: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window mean along dim 1 of z [B, T, K]: the mean of the last
    `window` values, or of the t + 1 available ones when t < window."""
    return window_sum(z, window) / window_counts(z.shape[1], window, z)


def ema(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exponential moving average along dim 1 of z [B, T, K]:
    e_0 = z_0, e_t = alpha * z_t + (1 - alpha) * e_{t-1}."""
    if alpha == 1.0:  # e_t = z_t exactly; (1 - alpha) * NaN would leak a past NaN
        return z.clone()
    out = torch.empty_like(z)
    if z.shape[1] == 0:
        return out
    e = z[:, 0]
    out[:, 0] = e
    for t in range(1, z.shape[1]):
        e = alpha * z[:, t] + (1.0 - alpha) * e
        out[:, t] = e
    return out


def probe_scores(
    hidden_states: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lengths: torch.Tensor | None,
    smoothing: str,
    window: int,
    ema_alpha: float,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Probe logits, smoothed along tokens; padded positions (t >= lengths[b]) hold 0.

    Smoothing only looks back in time, so padded tokens cannot reach valid ones.
    """
    layers = hidden_states
    valid = None
    if lengths is not None:  # padding is never read: zeroed first, so no NaN there reaches a gradient
        T = layers[0].shape[1]
        valid = torch.arange(T, device=layers[0].device)[None, :, None] < lengths.to(layers[0].device)[:, None, None]
        layers = [torch.where(valid, h, torch.zeros((), dtype=h.dtype, device=h.device)) for h in layers]
    z = probe_logits(layers, weight, bias, dtype=dtype)
    if smoothing == "swim":
        z = swim(z, window)
    elif smoothing == "ema":
        z = ema(z, ema_alpha)
    elif smoothing != "none":
        raise ValueError(f"smoothing must be 'none', 'swim' or 'ema', got {smoothing!r}")
    if valid is not None:  # the bias made padded logits non-zero
        z = torch.where(valid, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return z


def smoothing_adjoint(grad: torch.Tensor, smoothing: str, window: int, ema_alpha: float) -> torch.Tensor:
    """Gradient with respect to the raw logits z [B, T, K] of the smoothed scores,
    given their gradient `grad` (zero at padded tokens).

    swim: dz_s = sum over outputs t in [s, s + window) of grad_t / count_t.
    ema:  the adjoint recurrence runs backwards in time,
          lam_t = grad_t + (1 - a) lam_{t+1};  dz_t = a lam_t (t >= 1), dz_0 = lam_0.
    """
    if smoothing == "none" or (smoothing == "swim" and window == 1):
        return grad
    T = grad.shape[1]
    if T == 0:
        return grad.clone()
    if smoothing == "swim":
        # The sum over later outputs is a causal window sum in reversed time.
        scaled = grad / window_counts(T, window, grad)
        return window_sum(scaled.flip(1), window).flip(1)
    if smoothing == "ema":
        a = ema_alpha
        if a == 1.0:
            return grad.clone()
        lam = torch.empty_like(grad)
        acc = torch.zeros_like(grad[:, 0])
        for t in range(T - 1, -1, -1):
            acc = grad[:, t] + (1.0 - a) * acc
            lam[:, t] = acc
        dz = lam * a
        dz[:, 0] = lam[:, 0]
        return dz
    raise ValueError(f"smoothing must be 'none', 'swim' or 'ema', got {smoothing!r}")


def probe_scores_backward(
    hidden_states: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias_dtype: torch.dtype | None,
    lengths: torch.Tensor | None,
    smoothing: str,
    window: int,
    ema_alpha: float,
    grad: torch.Tensor,
    needs_input_grad: Sequence[bool],
):
    """Gradients of probe_scores for (hidden_states, weight, bias) given the scores' gradient
    (None where not needed; bias_dtype None: no bias): the smoothing's adjoint maps grad to
    the raw logits, then one matmul per layer."""
    layers = hidden_states
    grad = grad.float()
    if lengths is not None:  # padded scores are constant zeros, and padded activations are never read
        valid = (torch.arange(grad.shape[1], device=grad.device)[None, :] < lengths[:, None])[:, :, None]
        grad = grad * valid
        layers = [torch.where(valid, h, torch.zeros((), dtype=h.dtype, device=h.device)) for h in layers]
    g = smoothing_adjoint(grad, smoothing, window, ema_alpha)  # [B, T, K]
    d_layers = None
    if needs_input_grad[0]:
        d_layers = [(g @ weight[l].float().T).to(h.dtype) for l, h in enumerate(layers)]
    d_weight = None
    if needs_input_grad[1]:
        g2 = g.reshape(-1, g.shape[-1])
        d_weight = torch.stack([h.reshape(-1, h.shape[-1]).float().T @ g2 for h in layers]).to(weight.dtype)
    d_bias = g.sum((0, 1)).to(bias_dtype) if bias_dtype is not None and needs_input_grad[2] else None
    return d_layers, d_weight, d_bias
