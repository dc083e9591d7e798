"""Loads the compiled operator library and registers what PyTorch needs around it.

The schemas live in C++ (csrc/ops/registration.cpp). Here: fake kernels so the
ops trace under torch.compile / torch.export, and autograd. Importing this module never
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


def register_swbce_autograd(op: str) -> None:
    """The fused loss kernels return d loss_b / d z with the loss (computed in the
    same pass), so the backward only scales it by the incoming gradient."""

    def setup_context(ctx, inputs, output):
        token_logits, labels, *_, compute_grad = inputs
        if token_logits.requires_grad and not compute_grad:
            raise RuntimeError(f"{op}: token_logits requires grad, so call it with compute_grad=True")
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _grad_of_grad):
        if torch.is_grad_enabled():
            raise NotImplementedError("softmax_weighted_bce supports first-order gradients only (no create_graph)")
        (grad,) = ctx.saved_tensors
        return grad_loss[:, None] * grad, None, None, None, None, None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


if LOADED:

    @torch.library.register_fake("pykernels::probe_scores")
    def _probe_scores_fake(hidden_states, weight, bias, lengths, smoothing, window, ema_alpha):
        h0 = hidden_states[0]
        return h0.new_empty((h0.shape[0], h0.shape[1], weight.shape[2]), dtype=torch.float32)

    # ---- probe guard (pykernels/probes/stream.py, training.py) ----

    @torch.library.register_fake("pykernels::probe_accumulate_")
    def _probe_accumulate_fake(acc, hidden, weight_l):
        return None

    @torch.library.register_fake("pykernels::probe_stream_step")
    def _probe_stream_step_fake(state, meta, status, slot_ids, token_logits, active, threshold, window, ema_alpha):
        n, K = token_logits.shape
        return token_logits.new_empty((n, K), dtype=torch.float32), token_logits.new_empty((n,), dtype=torch.bool)

    @torch.library.register_fake("pykernels::softmax_weighted_bce_fwd")
    def _softmax_weighted_bce_fwd_fake(token_logits, labels, lengths, window, tau, detach_weights, compute_grad):
        B, T = token_logits.shape
        return token_logits.new_empty((B,)), token_logits.new_empty((B, T) if compute_grad else (0,))

    register_swbce_autograd("pykernels::softmax_weighted_bce_fwd")

