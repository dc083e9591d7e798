"""Loads the compiled operator library and registers what PyTorch needs around it.

The schemas live in C++ (csrc/ops/registration.cpp). Here: fake kernels so the
ops trace under torch.compile / torch.export, and autograd formulas (plain
torch ops, shared with the Triton custom ops). Importing this module never
fails: without the extension, `LOAD_ERROR` says why and the reference
backend serves every op.
"""

from __future__ import annotations

import torch

LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.pykernels.*)
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

LOADED = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether pykernels::<op> has a kernel registered for `dispatch_key` ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::{op}", dispatch_key)


def cpu_isa() -> str | None:
    """The SIMD build the CPU kernels run ("avx512", "avx2", "scalar"), or None without _C."""
    return torch.ops.pykernels.cpu_isa() if LOADED else None


def probe_scores_fake(hidden_states, weight, bias, lengths, smoothing, window, ema_alpha):
    h0 = hidden_states[0]
    return h0.new_empty((h0.shape[0], h0.shape[1], weight.shape[2]), dtype=torch.float32)


def _probe_scores_setup_context(ctx, inputs, output):
    hidden_states, weight, bias, lengths, smoothing, window, ema_alpha = inputs
    ctx.save_for_backward(*hidden_states, weight, lengths)
    ctx.num_layers = len(hidden_states)
    ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
    ctx.smoothing, ctx.window, ctx.ema_alpha = smoothing, window, ema_alpha


def _probe_scores_backward(ctx, grad):
    """Gradients for the probe (weight, bias) and the activations: the smoothing's
    adjoint maps grad to the raw logits, then one matmul per layer."""
    from .reference.probe_scores import smoothing_adjoint

    saved = ctx.saved_tensors
    layers, weight, lengths = saved[: ctx.num_layers], saved[ctx.num_layers], saved[ctx.num_layers + 1]
    grad = grad.float()
    if lengths is not None:  # padded scores are constant zeros
        valid = torch.arange(grad.shape[1], device=grad.device)[None, :] < lengths[:, None]
        grad = grad * valid[:, :, None]
    g = smoothing_adjoint(grad, ctx.smoothing, ctx.window, ctx.ema_alpha)  # [B, T, K]
    needs = ctx.needs_input_grad
    d_layers = None
    if needs[0]:
        d_layers = [(g @ weight[l].float().T).to(h.dtype) for l, h in enumerate(layers)]
    d_weight = None
    if needs[1]:
        g2 = g.reshape(-1, g.shape[-1])
        d_weight = torch.stack([h.reshape(-1, h.shape[-1]).float().T @ g2 for h in layers]).to(weight.dtype)
    d_bias = g.sum((0, 1)).to(ctx.bias_dtype) if ctx.has_bias and needs[2] else None
    return d_layers, d_weight, d_bias, None, None, None, None


def register_probe_scores_autograd(op) -> None:
    torch.library.register_autograd(op, _probe_scores_backward, setup_context=_probe_scores_setup_context)


if LOADED:
    torch.library.register_fake("pykernels::probe_scores")(probe_scores_fake)
    register_probe_scores_autograd("pykernels::probe_scores")
