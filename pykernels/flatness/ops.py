"""The flatness kernels: energy, the fused logit-space second-order step, and
the probe generator and reductions the estimators are built on.

energy(logits) = -logsumexp(logits) over the last (class) dim. Under the
energy-based reading of a classifier, log p(x) = -energy(f(x)) - log Z.
It composes with every PyTorch transform: backward and double backward,
torch.func.grad / jvp / vmap (forward-mode rules and vmap rules are
registered), and torch.compile (reverse mode; the compiled graph calls the
kernel). IEEE special values follow torch.logsumexp: a NaN logit makes its
row's energy NaN, any +inf logit gives -inf energy, a row of all -inf (or an
empty class dim) gives +inf.

logsumexp_hvp(logits, tangents) returns, in one pass over each row of logits,
  softmax s, energy, and (diag(s) - s s^T) u for every tangent u,
the Hessian of logsumexp in logit space applied to S tangents [S, *logits.shape].
It is the logit-space half of every input-space Hessian-vector product of
log p (H v = J^T (diag(s) - s s^T) J v + ...), the forward-mode and reverse-mode
rule of the softmax inside energy's gradient, and the whole trace formula
tr((diag(s) - s s^T) J J^T) of pykernels.flatness.exact_trace.

fill_probes_(out, seed) fills `out` with Rademacher (+-1) or standard Gaussian
probes. Element i of the row-major order is a pure function of
(seed, offset + i) (a counter-based hash, csrc/core/flatness.h), so every
chunking of the probes gives the same numbers: probes [s0, s1) of an [S, B, D]
draw are `offset = s0 * B * D`. Rademacher probes and float32 Gaussian probes
are the same numbers on every backend (Gaussians are computed in float64 and
rounded); float64 Gaussians agree to about one ulp (each platform's log / cos).

probe_dots(v, w)[s, b] = v[s, b] . w[s, b] over the flattened trailing dims: the
per-example quadratic forms v . Hv of Hutchinson-type estimators.

curvature_step_(t, d1, c2) is one elementwise activation of the forward-adjoint tangent
pass (pykernels/flatness/_forward_adjoint.py) in one read and one write of the tangents:
sum c2 t^2 per row, then t *= d1 in place. It has vmap rules (the pass runs under vmap)
and no autograd.

Supported dtypes: energy float32 / float64 / float16 / bfloat16 (16-bit inputs
compute in float32); the others float32 / float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import torch

from .. import backend as _backend
from .._validation import INT64_MAX, check_choice, check_int, check_tensor
from ..reference.flatness import logsumexp_hvp_jvp, logsumexp_hvp_vjp, probe_dots_jvp, probe_dots_vjp

PROBE_KINDS = ("rademacher", "gaussian")
LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REAL_DTYPES = (torch.float32, torch.float64)


class _Kernels(NamedTuple):
    """The four flatness ops of one backend (the field names are the schema names)."""

    energy: Callable
    logsumexp_hvp: Callable
    fill_probes_: Callable
    probe_dots: Callable


def _kernels(op: str, device: torch.device, backend: Optional[str]) -> tuple[str, _Kernels]:
    """The backend that runs `op` here and its four ops (a backward of one calls another)."""
    name = _backend.select(op, device, _backend.BACKENDS, backend)
    return name, _Kernels(*(_backend.resolve(field, device, name) for field in _Kernels._fields))


# Eager-mode wrappers. Custom ops can register reverse-mode autograd but not a
# forward-mode rule, and their registered autograd does not run under torch.func
# transforms; these autograd.Functions add both, with the formulas of
# pykernels/reference/flatness.py (registered on the ops by pykernels/_ops.py).
# Under torch.compile the ops are called directly.


class _KernelFunction(torch.autograd.Function):
    """forward(*tensors, kernels) calls one kernel; the tensor inputs are saved for
    the backward and forward-mode rules, the kernel bundle travels on ctx."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, ctx.kernels = inputs
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)


