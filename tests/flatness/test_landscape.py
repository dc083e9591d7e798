"""Landscapes (grids of log p differences) and their plots."""

import importlib

import pytest
import torch
from torch import nn

from pykernels import flatness
from tests.flatness.models import inputs, small_cnn

landscape_module = importlib.import_module("pykernels.flatness.landscape")  # the package exports the function


def direct(model, x, u, v, a, b):
    """log p(x + a u + b v) - log p(x), one point at a time."""
    lp = lambda t: torch.logsumexp(model(t), -1)
    return lp(x + a * u + b * v) - lp(x)


class CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.inner(x)


def test_2d_landscape_matches_pointwise_evaluation():
    model, x = small_cnn(nn.GELU), inputs(B=3)
    L = flatness.landscape(model, x, "random", radius=0.8, steps=5)
    assert L.values.shape == (3, 5, 5) and L.dims == 2 and L.kinds == ("random", "random")
    u, v = L.directions
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(3, dtype=x.dtype))  # scale="l2"
    torch.testing.assert_close((u * v).flatten(1).sum(1), torch.zeros(3, dtype=x.dtype), atol=1e-12, rtol=0)
    axis = torch.linspace(-0.8, 0.8, 5, dtype=x.dtype)
    for i, j in [(0, 0), (2, 2), (4, 1), (3, 0)]:
        torch.testing.assert_close(L.values[:, i, j], direct(model, x, u, v, axis[i], axis[j]))
    assert L.values[:, 2, 2].abs().max() < 1e-12  # x itself


def test_1d_landscape_and_given_directions():
    model, x = small_cnn(nn.GELU), inputs(B=2)
    d = torch.randn_like(x)
    L = flatness.landscape(model, x, d, dims=1, radius=2.0, steps=7, scale="none")
    assert L.values.shape == (2, 7) and L.kinds == ("given",)
    torch.testing.assert_close(L.directions[0], d)
    torch.testing.assert_close(L.values[:, 0], direct(model, x, d, 0 * d, -2.0, 0.0))
    pair = flatness.landscape(model, x, (d, 2 * d), steps=3, scale="none")
    torch.testing.assert_close(pair.values[:, 2, 0], direct(model, x, d, 2 * d, 1.0, -1.0))


def test_named_directions_and_scales():
    model, x = small_cnn(nn.GELU), inputs(B=2)
    y = torch.tensor([1, 3])
    adv = flatness.landscape(model, x, "adversarial", y=y, steps=3, scale="linf")
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xx), y, reduction="sum"), xx)
    torch.testing.assert_close(adv.directions[0], g.sign())
    assert adv.kinds == ("adversarial", "random")
    grad_dir = flatness.landscape(model, x, "gradient", dims=1, steps=3, scale="input").directions[0]
    torch.testing.assert_close(grad_dir.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))


def test_pgd_direction_attacks_within_the_ball_the_grid_spans(monkeypatch):
    """The attack's budget is in the landscape's units: L2 radius for "l2" / "none", Linf radius
    for "linf", L2 radius * ||x_b|| for "input" (an Linf attack of L2 size would reach sqrt(D)
    times further than the grid)."""
    model, x = small_cnn(nn.GELU), inputs(B=2)
    raw = flatness.landscape(model, x, "pgd", dims=1, steps=3, radius=0.1, scale="none").directions[0]
    l2 = raw.flatten(1).norm(dim=1)
    assert (l2 <= 0.1 + 1e-12).all() and (l2 > 0.099).all()  # on the sphere of the budget
    budgets = []
    real = landscape_module.pgd_steps
    monkeypatch.setattr(
        landscape_module, "pgd_steps", lambda *a, **k: budgets.append((k["norm"], a[3])) or real(*a, **k)
    )
    for scale in ("l2", "none", "linf", "input"):
        flatness.landscape(model, x, "pgd", dims=1, steps=3, radius=0.1, scale=scale)
    norms = x.flatten(1).norm(dim=1).reshape(2, 1, 1, 1)
    assert budgets[:3] == [("l2", 0.1), ("l2", 0.1), ("linf", 0.1)]
    assert budgets[3][0] == "l2"
    torch.testing.assert_close(budgets[3][1], 0.1 * norms)


def test_all_grid_points_of_an_input_in_one_forward_pass():
    model, x = CountingModel(small_cnn(nn.GELU)), inputs(B=5)
    flatness.landscape(model, x, steps=9, points_per_batch=200)  # 81 points each: 2 inputs per pass
    grid_passes = model.batches[-3:]
    assert grid_passes == [162, 162, 81]


def test_plots_are_written(tmp_path):
    model, x = small_cnn(nn.GELU), inputs(B=2)
    other = small_cnn(nn.ReLU, seed=4)
    two = {name: flatness.landscape(m, x, steps=5) for name, m in (("gelu", model), ("relu", other))}
    for kind in ("both", "surface", "contour"):
        path = flatness.plot_landscape(two, str(tmp_path / f"2d_{kind}.png"), example=1, kind=kind)
        assert path.endswith(".png") and (tmp_path / f"2d_{kind}.png").stat().st_size > 5000
    one = [flatness.landscape(m, x, dims=1, steps=5) for m in (model, other)]
    assert (tmp_path / "sub" / "1d.png").exists() is False
    flatness.plot_landscape(one, str(tmp_path / "sub" / "1d.png"))
    assert (tmp_path / "sub" / "1d.png").stat().st_size > 5000


def test_16_bit_landscapes_plot(tmp_path):
    """numpy has no bfloat16: the plot converts the values and the axes."""
    model, x = small_cnn(nn.GELU).to(torch.bfloat16), inputs(B=2).to(torch.bfloat16)
    for dims in (1, 2):
        L = flatness.landscape(model, x, dims=dims, steps=3)
        assert L.values.dtype == torch.bfloat16
        flatness.plot_landscape(L, str(tmp_path / f"{dims}d.png"))
        assert (tmp_path / f"{dims}d.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(dims=3), ValueError, "dims must be 1 or 2, got 3"),
        (dict(steps=1), ValueError, "steps must be >= 2"),
        (dict(radius=0.0), ValueError, "radius must be > 0"),
        (dict(directions="sideways"), ValueError, "directions must be one of"),
        (dict(directions=torch.zeros(2, 1, 6, 5)), ValueError, r"direction 0 must have x's shape \(2, 1, 6, 6\)"),
        (dict(directions=[torch.zeros(2, 1, 6, 6)] * 3), ValueError, "3 directions given for a 2-D landscape"),
        (dict(directions=3.0), TypeError, "directions must be one of"),
        (dict(scale="l1"), ValueError, "scale must be one of"),
    ],
)
def test_bad_input(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        flatness.landscape(small_cnn(), inputs(B=2), **kwargs)


def test_plot_bad_input(tmp_path):
    L = flatness.landscape(small_cnn(), inputs(B=2), steps=3)
    with pytest.raises(ValueError, match="example 5 out of range"):
        flatness.plot_landscape(L, str(tmp_path / "x.png"), example=5)
    with pytest.raises(ValueError, match="mix of 1-D and 2-D"):
        flatness.plot_landscape(
            [L, flatness.landscape(small_cnn(), inputs(B=2), dims=1, steps=3)], str(tmp_path / "x.png")
        )
