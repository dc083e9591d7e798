"""Loads the compiled operator library and registers what PyTorch needs around it.

The schemas live in C++ (csrc/ops/registration.cpp). Here: fake kernels so the
ops trace under torch.compile / torch.export, and autograd formulas (plain
torch ops, shared with the Triton custom ops). Importing this module never
fails: without the extension, `LOAD_ERROR` says why and the reference
backend serves every op.
"""

from __future__ import annotations

import warnings

import torch

try:  # written by setup.py next to the library it builds
    from ._build_info import TORCH_VERSION as BUILT_FOR_TORCH
except ImportError:  # a checkout before `setup.py build_ext`, or PYKERNELS_NO_EXTENSION=1
    BUILT_FOR_TORCH = None


class ExtensionWarning(UserWarning):
    """The compiled kernels (pykernels._C) cannot be used here; the reference serves every op."""


def torch_mismatch(built: str | None, running: str) -> str | None:
    """What to tell the user when a library built for torch `built` is imported with torch
    `running`, or None when it can load. torch's C++ ABI changes between releases, so
    the release must match; the local build tag (+cpu, +cu130) may differ."""
    if built is None or built.split("+")[0] == running.split("+")[0]:
        return None
    release = built.split("+")[0]
    return (f"pykernels' compiled kernels were built for torch {built}, but torch {running} is "
            f"installed, so they are not loaded and the plain-PyTorch reference serves every op "
            f"(slower). To use them, install the torch they were built for (pip install "
            f"torch=={release}) or build pykernels against yours (in its source tree: pip install "
            f"--no-build-isolation . or ./dev.sh setup).")


def _load_extension() -> str | None:
    """Loads pykernels._C unless it was built for another torch; why not, or None.
    Warns (once: this runs at import) when a built library cannot be used."""
    mismatch = torch_mismatch(BUILT_FOR_TORCH, torch.__version__)
    if mismatch:
        warnings.warn(mismatch, ExtensionWarning, stacklevel=2)
        return f"built for torch {BUILT_FOR_TORCH}, running torch {torch.__version__}"
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.pykernels.*)
    except Exception as exc:  # ImportError, an undefined symbol, a missing CUDA runtime
        error = f"{type(exc).__name__}: {exc}"
        if BUILT_FOR_TORCH is not None:  # built, yet it does not load: say so, not only in `backends`
            warnings.warn(f"pykernels' compiled kernels failed to load ({error}); the plain-PyTorch "
                          f"reference serves every op (slower)", ExtensionWarning, stacklevel=2)
        return error
    return None


LOAD_ERROR = _load_extension()
LOADED = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether pykernels::<op> has a kernel registered for `dispatch_key` ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::{op}", dispatch_key)


def cpu_isa() -> str | None:
    """The SIMD build the CPU kernels run ("avx512", "avx2", "scalar"), or None without _C."""
    return torch.ops.pykernels.cpu_isa() if LOADED else None


# ---- activation probes: probe_scores (probes/scoring.py), the guard (probes/stream.py, training.py) ----


def probe_scores_fake(hidden_states, weight, bias, lengths, smoothing, window, ema_alpha):
    h0 = hidden_states[0]
    return h0.new_empty((h0.shape[0], h0.shape[1], weight.shape[2]), dtype=torch.float32)


def probe_stream_step_fake(state, meta, status, slot_ids, token_logits, active, threshold, window, ema_alpha):
    n, K = token_logits.shape
    return token_logits.new_empty((n, K), dtype=torch.float32), token_logits.new_empty((n,), dtype=torch.bool)


