"""Fused probe scoring over all layers' hidden states.

A linear probe over the concatenation of every layer's hidden state,
psi_t = [h_t^(1); ...; h_t^(L)], scores token t with z_t = W^T psi_t + b. Since
that equals sum_l W_l^T h_t^(l) + b, the kernels add one layer at a time into a
float32 accumulator, and neither the [B, T, L*H] concatenation nor an
[L, B, T, H] stack is ever built. Each activation is read from memory once for
any number of heads K on the CPU, for up to 8 heads with the CUDA kernel and 16
with Triton (more heads: once per group of 8 / 16). (A layer whose hidden dim is
not unit-stride, e.g. a transposed view, is the exception: the compiled kernels
first copy that layer.) The maths and the paper's figures: docs/probes.md.

Smoothing along tokens (per sequence, per head):
  "none"  z_t.
  "swim"  sliding-window mean, the paper's training-time smoothing: the mean of
          z over the last `window` tokens, and over the t + 1 tokens available
          when t < window, so every token has a score. Default window: 16 (the
          paper's M). A window past T gives the scores of window T, at the cost
          of T (not of the window).
  "ema"   e_1 = z_1, e_t = a z_t + (1 - a) e_{t-1}, the paper's inference-time
          smoothing (one number of state per sequence). The paper does not give
          a; the default here is a = 2 / (window + 1) (0.118 for window 16),
          which gives the EMA the same mean lag, (window - 1) / 2 tokens, as the
          window it replaces.

Padding: with `lengths`, tokens t >= lengths[b] are never read and their
scores are 0.0. Smoothing only looks back, so padding cannot reach valid scores,
and the backward does not read it either (NaN padding gives finite gradients).

NaN / Inf: a non-finite activation (or weight it meets) makes z_t non-finite
for every head at that token, and smoothing carries it to exactly the scores
whose definition includes z_t: token t only ("none"), tokens t .. t+window-1
("swim"), token t and every later token of the sequence ("ema" with a < 1).
Other tokens and sequences are untouched, on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_dim, check_int, check_tensor

DEFAULT_WINDOW = 16
SMOOTHINGS = ("none", "swim", "ema")


def default_ema_alpha(window: int) -> float:
    """a = 2 / (window + 1): the EMA whose mean lag equals a `window`-token mean's."""
    return 2.0 / (window + 1)


def resolve_ema_alpha(smoothing: str, window: int, ema_alpha: Optional[float]) -> float:
    """The EMA weight of the newest token, one rule for probe_scores, ProbeStream and
    LinearProbe: ema_alpha only with smoothing="ema", in (0, 1]; default 2 / (window + 1)."""
    if ema_alpha is None:
        return default_ema_alpha(window)
    if smoothing != "ema":
        raise ValueError(f"ema_alpha only applies to smoothing='ema', got smoothing={smoothing!r}")
    alpha = float(ema_alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ema_alpha must lie in (0, 1], got {ema_alpha}")
    return alpha


def as_layers(hidden_states) -> tuple[torch.Tensor, ...]:
    """hidden_states as a tuple of [B, T, H] layers (from a [L, B, T, H] tensor or a sequence),
    its type and layer count checked (shared by probe_scores and LinearProbe)."""
    if isinstance(hidden_states, torch.Tensor):
        check_tensor("hidden_states", hidden_states, ndim=4, shape_doc="[L, B, T, H] (or pass a list of [B, T, H])")
        if hidden_states.shape[0] == 0:
            raise ValueError(
                f"hidden_states must hold at least one layer (L >= 1), got shape {tuple(hidden_states.shape)}"
            )
        return tuple(hidden_states.unbind(0))
    if not isinstance(hidden_states, (list, tuple)):
        raise TypeError(
            f"hidden_states must be a [L, B, T, H] tensor or a sequence of [B, T, H] tensors, "
            f"got {type(hidden_states).__name__}"
        )
    if len(hidden_states) == 0:
        raise ValueError("hidden_states must hold at least one layer, got an empty sequence")
    return tuple(hidden_states)


def probe_scores(
    hidden_states: Union[torch.Tensor, Sequence[torch.Tensor]],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    smoothing: str = "swim",
    window: int = DEFAULT_WINDOW,
    ema_alpha: Optional[float] = None,
    lengths: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Score every token with K linear probes over all layers, then smooth.

    Args:
        hidden_states: L tensors [B, T, H] (e.g. Hugging Face `output_hidden_states`,
            without the embedding output if you choose), or one [L, B, T, H]
            tensor; float32, float16 or bfloat16; may be non-contiguous views.
        weight: [L, H, K] probe weights (K heads share one read of the activations).
        bias: optional [K].
        smoothing: "none", "swim" (default) or "ema"; see the module docstring.
        window: SWiM window, and the time scale of the default EMA decay (default 16).
        ema_alpha: EMA weight of the newest token, in (0, 1]; only with smoothing="ema".
            Default 2 / (window + 1).
        lengths: optional [B] integer valid lengths of right-padded sequences.
        backend: "reference", "cpu", "cuda" or "triton"; default: $PYKERNELS_BACKEND,
            else the fastest available for the tensors' device (pykernels.backends()).

    Returns:
        float32 [B, T, K] scores (logits, not probabilities); padded tokens hold 0.
    """
    layers = as_layers(hidden_states)
    h0 = check_tensor("hidden_states[0]", layers[0], ndim=3, dtypes=FLOAT_DTYPES, shape_doc="[B, T, H]")
    device = h0.device
    for i, h in enumerate(layers[1:], start=1):
        check_tensor(f"hidden_states[{i}]", h, ndim=3, dtypes=(h0.dtype,), device=device, shape_doc="[B, T, H]")
        if h.shape != h0.shape:
            raise ValueError(f"hidden_states[{i}] has shape {tuple(h.shape)} but layer 0 has {tuple(h0.shape)}")
    B, T, H = h0.shape
    check_tensor("weight", weight, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,), device=device, shape_doc="[L, H, K]")
    check_dim("weight", weight, 0, len(layers), "the number of layers L")
    check_dim("weight", weight, 1, H, "the hidden size H of hidden_states")
    K = weight.shape[2]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), device=device, shape_doc="[K]")
        check_dim("bias", bias, 0, K, "the number of heads K (weight.shape[2])")
    check_choice("smoothing", smoothing, SMOOTHINGS)
    check_int("window", window, minimum=1)
    alpha = resolve_ema_alpha(smoothing, window, ema_alpha)
    if lengths is not None:
        check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES, device=device, shape_doc="[B]")
        check_dim("lengths", lengths, 0, B, "the batch size B")
        _check_length_values(lengths, T)

    op = _backend.resolve("probe_scores", device, backend)
    return op(list(layers), weight, bias, lengths, smoothing, window, alpha)


def _check_length_values(lengths: torch.Tensor, T: int) -> None:
    # Reading the values costs a host sync on a GPU and is impossible while
    # compiling or capturing a CUDA graph; the kernels clamp lengths to [0, T]
    # anyway, so out-of-range values can never address memory outside the batch.
    if torch.compiler.is_compiling() or lengths.numel() == 0:
        return
    if lengths.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = torch.stack(torch.aminmax(lengths)).tolist()  # one host sync
    if lo < 0 or hi > T:
        raise ValueError(f"lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")
