"""Per-example flatness measures of log p(x) = logsumexp f(x) - log Z.

log Z does not depend on x, so it drops out of every measure here: gradients,
Hessians and differences log p(x + d) - log p(x). Each function takes a
classifier (x [B, ...] -> logits [B, K]) and a batch x, and returns one number
per example. Definitions (H = the input Hessian of log p at x, s = softmax):

  log_likelihood     logsumexp_k f_k(x)  (log p(x) + log Z)
  grad_norm          ||grad_x log p(x)||_2
  neighborhood_drop  E_d[log p(x) - log p(x + d)], d ~ N(0, sigma^2 I) or
                     uniform in the Linf ball of radius eps; Monte Carlo over
                     `samples` draws (value and standard error). To second order
                     it is -(sigma^2 / 2) tr H (Gaussian) or -(eps^2 / 6) tr H (box).
  hessian_trace      tr H by Hutchinson or Hutch++ (value and standard error)
  exact_trace        tr(J^T (diag(s) - s s^T) J) = tr((diag(s) - s s^T) J J^T) from
                     the K x D Jacobian J: tr H exactly for piecewise-linear nets
  top_eigenvalues    the k eigenvalues of H of largest magnitude
  spectral_density   a Gaussian-smoothed eigenvalue density of H (SLQ)

None of these is "the" flatness measure of Lin et al. (2020), whose formula is
not available here; each is documented for what it computes.

Models in train mode are measured in eval mode (train_mode="eval", reported once)
or refused (train_mode="raise"); see pykernels.flatness.hvp for the HVP methods.

Under torch.compile(fullgraph=True) every measure here traces as one graph (tested on the
smooth families: MLP, CNN, BatchNorm-eval ResNet, attention), with these differences: the
model must already be in eval mode (switching modes would break the graph); Hessian
products are reverse-over-reverse whatever `hvp` says (hvp.TracedInputHessian in input
space, ParameterHessian._reverse_over_reverse for the parameter measures); the checks
that read values (NaN logits, normalised outputs) are skipped; power iteration runs all
`iters` iterations (its stopping test reads values); exact_trace needs check=False.
The Hessian measures (hessian_trace, exact_trace, top_eigenvalues, spectral_density,
parameter_*) need float32 / float64 inputs and models: 16-bit ones raise a TypeError
(their second derivatives would be mostly rounding error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from torch.func import grad

from .._progress import progress_callback
from .._validation import check_choice, check_int
from . import estimators as est
from . import ops
from ._model import check_hessian_dtype, log_likelihood_fn, validated_logits, with_second_order_forms
from ._piecewise import curved_ops_cached
from .estimators import Estimate
from .hvp import ParameterHessian, default_chunk_size, input_hessian, input_jacobian, prepared

TRACE_METHODS = ("hutchinson", "hutch++")
EIGEN_METHODS = ("power", "lanczos")


def log_likelihood(
    model: Callable, x: torch.Tensor, *, backend: Optional[str] = None, train_mode: str = "eval"
) -> torch.Tensor:
    """logsumexp of the logits, [B]: log p(x) up to the constant log Z."""
    with prepared(model, x, train_mode, "log_likelihood"), torch.no_grad():
        return -ops.energy(validated_logits(model, x), backend=backend)


def grad_norm(
    model: Callable, x: torch.Tensor, *, backend: Optional[str] = None, train_mode: str = "eval"
) -> torch.Tensor:
    """||grad_x log p(x)||_2 per example, [B]."""
    # no_grad: nothing to track outside grad (the weights keep requires_grad under compile);
    # torch.func.grad ignores an outer no_grad.
    with prepared(model, x, train_mode, "grad_norm"), torch.no_grad():
        validated_logits(model, x)
        g = grad(lambda x: log_likelihood_fn(model, backend)(x).sum())(x.detach())
        return g.flatten(1).norm(dim=1)


def neighborhood_drop(
    model: Callable,
    x: torch.Tensor,
    sigma: Optional[float] = None,
    eps: Optional[float] = None,
    samples: int = 64,
    *,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    train_mode: str = "eval",
) -> Estimate:
    """E_d[log p(x) - log p(x + d)] per example (module docstring), with its standard
    error over the `samples` draws. Give exactly one of sigma (Gaussian noise) and
    eps (uniform in the Linf ball). The noise comes from the counter-based probe stream
    `seed` (pykernels.probes: the same draws on every device and backend, and under
    torch.compile): Gaussian probes z, times sigma, or eps * erf(z / sqrt 2), which is
    uniform on (-eps, eps). All draws go through the model in batches of whole examples
    (chunk_size draws at a time; default about 2^20 input elements)."""
    if (sigma is None) == (eps is None):
        raise ValueError("give exactly one of sigma (Gaussian noise) and eps (uniform in the Linf ball)")
    radius = sigma if sigma is not None else eps
    if not radius > 0:
        raise ValueError(f"{'sigma' if sigma is not None else 'eps'} must be > 0, got {radius}")
    check_int("samples", samples, minimum=1)
    with prepared(model, x, train_mode, "neighborhood_drop"), torch.no_grad():
        log_p = log_likelihood_fn(model, backend)
        base = -ops.energy(validated_logits(model, x), backend=backend)
        B = x.shape[0]
        chunk = chunk_size or default_chunk_size(x[0].numel() * B, x.device)
        wide = x.dtype if x.dtype == torch.float64 else torch.float32
        drops = []
        for s0 in range(0, samples, chunk):
            c = min(chunk, samples - s0)
            z = ops.probe_vectors(  # drawn in float32 for a 16-bit x (the probe kernels' precision)
                (c, *x.shape), seed, kind="gaussian", offset=s0 * x.numel(), dtype=wide, device=x.device
            )
            noise = sigma * z if sigma is not None else eps * torch.erf(z / math.sqrt(2))
            perturbed = (x.unsqueeze(0) + noise.to(x.dtype)).reshape(c * B, *x.shape[1:])
            drops.append(base - log_p(perturbed).reshape(c, B))
        return est._mean_and_stderr(torch.cat(drops))


def _check_num_probes(num_probes, method: str) -> None:
    check_int("num_probes", num_probes, minimum=1)
    if method == "hutch++" and num_probes < 3:
        raise ValueError(
            f"hutch++ needs num_probes >= 3 (a third sketches, a third multiplies the sketch, "
            f"the rest estimates the remainder), got {num_probes}"
        )


@with_second_order_forms
def hessian_trace(
    model: Callable,
    x: torch.Tensor,
    num_probes: int = 64,
    method: str = "hutchinson",
    *,
    probes: str = "rademacher",
    seed: int = 0,
    hvp: str = "auto",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    train_mode: str = "eval",
    progress: bool = False,
) -> Estimate:
    """tr H per example: (estimate [B], standard error [B]).

    method: "hutchinson" (num_probes probes, any num_probes >= 1; the standard
    error needs >= 2) or "hutch++" (num_probes >= 3 HVPs; standard error of its
    residual Hutchinson part given the sketch). probes: "rademacher" (minimum
    variance for Hutchinson) or "gaussian", drawn from `seed` (pykernels.probes).
    hvp: the HVP method (pykernels.flatness.hvp). progress: a bar of probes done on stderr.

    Under torch.compile: see the module docstring; the progress bar is skipped.
    """
    check_choice("method", method, TRACE_METHODS)
    check_choice("probes", probes, ops.PROBE_KINDS)
    _check_num_probes(num_probes, method)
    with prepared(model, x, train_mode, "hessian_trace"):
        H = input_hessian(model, x, method=hvp, backend=backend, chunk_size=chunk_size, expected_vectors=num_probes)
        bar = progress and not torch.compiler.is_compiling()
        return _trace(
            H, num_probes, method, probes, seed, progress_callback("hessian_trace", unit="probe") if bar else None
        )


def _trace(op, num_probes: int, method: str, probes: str, seed: int, progress) -> Estimate:
    if method == "hutchinson":
        return est.hutchinson(op, num_probes, seed, probes, chunk=op.chunk_size, progress=progress)
    return est.hutch_plus_plus(op, num_probes, seed, probes)


def _check_k(k, dim: int, what: str = "the input dimension") -> None:
    check_int("k", k, minimum=1)
    if k > dim:
        raise ValueError(f"k = {k} is larger than {what} D = {dim}: there are only {dim} eigenvalues")


@with_second_order_forms
def top_eigenvalues(
    model: Callable,
    x: torch.Tensor,
    k: int = 1,
    method: str = "lanczos",
    *,
    iters: Optional[int] = None,
    tol: float = 1e-4,
    seed: int = 0,
    hvp: str = "auto",
    return_eigenvectors: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    train_mode: str = "eval",
):
    """The k eigenvalues of H of largest magnitude per example, [B, k], largest first.

    method: "lanczos" (iters = Lanczos steps, default min(D, max(3k, 30))) or "power"
    (subspace iteration; iters = maximum iterations, default 100, stopping when
    every value changed by <= tol, relative). With return_eigenvectors, also the
    unit eigenvectors [B, k, *x.shape[1:]].
    """
    check_choice("method", method, EIGEN_METHODS)
    with prepared(model, x, train_mode, "top_eigenvalues"):
        H = input_hessian(
            model, x, method=hvp, backend=backend, chunk_size=chunk_size, expected_vectors=(k + 2) * (iters or 30)
        )
        result = _eigen(H, k, method, iters, tol, seed, return_eigenvectors)
        if not return_eigenvectors:
            return result.values
        return result.values, result.vectors.reshape(H.batch, k, *H.shape)


def _eigen(op, k, method, iters, tol, seed, vectors) -> est.Eigen:
    _check_k(k, op.dim, "the number of parameters" if isinstance(op, ParameterHessian) else "the input dimension")
    if iters is not None:
        check_int("iters", iters, minimum=1)
    if method == "power":
        return est.power_iteration(op, k, iters or 100, tol, seed)
    steps = iters or min(op.dim, max(3 * k, 30))
    if steps < k:
        raise ValueError(f"lanczos needs iters >= k = {k}, got {steps}")
    return est.lanczos_eigen(op, k, steps, seed, vectors)


@with_second_order_forms
def exact_trace(
    model: Callable,
    x: torch.Tensor,
    *,
    check: bool = True,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    train_mode: str = "eval",
) -> torch.Tensor:
    """tr((diag(s) - s s^T) J J^T) per example, [B], from the K x D input Jacobian J
    of the logits (K vector-Jacobian products, batched).

    That is the trace of the Gauss-Newton part J^T (diag(s) - s s^T) J of H, which
    is all of H almost everywhere for piecewise-linear networks: the exact trace,
    the oracle the estimators are tested against. With check=True (default) the
    model is run once to confirm it is piecewise linear in x (every ATen op it
    calls), and a ValueError names the curved ops otherwise; check=False returns
    the Gauss-Newton trace for any model. chunk_size: examples per batch of
    Jacobians (default: about 2^20 elements of J).
    """
    with prepared(model, x, train_mode, "exact_trace"):
        check_hessian_dtype(x.dtype, "x")
        x = x.detach()
        logits = validated_logits(model, x)
        check_hessian_dtype(logits.dtype, "the model's output")
        if check and torch.compiler.is_compiling():
            raise ValueError(
                "exact_trace(check=True) records the model's ops in a dispatch mode, which torch.compile "
                "cannot trace: run the check once eagerly, then compile exact_trace(..., check=False)"
            )
        if check:
            curved = curved_ops_cached(model, x)
            if curved:
                names = ", ".join(f"{n} (x{c})" for n, c in sorted(curved.items()))
                raise ValueError(
                    f"exact_trace needs a network that is piecewise linear in its input, but at x the "
                    f"model runs curved ops: {names}. Use hessian_trace, or check=False for the "
                    f"trace of the Gauss-Newton part"
                )
        B, K = logits.shape
        chunk = chunk_size or max(1, 2**20 // max(1, K * x[0].numel()))
        out = []
        for b0 in range(0, B, chunk):
            J = input_jacobian(model, x[b0 : b0 + chunk])  # [K, b, D]
            M = torch.einsum("lbd,kbd->lbk", J, J)  # tangent l = column l of J J^T
            AM = ops.logsumexp_hvp(logits[b0 : b0 + chunk], M, backend=backend)[2]  # AM[l, b] = A_b (J J^T)_b[:, l]
            out.append(AM.diagonal(dim1=0, dim2=2).sum(-1))
        return torch.cat(out).detach()


class SpectralDensity(NamedTuple):
    grid: torch.Tensor  # [G] eigenvalue axis, shared by all examples
    density: torch.Tensor  # [B, G], integrates to ~1 per example
    nodes: torch.Tensor  # [B, starts * steps] Ritz values
    weights: torch.Tensor  # [B, starts * steps], sum to 1 per example


@with_second_order_forms
def spectral_density(
    model: Callable,
    x: torch.Tensor,
    *,
    starts: int = 4,
    steps: int = 30,
    points: int = 256,
    sigma: Optional[float] = None,
    seed: int = 0,
    hvp: str = "auto",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    train_mode: str = "eval",
) -> SpectralDensity:
    """Eigenvalue density of H per example by stochastic Lanczos quadrature:
    `starts` Lanczos runs of `steps` steps, each Ritz value a Gaussian of width
    sigma (default 1% of the spectral range) on a shared grid of `points`."""
    check_int("starts", starts, minimum=1)
    check_int("steps", steps, minimum=1)
    check_int("points", points, minimum=2)
    if sigma is not None and not sigma > 0:  # also refuses NaN
        raise ValueError(f"sigma (the width of each Ritz value's Gaussian) must be > 0, got {sigma}")
    with prepared(model, x, train_mode, "spectral_density"):
        H = input_hessian(model, x, method=hvp, backend=backend, chunk_size=chunk_size, expected_vectors=starts * steps)
        nodes, weights = est.slq(H, steps, starts, seed)
    # The grid stays on the device, in tensors: reading the range as Python numbers would
    # synchronise a GPU and break a torch.compile graph.
    lo, hi = nodes.min(), nodes.max()
    width = sigma if sigma is not None else (0.01 * (hi - lo)).clamp(min=1e-12)
    start, stop = lo - 3 * width, hi + 3 * width
    grid = start + (stop - start) * torch.linspace(0, 1, points, dtype=nodes.dtype, device=nodes.device)
    kernel = torch.exp(-0.5 * ((grid[None, None, :] - nodes[:, :, None]) / width) ** 2) / (
        width * math.sqrt(2 * math.pi)
    )
    density = (weights[:, :, None] * kernel).sum(1)
    return SpectralDensity(grid, density, nodes, weights)


# ---- parameter space (a bonus: the same estimators on the loss Hessian over weights) ----


@with_second_order_forms
def parameter_hessian_trace(
    model: torch.nn.Module,
    loss_fn: Callable,
    x: torch.Tensor,
    y,
    num_probes: int = 64,
    method: str = "hutchinson",
    *,
    probes: str = "rademacher",
    seed: int = 0,
    chunk_size: Optional[int] = None,
    hvp: str = "auto",
    train_mode: str = "eval",
) -> Estimate:
    """tr of the Hessian of loss_fn(model(x), y) over the parameters that require
    grad, as (estimate [1], standard error [1]) (PyHessian's trace, batched over probes).
    hvp: the method (hvp.ParameterHessian: "auto", "forward-over-reverse", "forward-adjoint",
    "double-backward", "double-backward-loop"); "auto" takes forward-adjoint for the
    quadratic forms once it has equalled double backward on two random vectors."""
    check_choice("method", method, TRACE_METHODS)
    check_choice("probes", probes, ops.PROBE_KINDS)
    _check_num_probes(num_probes, method)
    with prepared(model, x, train_mode, "parameter_hessian_trace", freeze=False):
        H = ParameterHessian(model, loss_fn, x, y, chunk_size=chunk_size, method=hvp, expected_vectors=num_probes)
        return _trace(H, num_probes, method, probes, seed, None)


@with_second_order_forms
def parameter_top_eigenvalues(
    model: torch.nn.Module,
    loss_fn: Callable,
    x: torch.Tensor,
    y,
    k: int = 1,
    method: str = "lanczos",
    *,
    iters: Optional[int] = None,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    hvp: str = "auto",
    train_mode: str = "eval",
) -> torch.Tensor:
    """The k eigenvalues of largest magnitude of the parameter Hessian of the loss, [1, k]
    (hvp: as for parameter_hessian_trace)."""
    check_choice("method", method, EIGEN_METHODS)
    with prepared(model, x, train_mode, "parameter_top_eigenvalues", freeze=False):
        H = ParameterHessian(model, loss_fn, x, y, chunk_size=chunk_size, method=hvp)
        return _eigen(H, k, method, iters, tol, seed, False).values