def probe_stream_step_varlen_fake(state, meta, status, slot_ids, token_starts, token_counts, token_logits, threshold,
                                  window, ema_alpha):
    N, K = token_logits.shape
    return (token_logits.new_empty((N, K), dtype=torch.float32),
            token_logits.new_empty((slot_ids.shape[0],), dtype=torch.bool))


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
    if lengths is not None:  # padded scores are constant zeros, and padded activations are never read
        valid = (torch.arange(grad.shape[1], device=grad.device)[None, :] < lengths[:, None])[:, :, None]
        grad = grad * valid
        layers = [torch.where(valid, h, torch.zeros((), dtype=h.dtype, device=h.device)) for h in layers]
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
    torch.library.register_fake("pykernels::probe_scores")(probe_scores_fake)
    register_probe_scores_autograd("pykernels::probe_scores")

    @torch.library.register_fake("pykernels::probe_accumulate_")
    def _probe_accumulate_fake(acc, hidden, weight_l):
        return None

    torch.library.register_fake("pykernels::probe_stream_step")(probe_stream_step_fake)
    torch.library.register_fake("pykernels::probe_stream_step_varlen")(probe_stream_step_varlen_fake)

    @torch.library.register_fake("pykernels::softmax_weighted_bce_fwd")
    def _softmax_weighted_bce_fwd_fake(token_logits, labels, lengths, window, tau, detach_weights, compute_grad):
        B, T = token_logits.shape
        return token_logits.new_empty((B,)), token_logits.new_empty((B, T) if compute_grad else (0,))

    register_swbce_autograd("pykernels::softmax_weighted_bce_fwd")


# ---- flatness ops (pykernels/flatness/ops.py) ----
# Reverse-mode autograd (differentiable to any order: each backward is built from
# the ops themselves) and vmap rules, shared by the compiled ops and their Triton
# twins. The registered rules serve torch.compile and direct callers of
# torch.ops.pykernels.*; in eager mode pykernels.flatness.ops wraps the same
# formulas in autograd.Functions, which torch.func transforms (and forward mode) need.


def energy_vjp(logits, energy, grad):
    """d logits of energy = -logsumexp: -grad * softmax, from the saved output."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    softmax = torch.exp(logits.to(wide) + energy.to(wide).unsqueeze(-1))
    return (-grad.unsqueeze(-1) * softmax).to(logits.dtype)


def logsumexp_hvp_vjp(lse_hvp, logits, tangents, softmax, grad_softmax, grad_energy, grad_hvp):
    """Backward of (s, E, h) = logsumexp_hvp(logits, tangents), with A = diag(s) - s s^T
    (symmetric) and h_i = s * (u_i - s.u_i):
      d logits <- A (g_s + sum_i r_i) - g_E s,  r_i = g_h_i * (u_i - s.u_i) - (g_h_i . s) u_i
      d u_i    <- A g_h_i
    Every product with A is one more `lse_hvp` call, so the result is differentiable again."""
    s = softmax
    through_softmax = torch.zeros_like(logits) if grad_softmax is None else grad_softmax
    if grad_hvp is None:
        grad_logits, grad_tangents = lse_hvp(logits, through_softmax.unsqueeze(0))[2][0], None
    else:
        centred = tangents - (s * tangents).sum(-1, keepdim=True)
        r = grad_hvp * centred - (grad_hvp * s).sum(-1, keepdim=True) * tangents
        through_softmax = through_softmax + r.sum(0)
        products = lse_hvp(logits, torch.cat([through_softmax.unsqueeze(0), grad_hvp]))[2]
        grad_logits, grad_tangents = products[0], products[1:]
    if grad_energy is not None:
        grad_logits = grad_logits - grad_energy.unsqueeze(-1) * s
    return grad_logits, grad_tangents


def logsumexp_hvp_jvp(lse_hvp, logits, tangents, softmax, d_logits, d_tangents):
    """Forward-mode rule of logsumexp_hvp: ds = A dz, dE = -s . dz,
    dh_i = A du_i + ds * (u_i - s.u_i) - s (ds . u_i)."""
    s = softmax
    d_s = lse_hvp(logits, d_logits.unsqueeze(0))[2][0]
    d_h = lse_hvp(logits, d_tangents)[2] if d_tangents is not None else torch.zeros_like(tangents)
    centred = tangents - (s * tangents).sum(-1, keepdim=True)
    d_h = d_h + d_s * centred - s * (d_s * tangents).sum(-1, keepdim=True)
    return d_s, -(s * d_logits).sum(-1), d_h


def register_flatness_rules(energy: str, logsumexp_hvp: str, probe_dots: str) -> None:
    """Autograd and vmap rules for one backend's flatness ops, given their qualified names."""
    energy_op = _resolve(energy)
    lse_hvp_op = _resolve(logsumexp_hvp)

    def energy_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    def energy_backward(ctx, grad):
        return energy_vjp(*ctx.saved_tensors, grad)

    def energy_vmap(info, in_dims, logits):
        (dim,) = in_dims
        if dim is None:
            return energy_op(logits), None
        return energy_op(logits.movedim(dim, 0)), 0

    torch.library.register_autograd(energy, energy_backward, setup_context=energy_setup)
    torch.library.register_vmap(energy, energy_vmap)

    def lse_hvp_setup(ctx, inputs, output):
        logits, tangents = inputs
        ctx.save_for_backward(logits, tangents, output[0])

    def lse_hvp_backward(ctx, grad_softmax, grad_energy, grad_hvp):
        return logsumexp_hvp_vjp(lse_hvp_op, *ctx.saved_tensors, grad_softmax, grad_energy, grad_hvp)

    def lse_hvp_vmap(info, in_dims, logits, tangents):
        dim_l, dim_t = in_dims
        if dim_l is None and dim_t is None:
            return lse_hvp_op(logits, tangents), (None, None, None)
        if dim_l is None:  # only the tangents are batched: fold the vmap dim into S
            tangents = tangents.movedim(dim_t, 0)
            V, S = tangents.shape[:2]
            s, e, h = lse_hvp_op(logits, tangents.reshape(V * S, *tangents.shape[2:]))
            return (s, e, h.reshape(V, S, *h.shape[1:])), (None, None, 0)
        logits = logits.movedim(dim_l, 0)  # [V, ..., K]: the vmap dim becomes a leading row dim
        if dim_t is None:
            tangents = tangents.unsqueeze(1).expand(tangents.shape[0], logits.shape[0], *tangents.shape[1:])
        else:
            tangents = tangents.movedim(dim_t, 1)
        return lse_hvp_op(logits, tangents), (0, 0, 1)

    torch.library.register_autograd(logsumexp_hvp, lse_hvp_backward, setup_context=lse_hvp_setup)
    torch.library.register_vmap(logsumexp_hvp, lse_hvp_vmap)

    def dots_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def dots_backward(ctx, grad):
        v, w = ctx.saved_tensors
        return grad.unsqueeze(-1) * w, grad.unsqueeze(-1) * v

    torch.library.register_autograd(probe_dots, dots_backward, setup_context=dots_setup)