class _LogsumexpHvp(_KernelFunction):
    @staticmethod
    def forward(logits, tangents, kernels):
        return kernels.logsumexp_hvp(logits, tangents)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, tangents, ctx.kernels = inputs
        ctx.save_for_backward(logits, tangents, output[0])
        ctx.save_for_forward(logits, tangents, output[0])

    @staticmethod
    def backward(ctx, grad_softmax, grad_energy, grad_hvp):
        grads = logsumexp_hvp_vjp(_lse_hvp_fn(ctx.kernels), *ctx.saved_tensors, grad_softmax, grad_energy, grad_hvp)
        return (*grads, None)

    @staticmethod
    def jvp(ctx, d_logits, d_tangents, _):
        logits, tangents, softmax = ctx.saved_tensors
        if d_logits is None:
            d_logits = torch.zeros_like(logits)
        return logsumexp_hvp_jvp(_lse_hvp_fn(ctx.kernels), logits, tangents, softmax, d_logits, d_tangents)


def _lse_hvp_fn(kernels):
    return lambda logits, tangents: _LogsumexpHvp.apply(logits, tangents, kernels)


class _Softmax(_KernelFunction):
    """softmax over the last dim whose forward-mode and reverse-mode rules are the
    fused kernel: its Jacobian diag(s) - s s^T is symmetric, so both are one
    logsumexp_hvp call."""

    @staticmethod
    def forward(logits, kernels):
        return torch.softmax(logits, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return _LogsumexpHvp.apply(logits, grad.unsqueeze(0), ctx.kernels)[2].squeeze(0), None

    @staticmethod
    def jvp(ctx, tangent, _):
        (logits,) = ctx.saved_tensors
        return _LogsumexpHvp.apply(logits, tangent.unsqueeze(0), ctx.kernels)[2].squeeze(0)


class _Energy(_KernelFunction):
    """The energy kernel with dE = -s . dz forward and -g s backward, both through
    _Softmax so that forward-over-reverse and double backward reach the fused kernel."""

    @staticmethod
    def forward(logits, kernels):
        return kernels.energy(logits)

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return -grad.unsqueeze(-1) * _Softmax.apply(logits, ctx.kernels), None

    @staticmethod
    def jvp(ctx, tangent, _):
        (logits,) = ctx.saved_tensors
        return -(_Softmax.apply(logits, ctx.kernels) * tangent).sum(-1)


class _ProbeDots(_KernelFunction):
    @staticmethod
    def forward(v, w, kernels):
        return kernels.probe_dots(v, w)

    @staticmethod
    def backward(ctx, grad):
        return (*probe_dots_vjp(*ctx.saved_tensors, grad), None)

    @staticmethod
    def jvp(ctx, d_v, d_w, _):
        return probe_dots_jvp(*ctx.saved_tensors, d_v, d_w)


def _eager(name: str) -> bool:
    """Whether to go through the autograd.Functions (eager, non-reference backends)."""
    return name != "reference" and not torch.compiler.is_compiling()


def energy(logits: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """-logsumexp over the last dim of logits [..., K] -> [...], in logits' dtype.

    See the module docstring for autograd, special values and dtypes.
    backend: "reference", "cpu", "cuda" or "triton"; default: $PYKERNELS_BACKEND,
    else the fastest available for the tensor's device.
    """
    check_tensor("logits", logits, dtypes=LOGIT_DTYPES)
    if logits.dim() == 0:
        raise ValueError("logits must have a class dim [..., K], got a 0-dim tensor")
    name, kernels = _kernels("energy", logits.device, backend)
    return _Energy.apply(logits, kernels) if _eager(name) else kernels.energy(logits)


def logsumexp_hvp(logits: torch.Tensor, tangents: torch.Tensor, *, backend: Optional[str] = None):
    """Softmax, energy and the logit-space Hessian-vector products, in one pass.

    Args:
        logits: [..., K] float32 or float64.
        tangents: [S, ..., K], S tangent vectors for every row of logits (same dtype).

    Returns:
        (softmax [..., K], energy [...], (diag(s) - s s^T) u for each tangent [S, ..., K]).
        Differentiable in every mode (reverse to any order, forward mode, vmap).
    """
    check_tensor("logits", logits, dtypes=REAL_DTYPES)
    if logits.dim() == 0:
        raise ValueError("logits must have a class dim [..., K], got a 0-dim tensor")
    check_tensor(
        "tangents",
        tangents,
        ndim=logits.dim() + 1,
        dtypes=(logits.dtype,),
        device=logits.device,
        shape_doc=f"[S, *logits.shape] = [S, {', '.join(map(str, logits.shape))}]",
    )
    if tangents.shape[1:] != logits.shape:
        raise ValueError(
            f"tangents must be [S, *logits.shape] with logits.shape = {tuple(logits.shape)}, "
            f"got {tuple(tangents.shape)}"
        )
    name, kernels = _kernels("logsumexp_hvp", logits.device, backend)
    if _eager(name):
        return _LogsumexpHvp.apply(logits, tangents, kernels)
    return kernels.logsumexp_hvp(logits, tangents)


def fill_probes_(
    out: torch.Tensor, seed: int, *, offset: int = 0, kind: str = "rademacher", backend: Optional[str] = None
) -> torch.Tensor:
    """Fills `out` (float32 or float64) with probes of the stream `seed`, starting at
    element `offset`; returns `out`. kind: "rademacher" (+-1) or "gaussian" (N(0, 1))."""
    check_tensor("out", out, dtypes=REAL_DTYPES)
    _check_seed(seed)
    # Element indices offset + i must stay in int64, the kernels' counter type.
    check_int("offset", offset, minimum=0, maximum=INT64_MAX - out.numel())
    check_choice("kind", kind, PROBE_KINDS)
    _backend.resolve("fill_probes_", out.device, backend)(out, seed, offset, kind)
    return out


def probe_vectors(
    shape: Sequence[int],
    seed: int,
    *,
    kind: str = "rademacher",
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """A new tensor of `shape` filled by fill_probes_ (dtype float32 or float64)."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"probe vectors are float32 or float64, got dtype={str(dtype).replace('torch.', '')}")
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return fill_probes_(out, seed, offset=offset, kind=kind, backend=backend)


def probe_dots(v: torch.Tensor, w: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """[S, B, ...] x [S, B, ...] -> [S, B]: dot products over the trailing dims."""
    check_tensor("v", v, dtypes=REAL_DTYPES)
    if v.dim() < 3:
        raise ValueError(f"v must be [S, B, ...] with at least one trailing dim, got shape {tuple(v.shape)}")
    check_tensor("w", w, dtypes=(v.dtype,), device=v.device)
    if w.shape != v.shape:
        raise ValueError(f"w must have the shape of v {tuple(v.shape)}, got {tuple(w.shape)}")
    S, B = v.shape[:2]
    D = math.prod(v.shape[2:])
    name, kernels = _kernels("probe_dots", v.device, backend)
    v, w = v.reshape(S, B, D), w.reshape(S, B, D)
    return _ProbeDots.apply(v, w, kernels) if _eager(name) else kernels.probe_dots(v, w)


def curvature_step_(
    tangents: torch.Tensor, d1: torch.Tensor, c2: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """One elementwise op y = sigma(a) of a forward tangent pass, fused and in place: returns
    sum c2 t^2 over the trailing dims of each row of tangents t [R, ...] (the op's term of
    v . H v) and overwrites t with d1 * t (the tangents of y). d1 = sigma'(a) and
    c2 = lambda * sigma''(a) are [P, ...] with R a multiple of P: row r uses factor row r % P
    (P = B for [S * B, ...] tangents of B examples). Strided tangents are computed in a
    contiguous copy and written back."""
    check_tensor("tangents", tangents, dtypes=REAL_DTYPES)
    if tangents.dim() == 0:
        raise ValueError("tangents must be [R, ...], got a 0-dim tensor")
    for name, factor in (("d1", d1), ("c2", c2)):
        check_tensor(name, factor, ndim=tangents.dim(), dtypes=(tangents.dtype,), device=tangents.device)
        if factor.shape[1:] != tangents.shape[1:] or factor.shape != d1.shape:
            raise ValueError(
                f"d1 and c2 must be [P, *tangents.shape[1:]] with tangents {tuple(tangents.shape)}, "
                f"got {tuple(d1.shape)} and {tuple(c2.shape)}"
            )
    R, P = tangents.shape[0], d1.shape[0]
    if R % P if P else R:
        raise ValueError(f"the {R} tangent rows are not a multiple of the {P} factor rows")
    return _backend.resolve("curvature_step_", tangents.device, backend)(tangents, d1, c2)


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in a signed 64-bit integer, got {seed}")
