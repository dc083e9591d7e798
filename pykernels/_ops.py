"""Loads the compiled operator library and registers what PyTorch needs around it.

The schemas live in C++ (csrc/ops/registration.cpp). Here, `RULES` is the one
table of what each schema needs from Python: a fake kernel (so the op traces
under torch.compile / torch.export), and for a differentiable op its autograd
rule (and vmap rule where it has one). `register_rules` applies an entry to
pykernels::<op> and, from pykernels/triton/<family>.py, to its Triton twin
pykernels::<triton_name(op)>. The derivative formulas live next to their forward
in pykernels/reference/<family>.py; here is only the ctx glue. Importing this
module never fails: without the extension, `LOAD_ERROR` says why and the
reference backend serves every op.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple, Optional

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
    return (
        f"pykernels' compiled kernels were built for torch {built}, but torch {running} is "
        f"installed, so they are not loaded and the plain-PyTorch reference serves every op "
        f"(slower). To use them, install the torch they were built for (pip install "
        f"torch=={release}) or build pykernels against yours (in its source tree: pip install "
        f"--no-build-isolation . or ./dev.sh setup)."
    )


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
            warnings.warn(
                f"pykernels' compiled kernels failed to load ({error}); the plain-PyTorch "
                f"reference serves every op (slower)",
                ExtensionWarning,
                stacklevel=2,
            )
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


# ---- the table: one entry per schema of csrc/ops/registration.cpp ----


class Rules(NamedTuple):
    """What one schema needs from Python, applied alike to the op and its Triton twin.

    fake: the fake (meta) kernel; None only for a schema without tensors (cpu_isa).
    autograd: autograd(op) -> (backward, setup_context) for a differentiable op; `op` is
        the registered op itself (the rules of energy and logsumexp_hvp call it again).
    vmap: vmap(op) -> the vmap rule, where the op has one.
    """

    fake: Optional[Callable] = None
    autograd: Optional[Callable] = None
    vmap: Optional[Callable] = None


def triton_name(op: str) -> str:
    """The Triton twin of schema `op`: `<op>_triton`, an in-place op keeping its trailing
    underscore at the end (probe_accumulate_ -> probe_accumulate_triton_)."""
    return op[:-1] + "_triton_" if op.endswith("_") else op + "_triton"


# ---- activation probes: probe_scores (probes/scoring.py), the guard (probes/stream.py, training.py) ----


def _probe_scores_fake(hidden_states, weight, bias, lengths, smoothing, window, ema_alpha):
    h0 = hidden_states[0]
    return h0.new_empty((h0.shape[0], h0.shape[1], weight.shape[2]), dtype=torch.float32)


def _probe_scores_autograd(op):
    from .reference.probe_scores import probe_scores_backward

    def setup_context(ctx, inputs, output):
        hidden_states, weight, bias, lengths, smoothing, window, ema_alpha = inputs
        ctx.save_for_backward(*hidden_states, weight, lengths)
        ctx.num_layers = len(hidden_states)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.smoothing, ctx.window, ctx.ema_alpha = smoothing, window, ema_alpha

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        layers, weight, lengths = saved[: ctx.num_layers], saved[ctx.num_layers], saved[ctx.num_layers + 1]
        grads = probe_scores_backward(
            layers,
            weight,
            ctx.bias_dtype,
            lengths,
            ctx.smoothing,
            ctx.window,
            ctx.ema_alpha,
            grad,
            ctx.needs_input_grad,
        )
        return *grads, None, None, None, None

    return backward, setup_context


def _no_output_fake(*args):
    return None


def _probe_stream_step_fake(state, meta, status, slot_ids, token_logits, active, threshold, window, ema_alpha):
    n, K = token_logits.shape
    return token_logits.new_empty((n, K), dtype=torch.float32), token_logits.new_empty((n,), dtype=torch.bool)


def _probe_stream_step_varlen_fake(
    state, meta, status, slot_ids, token_starts, token_counts, token_logits, threshold, window, ema_alpha
):
    N, K = token_logits.shape
    return (
        token_logits.new_empty((N, K), dtype=torch.float32),
        token_logits.new_empty((slot_ids.shape[0],), dtype=torch.bool),
    )


def _softmax_weighted_bce_fwd_fake(token_logits, labels, lengths, window, tau, detach_weights, compute_grad):
    B, T = token_logits.shape
    return token_logits.new_empty((B,)), token_logits.new_empty((B, T) if compute_grad else (0,))


def _softmax_weighted_bce_fwd_autograd(op):
    """The fused loss kernels return d loss_b / d z with the loss (computed in the
    same pass), so the backward only scales it by the incoming gradient."""

    def setup_context(ctx, inputs, output):
        token_logits, labels, *_, compute_grad = inputs
        if token_logits.requires_grad and not compute_grad:
            raise RuntimeError(f"{op.name()}: token_logits requires grad, so call it with compute_grad=True")
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _grad_of_grad):
        if torch.is_grad_enabled():
            raise NotImplementedError("softmax_weighted_bce supports first-order gradients only (no create_graph)")
        (grad,) = ctx.saved_tensors
        return grad_loss[:, None] * grad, None, None, None, None, None, None

    return backward, setup_context


# ---- flatness ops (pykernels/flatness/ops.py) ----
# Reverse-mode autograd (differentiable to any order: each backward is built from
# the ops themselves) and vmap rules. They serve torch.compile and direct callers of
# torch.ops.pykernels.*; in eager mode pykernels.flatness.ops wraps the same
# formulas in autograd.Functions, which torch.func transforms (and forward mode) need.


def _energy_fake(logits):
    return logits.new_empty(logits.shape[:-1])


def _energy_autograd(op):
    from .reference.flatness import energy_vjp

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    def backward(ctx, grad):
        return energy_vjp(*ctx.saved_tensors, grad)

    return backward, setup_context


def _energy_vmap(op):
    def rule(info, in_dims, logits):
        (dim,) = in_dims
        if dim is None:
            return op(logits), None
        return op(logits.movedim(dim, 0)), 0

    return rule


def _logsumexp_hvp_fake(logits, tangents):
    return logits.new_empty(logits.shape), logits.new_empty(logits.shape[:-1]), tangents.new_empty(tangents.shape)


def _logsumexp_hvp_autograd(op):
    from .reference.flatness import logsumexp_hvp_vjp

    def setup_context(ctx, inputs, output):
        logits, tangents = inputs
        ctx.save_for_backward(logits, tangents, output[0])

    def backward(ctx, grad_softmax, grad_energy, grad_hvp):
        return logsumexp_hvp_vjp(op, *ctx.saved_tensors, grad_softmax, grad_energy, grad_hvp)

    return backward, setup_context


def _logsumexp_hvp_vmap(op):
    def rule(info, in_dims, logits, tangents):
        dim_l, dim_t = in_dims
        if dim_l is None and dim_t is None:
            return op(logits, tangents), (None, None, None)
        if dim_l is None:  # only the tangents are batched: fold the vmap dim into S
            tangents = tangents.movedim(dim_t, 0)
            V, S = tangents.shape[:2]
            s, e, h = op(logits, tangents.reshape(V * S, *tangents.shape[2:]))
            return (s, e, h.reshape(V, S, *h.shape[1:])), (None, None, 0)
        logits = logits.movedim(dim_l, 0)  # [V, ..., K]: the vmap dim becomes a leading row dim
        if dim_t is None:
            tangents = tangents.unsqueeze(1).expand(tangents.shape[0], logits.shape[0], *tangents.shape[1:])
        else:
            tangents = tangents.movedim(dim_t, 1)
        return op(logits, tangents), (0, 0, 1)

    return rule


def _probe_dots_fake(v, w):
    return v.new_empty(v.shape[:2])


def _probe_dots_autograd(op):
    from .reference.flatness import probe_dots_vjp

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        return probe_dots_vjp(*ctx.saved_tensors, grad)

    return backward, setup_context


def _curvature_step_fake(tangents, d1, c2):
    return tangents.new_empty(tangents.shape[:1])


def _curvature_step_vmap(op):
    """Folds the vmap dim into the rows: tangents [N, R, ...] -> [N * R, ...], written in place
    through that view (through a contiguous copy, then copied back, when there is no such view).
    Unbatched factors keep their period P (N * R is a multiple of P); batched ones [N, P, ...]
    need row n * R + r to meet factor row n * P + r % P, which a period gives only when P == R,
    so otherwise they are repeated to [N * R, ...]."""

    def rule(info, in_dims, tangents, d1, c2):
        dim_t, dim_d, dim_c = in_dims
        if dim_t is None:
            if dim_d is not None or dim_c is not None:
                raise RuntimeError(  # as vmap's own in-place check
                    "curvature_step_: vmap over d1 or c2 but not over tangents would write batched "
                    "values into unbatched tangents"
                )
            return op(tangents, d1, c2), None
        t = tangents.movedim(dim_t, 0)
        N, R = t.shape[:2]
        copied = not t.is_contiguous()
        rows = (t.contiguous() if copied else t).view(N * R, *t.shape[2:])
        if dim_d is not None or dim_c is not None:
            factors = []
            for f, dim in ((d1, dim_d), (c2, dim_c)):
                f = f.movedim(dim, 0) if dim is not None else f.expand(N, *f.shape)
                if f.shape[1] != R:
                    if f.shape[1] == 0 or R % f.shape[1]:
                        raise ValueError(
                            f"curvature_step_: {R} tangent rows are not a multiple of {f.shape[1]} factor rows"
                        )
                    f = f.repeat(1, R // f.shape[1], *[1] * (f.dim() - 2))
                factors.append(f.reshape(N * R, *f.shape[2:]))
            d1, c2 = factors
        out = op(rows, d1, c2)
        if copied:
            t.copy_(rows.view(t.shape))
        return out.view(N, R), 0

    return rule


# ---- model selection (selection/correlation.py) ----


def _pairwise_corr_distance_fake(features, triu):
    B, N = features.shape[0], features.shape[1]
    return features.new_empty((B, N * (N - 1) // 2) if triu else (B, N, N))


def _pairwise_corr_distance_autograd(op):
    from .reference.parc import pairwise_corr_distance_backward

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.triu = inputs[1]

    def backward(ctx, grad):
        (features,) = ctx.saved_tensors
        return pairwise_corr_distance_backward(features, ctx.triu, grad), None

    return backward, setup_context


def _per_row_float64_fake(a, b):
    return a.new_empty((a.shape[0],), dtype=torch.float64)


RULES: dict[str, Rules] = {
    "probe_scores": Rules(_probe_scores_fake, _probe_scores_autograd),
    "probe_accumulate_": Rules(_no_output_fake),
    "probe_stream_step": Rules(_probe_stream_step_fake),
    "probe_stream_step_varlen": Rules(_probe_stream_step_varlen_fake),
    "softmax_weighted_bce_fwd": Rules(_softmax_weighted_bce_fwd_fake, _softmax_weighted_bce_fwd_autograd),
    "cpu_isa": Rules(),  # returns a str: nothing to trace, no Triton twin
    "energy": Rules(_energy_fake, _energy_autograd, _energy_vmap),
    "logsumexp_hvp": Rules(_logsumexp_hvp_fake, _logsumexp_hvp_autograd, _logsumexp_hvp_vmap),
    "fill_probes_": Rules(_no_output_fake),
    "probe_dots": Rules(_probe_dots_fake, _probe_dots_autograd),
    "curvature_step_": Rules(_curvature_step_fake, vmap=_curvature_step_vmap),
    "pairwise_corr_distance": Rules(_pairwise_corr_distance_fake, _pairwise_corr_distance_autograd),
    "spearman": Rules(_per_row_float64_fake),
    "parc_spearman": Rules(_per_row_float64_fake),
}


def register_rules(op: str, qualified_name: str) -> None:
    """Registers the table's rules of schema `op` on `qualified_name`: pykernels::<op>
    (below, once the library is loaded) or its Triton twin (from pykernels/triton/)."""
    rules = RULES[op]
    namespace, name = qualified_name.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default
    if rules.fake is not None:
        torch.library.register_fake(qualified_name, rules.fake)
    if rules.autograd is not None:
        backward, setup_context = rules.autograd(overload)
        torch.library.register_autograd(qualified_name, backward, setup_context=setup_context)
    if rules.vmap is not None:
        torch.library.register_vmap(qualified_name, rules.vmap(overload))


def register_triton_twins(*ops: str) -> None:
    """Called by each pykernels/triton/<family>.py for the ops it defines."""
    for op in ops:
        register_rules(op, f"pykernels::{triton_name(op)}")


if LOADED:
    for _op in RULES:
        register_rules(_op, f"pykernels::{_op}")
