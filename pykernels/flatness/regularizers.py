"""Differentiable penalties towards a flat likelihood landscape, to add to a
training loss (each is a scalar, the mean over the batch; multiply by your own
lambda). Gradients reach the parameters, and x when it requires grad (for
curvature_penalty only through grad log p(x): see its docstring).

  neighborhood_drop_penalty  mean_b (log p(x_b) - mean_s log p(x_b + d_s))^2,
                             d_s ~ N(0, sigma^2 I): the squared Monte Carlo
                             neighbourhood drop (fresh noise every call)
  grad_norm_penalty          mean_b ||grad_x log p(x_b)||^2
  curvature_penalty          mean_b ||grad log p(x_b + h z_b) - grad log p(x_b)||^2 / h^2,
                             ||z_b||_2 = 1: a finite-difference estimate of
                             ||H z||^2 (the CURE idea, Moosavi-Dezfooli et al. 2019,
                             applied to log p), z along sign(grad log p) or random

These are offered because the form of the regulariser in Lin et al. (2020) is not
available here. The penalties run the model in eval mode (train_mode="eval",
reported once): BatchNorm batch statistics would couple the examples of the batch
(train_mode="raise" refuses a train-mode model instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from .._validation import check_choice, check_int
from ._model import check_inputs, graph_calls_hardsigmoid, log_likelihood_fn, mark_calls_hardsigmoid, measurement_mode
from .hvp import twice_differentiable

CURVATURE_DIRECTIONS = ("gradient", "random")


def _input_grad(log_p, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of sum log p(x) with its graph, and that sum."""
    x = x if x.requires_grad else x.detach().requires_grad_()
    total = log_p(x).sum()
    return torch.autograd.grad(total, x, create_graph=True)[0], total


def _twice_differentiable(model, train_mode: str, what: str, compute: Callable) -> torch.Tensor:
    """compute() -> (penalty, the sum of log p its gradient came from), under measurement_mode
    and attention's math form (the fused attention kernels have no double backward); again
    under the second-order forms if the model called F.hardsigmoid, whose gradient PyTorch
    cannot differentiate either: the caller's backward through the penalty would fail."""
    with measurement_mode(model, train_mode, what), twice_differentiable(), torch.enable_grad():
        penalty, total = compute()
    if not torch.compiler.is_compiling() and graph_calls_hardsigmoid(total) and mark_calls_hardsigmoid(model):
        with measurement_mode(model, train_mode, what), twice_differentiable(), torch.enable_grad():
            penalty, _ = compute()
    return penalty


def neighborhood_drop_penalty(
    model: Callable,
    x: torch.Tensor,
    sigma: float,
    samples: int = 1,
    *,
    backend: Optional[str] = None,
    train_mode: str = "eval",
) -> torch.Tensor:
    check_inputs(x)
    check_int("samples", samples, minimum=1)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    with measurement_mode(model, train_mode, "neighborhood_drop_penalty"), torch.enable_grad():
        log_p = log_likelihood_fn(model, backend, check_shape=True)
        noisy = x.unsqueeze(0) + sigma * torch.randn((samples, *x.shape), dtype=x.dtype, device=x.device)
        try:
            both = log_p(torch.cat([x, noisy.reshape(samples * x.shape[0], *x.shape[1:])]))
        except ValueError as exc:  # its B is the concatenation's: say so
            rows = (samples + 1) * x.shape[0]
            raise ValueError(
                f"{exc} (neighborhood_drop_penalty calls the model once on x and its {samples} noisy "
                f"cop{'y' if samples == 1 else 'ies'}, concatenated: {samples + 1} x {x.shape[0]} = {rows} rows)"
            ) from exc
        base, perturbed = both[: x.shape[0]], both[x.shape[0] :].reshape(samples, x.shape[0])
        return (base - perturbed.mean(0)).square().mean()


def grad_norm_penalty(
    model: Callable, x: torch.Tensor, *, backend: Optional[str] = None, train_mode: str = "eval"
) -> torch.Tensor:
    check_inputs(x)

    def compute():
        g, total = _input_grad(log_likelihood_fn(model, backend, check_shape=True), x)
        return g.flatten(1).square().sum(1).mean(), total

    return _twice_differentiable(model, train_mode, "grad_norm_penalty", compute)


def curvature_penalty(
    model: Callable,
    x: torch.Tensor,
    h: float = 0.1,
    *,
    direction: str = "gradient",
    backend: Optional[str] = None,
    train_mode: str = "eval",
) -> torch.Tensor:
    """mean_b ||grad log p(x_b + h z_b) - grad log p(x_b)||^2 / h^2; h is the step in input units
    (the L2 length of the displacement).

    What receives gradient: the parameters, through both input gradients (double backward);
    x, when it requires grad, only through grad log p(x). The direction z and the shifted
    point x + h z are constants (built from detached tensors), as in CURE: the penalty does
    not differentiate through where it measures."""
    check_inputs(x)
    check_choice("direction", direction, CURVATURE_DIRECTIONS)
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h}")

    # Drawn once: compute() runs twice on a first call of a model that calls F.hardsigmoid.
    random_signs = torch.randn_like(x).sign() if direction == "random" else None

    def compute():
        log_p = log_likelihood_fn(model, backend, check_shape=True)
        g, total = _input_grad(log_p, x)
        z = g.detach().sign() if random_signs is None else random_signs
        z = z / z.flatten(1).norm(dim=1).clamp(min=1e-12).reshape(-1, *([1] * (x.dim() - 1)))
        g_shifted, _ = _input_grad(log_p, x.detach() + h * z)
        return ((g_shifted - g) / h).flatten(1).square().sum(1).mean(), total

    return _twice_differentiable(model, train_mode, "curvature_penalty", compute)
