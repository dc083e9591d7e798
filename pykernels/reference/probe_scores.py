"""Reference probe scoring (spec: shared/spec/probes.md; API docs:
pykernels/probes/scoring.py)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def probe_logits(layers: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None,
                 *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
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


def swim(z: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window mean along dim 1 of z [B, T, K]: the mean of the last
    `window` values, or of the t + 1 available ones when t < window.

    Each window is summed on its own (no running sum), so a NaN affects exactly
    the windows that contain it.
    """
    T = z.shape[1]
    if T == 0:
        return z.clone()
    padded = F.pad(z.transpose(1, 2), (window - 1, 0))  # [B, K, T + window - 1], zeros in front
    sums = padded.unfold(2, window, 1).sum(-1)  # [B, K, T]
    counts = torch.arange(1, T + 1, device=z.device).clamp(max=window).to(z.dtype)
    return (sums / counts).transpose(1, 2)


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


def probe_scores(layers: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                 lengths: torch.Tensor | None, smoothing: str, window: int, ema_alpha: float,
                 *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Probe logits, smoothed along tokens; padded positions (t >= lengths[b]) hold 0.

    Smoothing only looks back in time, so padded tokens cannot reach valid ones.
    """
    z = probe_logits(layers, weight, bias, dtype=dtype)
    if smoothing == "swim":
        z = swim(z, window)
    elif smoothing == "ema":
        z = ema(z, ema_alpha)
    elif smoothing != "none":
        raise ValueError(f"smoothing must be 'none', 'swim' or 'ema', got {smoothing!r}")
    if lengths is not None:
        T = z.shape[1]
        valid = torch.arange(T, device=z.device)[None, :] < lengths.to(z.device)[:, None]
        z = torch.where(valid[:, :, None], z, torch.zeros((), dtype=z.dtype, device=z.device))
    return z
