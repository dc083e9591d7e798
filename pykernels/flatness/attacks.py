"""FGSM and PGD on the cross-entropy loss: adversarial directions for landscapes,
adversarial training and robust accuracy (Goodfellow et al. 2015; Madry et al. 2018)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_int
from ._model import check_logits
from .hvp import prepared

NORMS = ("linf", "l2")


def _loss_grad(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        loss = F.cross_entropy(check_logits(model(x), x.shape[0]), y, reduction="sum")
        return torch.autograd.grad(loss, x)[0]


def _unit_l2(t: torch.Tensor) -> torch.Tensor:
    norm = t.flatten(1).norm(dim=1).clamp(min=torch.finfo(t.dtype).tiny)
    return t / norm.reshape(-1, *([1] * (t.dim() - 1)))


def _check(x, y, eps) -> None:
    if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1]:
        raise ValueError(
            f"y must be a [B] tensor of class indices with B = {x.shape[0]}, got "
            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def fgsm(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    clamp: Optional[tuple[float, float]] = None,
    train_mode: str = "eval",
) -> torch.Tensor:
    """x + eps * sign(grad_x CE(f(x), y)), optionally clamped to the valid input range."""
    with prepared(model, x, train_mode, "fgsm"):
        _check(x, y, eps)
        adv = x.detach() + eps * _loss_grad(model, x, y).sign()
        return adv.clamp(*clamp) if clamp else adv


def pgd(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: Optional[float] = None,
    norm: str = "linf",
    random_start: bool = True,
    clamp: Optional[tuple[float, float]] = None,
    seed: Optional[int] = None,
    train_mode: str = "eval",
) -> torch.Tensor:
    """Projected gradient ascent on CE(f(x + d), y) over ||d|| <= eps (Linf or L2).

    step_size defaults to 2.5 * eps / steps; random_start draws d uniformly in the
    Linf box (Gaussian direction scaled into the ball for L2), from `seed` when given.
    """
    check_choice("norm", norm, NORMS)
    check_int("steps", steps, minimum=1)
    with prepared(model, x, train_mode, "pgd"):
        _check(x, y, eps)
        return pgd_steps(
            model,
            x,
            y,
            eps,
            steps=steps,
            step_size=step_size,
            norm=norm,
            random_start=random_start,
            clamp=clamp,
            seed=seed,
        )


def pgd_steps(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    *,
    steps: int,
    step_size: Optional[float],
    norm: str,
    random_start: bool,
    clamp: Optional[tuple[float, float]],
    seed: Optional[int],
) -> torch.Tensor:
    """pgd's iterations, unchecked; eps may also be a tensor broadcasting against x (one budget
    per example)."""
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    x0 = x.detach()
    gen = torch.Generator(device=x.device).manual_seed(seed) if seed is not None else None
    delta = torch.zeros_like(x0)
    if random_start:
        if norm == "linf":
            delta = eps * (2 * torch.rand(x0.shape, generator=gen, dtype=x0.dtype, device=x0.device) - 1)
        else:
            delta = eps * _unit_l2(torch.randn(x0.shape, generator=gen, dtype=x0.dtype, device=x0.device))
    for _ in range(steps):
        adv = x0 + delta
        if clamp:
            adv = adv.clamp(*clamp)
        g = _loss_grad(model, adv, y)
        if norm == "linf":
            delta = torch.clamp(delta + alpha * g.sign(), -eps, eps)
        else:
            delta = delta + alpha * _unit_l2(g)
            norms = torch.clamp(delta.flatten(1).norm(dim=1).reshape(-1, *([1] * (x0.dim() - 1))), min=eps)
            delta = delta * (eps / norms)
    adv = x0 + delta
    return adv.clamp(*clamp) if clamp else adv
