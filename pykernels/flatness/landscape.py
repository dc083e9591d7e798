"""Likelihood landscapes: log p(x + a u + b v) - log p(x) on a grid of (a, b) in
[-radius, radius]^2 (or of a alone in 1-D), per example, and their plots.

Directions (`directions=`):
  "random"       Gaussian; in 2-D the second is a second Gaussian made orthogonal
                 to the first.
  "adversarial"  sign of grad_x of the cross-entropy at labels y (default: the
                 model's prediction), the FGSM direction.
  "pgd"          the PGD perturbation at y (10 steps) within the ball the grid spans:
                 Linf of `radius` for scale="linf", L2 of `radius` for "l2" and
                 "none", L2 of radius * ||x_b|| for "input".
  "gradient"     grad_x log p(x), steepest ascent of the likelihood.
  a tensor [B, ...]      your own direction;  a pair of tensors: both directions.
In 2-D a single named or given direction is paired with a random one made
orthogonal to it (per example); two given directions are used as they are.

Scaling (`scale=`), per example: "l2" unit L2 norm (default; the grid is in L2
units of input space), "linf" unit max-abs (the grid is an Linf radius, natural
for sign directions), "input" the L2 norm of x_b (the grid is relative to the
input), "none" as given.

All grid points of one input go through the model in one batched forward pass,
several inputs per pass up to `points_per_batch` points.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import torch
from torch.func import grad

from .._progress import progress_bar
from .._validation import check_choice, check_int
from . import ops
from ._model import log_likelihood_fn, validated_logits
from .attacks import _loss_grad, pgd_steps
from .hvp import prepared

NAMED_DIRECTIONS = ("random", "adversarial", "pgd", "gradient")
SCALES = ("l2", "linf", "input", "none")


@dataclasses.dataclass
class Landscape:
    """log p differences on a grid; coordinates in units of the scaled directions."""

    coords: tuple[torch.Tensor, ...]  # one [steps] axis per direction
    values: torch.Tensor  # [B, steps] or [B, steps, steps] (first axis: a along u; second: b along v)
    directions: tuple[torch.Tensor, ...]  # u (and v), [B, ...] each, as scaled
    kinds: tuple[str, ...]  # what each direction is
    scale: str

    @property
    def dims(self) -> int:
        return len(self.coords)


def _per_example_norm(t: torch.Tensor, ord) -> torch.Tensor:
    flat = t.flatten(1)
    n = flat.abs().amax(dim=1) if ord == "inf" else flat.norm(dim=1)
    return n.clamp(min=torch.finfo(t.dtype).tiny).reshape(-1, *([1] * (t.dim() - 1)))


def _orthogonal_to(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    uf, vf = u.flatten(1), v.flatten(1)
    coef = (uf * vf).sum(1) / (uf * uf).sum(1).clamp(min=torch.finfo(u.dtype).tiny)
    return (vf - coef[:, None] * uf).reshape(v.shape)


def _scaled(d: torch.Tensor, x: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "none":
        return d
    if scale == "linf":
        return d / _per_example_norm(d, "inf")
    d = d / _per_example_norm(d, 2)
    return d * _per_example_norm(x, 2) if scale == "input" else d


def _pgd_budget(x: torch.Tensor, radius: float, scale: str):
    """(norm, eps) of the "pgd" direction's attack: the ball the landscape's grid spans, in the
    units of its scale (per example for "input")."""
    if scale == "linf":
        return "linf", radius
    if scale == "input":
        return "l2", radius * _per_example_norm(x, 2)
    return "l2", radius


def _named_direction(kind: str, model, x, y, radius, scale, gen, backend) -> torch.Tensor:
    if kind == "random":
        return torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    if kind == "gradient":
        return grad(lambda x: log_likelihood_fn(model, backend)(x).sum())(x)
    if y is None:
        with torch.no_grad():
            y = model(x).argmax(dim=1)
    if kind == "adversarial":
        return _loss_grad(model, x, y).sign()
    norm, eps = _pgd_budget(x, radius, scale)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    return (
        pgd_steps(model, x, y, eps, steps=10, step_size=None, norm=norm, random_start=True, clamp=None, seed=seed) - x
    )


def _directions(directions, dims, model, x, y, radius, scale, seed, backend):
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if isinstance(directions, str):
        check_choice("directions", directions, NAMED_DIRECTIONS)
        given, kinds = [_named_direction(directions, model, x, y, radius, scale, gen, backend)], [directions]
    elif isinstance(directions, torch.Tensor):
        given, kinds = [directions], ["given"]
    elif isinstance(directions, (list, tuple)) and all(isinstance(d, torch.Tensor) for d in directions):
        given, kinds = list(directions), ["given"] * len(directions)
    else:
        raise TypeError(
            f"directions must be one of {NAMED_DIRECTIONS}, a tensor or a pair of tensors, "
            f"got {type(directions).__name__}"
        )
    if len(given) > dims:
        raise ValueError(f"{len(given)} directions given for a {dims}-D landscape")
    for i, d in enumerate(given):
        if d.shape != x.shape:
            raise ValueError(f"direction {i} must have x's shape {tuple(x.shape)}, got {tuple(d.shape)}")
    given = [d.to(x.dtype).detach() for d in given]
    if dims == 2 and len(given) == 1:
        given.append(_orthogonal_to(torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device), given[0]))
        kinds.append("random")
    return tuple(_scaled(d, x, scale) for d in given), tuple(kinds)


def landscape(
    model: Callable,
    x: torch.Tensor,
    directions: Union[str, torch.Tensor, Sequence[torch.Tensor]] = "random",
    *,
    radius: float = 1.0,
    steps: int = 51,
    dims: int = 2,
    scale: str = "l2",
    y: Optional[torch.Tensor] = None,
    seed: int = 0,
    points_per_batch: int = 8192,
    backend: Optional[str] = None,
    train_mode: str = "eval",
    progress: bool = False,
) -> Landscape:
    """log p(x + a u + b v) - log p(x) on the grid a, b in linspace(-radius, radius, steps)
    (module docstring: directions and scaling). Returns a Landscape with values
    [B, steps] (dims=1) or [B, steps, steps] (dims=2)."""
    check_int("steps", steps, minimum=2)
    check_int("points_per_batch", points_per_batch, minimum=1)
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    check_choice("scale", scale, SCALES)
    with prepared(model, x, train_mode, "landscape"):
        x = x.detach()
        base = -ops.energy(validated_logits(model, x), backend=backend)
        dirs, kinds = _directions(directions, dims, model, x, y, radius, scale, seed, backend)
        axis = torch.linspace(-radius, radius, steps, dtype=x.dtype, device=x.device)
        grids = torch.meshgrid(*([axis] * dims), indexing="ij")
        coefs = torch.stack([g.reshape(-1) for g in grids])  # [dims, P]
        P = coefs.shape[1]
        per_pass = max(1, points_per_batch // P)
        log_p = log_likelihood_fn(model, backend)
        B, feature_dims = x.shape[0], [1] * (x.dim() - 1)
        values = []
        bar = progress_bar(B, "landscape", progress, unit="input")
        with torch.no_grad():
            for b0 in range(0, B, per_pass):
                sl = slice(b0, b0 + per_pass)
                pts = x[sl].unsqueeze(1)  # [c, 1, ...]
                for coef, d in zip(coefs, dirs):
                    pts = pts + coef.reshape(1, P, *feature_dims) * d[sl].unsqueeze(1)
                c = pts.shape[0]
                lp = log_p(pts.reshape(c * P, *x.shape[1:])).reshape(c, *([steps] * dims))
                values.append(lp - base[sl].reshape(c, *([1] * dims)))
                bar.update(c)
        bar.close()
        return Landscape(tuple([axis] * dims), torch.cat(values), dirs, kinds, scale)


def plot_landscape(
    landscapes: Union[Landscape, Mapping[str, Landscape], Sequence[Landscape]],
    path: str,
    *,
    example: int = 0,
    kind: str = "both",
    title: Optional[str] = None,
) -> str:
    """Writes a PNG of one example's landscape for one or several models side by side
    (one column per model, sharing the color scale and contour levels).

    2-D landscapes: a surface row and/or a contour row (kind "both", "surface" or
    "contour"). 1-D landscapes: one panel with a curve per model. Returns path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plot_landscape needs matplotlib (pip install matplotlib)") from exc
    check_choice("kind", kind, ("both", "surface", "contour"))
    if isinstance(landscapes, Landscape):
        items = [("", landscapes)]
    elif isinstance(landscapes, Mapping):
        items = list(landscapes.items())
    else:
        items = [(f"model {i}", L) for i, L in enumerate(landscapes)]
    if not items:
        raise ValueError("plot_landscape needs at least one landscape")
    dims = {L.dims for _, L in items}
    if len(dims) != 1:
        raise ValueError("plot_landscape: mix of 1-D and 2-D landscapes")
    for name, L in items:
        if not 0 <= example < L.values.shape[0]:
            raise ValueError(
                f"example {example} out of range for {name or 'the landscape'} ({L.values.shape[0]} examples)"
            )
    label = lambda L, i: f"{L.kinds[i]} direction ({L.scale} units)"
    if dims == {1}:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, L in items:
            ax.plot(L.coords[0].cpu().double(), L.values[example].cpu().double(), label=name or None)
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set_xlabel(label(items[0][1], 0))
        ax.set_ylabel("log p(x + a u) - log p(x)")
        if any(name for name, _ in items):
            ax.legend()
    else:
        rows = ["surface", "contour"] if kind == "both" else [kind]
        n = len(items)
        fig = plt.figure(figsize=(4.2 * n, 3.8 * len(rows)))
        zs = [L.values[example].cpu().double() for _, L in items]
        lo, hi = min(z.min().item() for z in zs), max(z.max().item() for z in zs)
        levels = torch.linspace(lo, hi if hi > lo else lo + 1e-12, 21).tolist()
        for col, ((name, L), z) in enumerate(zip(items, zs)):
            # .double(): numpy has no bfloat16
            A, Bg = torch.meshgrid(L.coords[0].cpu().double(), L.coords[1].cpu().double(), indexing="ij")
            for row, what in enumerate(rows):
                index = row * n + col + 1
                if what == "surface":
                    ax = fig.add_subplot(len(rows), n, index, projection="3d")
                    ax.plot_surface(
                        A.numpy(),
                        Bg.numpy(),
                        z.numpy(),
                        cmap="viridis",
                        vmin=lo,
                        vmax=hi,
                        linewidth=0,
                        antialiased=True,
                    )
                    ax.set_zlim(lo, hi)
                    ax.set_zlabel("log p diff", fontsize=7)
                else:
                    ax = fig.add_subplot(len(rows), n, index)
                    cs = ax.contourf(A.numpy(), Bg.numpy(), z.numpy(), levels=levels, cmap="viridis")
                    ax.contour(A.numpy(), Bg.numpy(), z.numpy(), levels=levels[::4], colors="k", linewidths=0.4)
                    ax.plot([0.0], [0.0], "r+", markersize=8)  # x itself
                    ax.set_aspect("equal")
                    if col == n - 1:
                        fig.colorbar(cs, ax=ax, fraction=0.046, pad=0.04)
                ax.set_xlabel(label(L, 0), fontsize=7)
                ax.set_ylabel(label(L, 1), fontsize=7)
                ax.tick_params(labelsize=6)
                if row == 0 and name:
                    ax.set_title(name)
    shift = "a u + b v" if dims == {2} else "a u"
    fig.suptitle(title or f"log p(x + {shift}) - log p(x), example {example}", fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