def _resolve(qualified: str):
    namespace, name = qualified.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


if LOADED:

    @torch.library.register_fake("pykernels::energy")
    def _energy_fake(logits):
        return logits.new_empty(logits.shape[:-1])

    @torch.library.register_fake("pykernels::logsumexp_hvp")
    def _logsumexp_hvp_fake(logits, tangents):
        return logits.new_empty(logits.shape), logits.new_empty(logits.shape[:-1]), tangents.new_empty(tangents.shape)

    @torch.library.register_fake("pykernels::fill_probes_")
    def _fill_probes_fake(out, seed, offset, kind):
        return None

    @torch.library.register_fake("pykernels::probe_dots")
    def _probe_dots_fake(v, w):
        return v.new_empty(v.shape[:2])

    register_flatness_rules("pykernels::energy", "pykernels::logsumexp_hvp", "pykernels::probe_dots")


# ---- model selection (selection/correlation.py) ----

if LOADED:

    @torch.library.register_fake("pykernels::pairwise_corr_distance")
    def _pairwise_corr_distance_fake(features, triu):
        B, N = features.shape[0], features.shape[1]
        return features.new_empty((B, N * (N - 1) // 2) if triu else (B, N, N))

    @torch.library.register_fake("pykernels::spearman")
    def _spearman_fake(x, y):
        return x.new_empty((x.shape[0],), dtype=torch.float64)

    @torch.library.register_fake("pykernels::parc_spearman")
    def _parc_spearman_fake(features, classes):
        return features.new_empty((features.shape[0],), dtype=torch.float64)

    from .reference.parc import register_distance_autograd

    register_distance_autograd("pykernels::pairwise_corr_distance")
