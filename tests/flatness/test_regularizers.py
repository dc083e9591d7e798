"""Training penalties and the attacks they are compared with."""

import pytest
import torch
from torch import nn

from pykernels import flatness
from pykernels.flatness.hvp import twice_differentiable
from tests.flatness.models import SMOOTH_FAMILIES, inputs, small_cnn


def test_grad_norm_penalty_is_the_mean_squared_grad_norm_and_trains():
    model, x = small_cnn(nn.GELU), inputs()
    penalty = flatness.grad_norm_penalty(model, x)
    torch.testing.assert_close(penalty, flatness.grad_norm(model, x).square().mean())
    penalty.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_curvature_penalty_approximates_hessian_times_direction():
    model, x = small_cnn(nn.GELU), inputs()
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch.logsumexp(model(xx), -1).sum(), xx)
    z = g.sign() / g.sign().flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    expect = flatness.hvp(model, x, z).flatten(1).square().sum(1).mean()
    got = flatness.curvature_penalty(model, x, h=1e-4)
    torch.testing.assert_close(got, expect, rtol=1e-3, atol=0)
    got.backward()
    assert model[0].weight.grad.abs().sum() > 0
    random = flatness.curvature_penalty(model, x, h=1e-3, direction="random")
    assert random > 0


def test_curvature_penalty_gradients_are_what_its_docstring_says():
    """Parameters: through both input gradients. x: only through grad log p(x); the direction z
    and the shifted point are constants (differentiating through them would give another x.grad)."""
    model, x, h = small_cnn(nn.GELU), inputs(), 0.1
    params = list(model.parameters())
    lp = lambda t: torch.logsumexp(model(t), -1).sum()

    def penalty(x_leaf, shift_follows_x):
        (g,) = torch.autograd.grad(lp(x_leaf), x_leaf, create_graph=True)
        z = g.detach().sign()
        z = z / z.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        shifted = (x_leaf if shift_follows_x else x_leaf.detach()) + h * z
        shifted = shifted if shift_follows_x else shifted.requires_grad_()
        (gs,) = torch.autograd.grad(lp(shifted), shifted, create_graph=True)
        return ((gs - g) / h).flatten(1).square().sum(1).mean()

    xx = x.clone().requires_grad_()
    got = torch.autograd.grad(flatness.curvature_penalty(model, xx, h=h), [xx] + params)
    xe = x.clone().requires_grad_()
    expect = torch.autograd.grad(penalty(xe, False), [xe] + params)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b)
    assert all(p.abs().sum() > 0 for p in got)
    xf = x.clone().requires_grad_()
    through_shift = torch.autograd.grad(penalty(xf, True), xf)[0]
    assert (through_shift - got[0]).abs().max() > 1e-3 * got[0].abs().max()


@pytest.mark.parametrize("penalty", ["grad_norm_penalty", "curvature_penalty"])
def test_gradient_penalties_of_an_attention_model_can_be_differentiated(penalty):
    """The fused attention kernels PyTorch picks have no double backward: the penalties build
    their graph through attention's math form, so the caller's backward runs, and gives what
    the math form gives."""
    model, x = SMOOTH_FAMILIES["attention"](), inputs()
    params = list(model.parameters())
    got = getattr(flatness, penalty)(model, x)
    grads = torch.autograd.grad(got, params)
    with twice_differentiable():
        want = getattr(flatness, penalty)(model, x)
        expect = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads, expect)


def test_neighborhood_drop_penalty_is_the_squared_monte_carlo_drop():
    model, x = small_cnn(nn.GELU), inputs()
    torch.manual_seed(11)
    got = flatness.neighborhood_drop_penalty(model, x, sigma=0.3, samples=3)
    torch.manual_seed(11)
    d = 0.3 * torch.randn(3, *x.shape, dtype=x.dtype)
    lp = lambda t: torch.logsumexp(model(t), -1)
    expect = (lp(x) - lp((x + d).flatten(0, 1)).reshape(3, -1).mean(0)).square().mean()
    torch.testing.assert_close(got, expect)
    got.backward()
    assert model[-1].weight.grad.abs().sum() > 0


def test_penalties_in_train_mode_use_eval_mode_then_restore_it():
    model, x = small_cnn(batchnorm=True), inputs()
    model.train()
    with pytest.warns(RuntimeWarning, match="grad_norm_penalty runs in eval mode"):
        train_value = flatness.grad_norm_penalty(model, x)
    assert model.training and model[1].training
    model.eval()
    torch.testing.assert_close(train_value, flatness.grad_norm_penalty(model, x))
    model.train()
    with pytest.raises(ValueError, match="train mode"):
        flatness.curvature_penalty(model, x, train_mode="raise")


def test_fgsm_and_pgd():
    model, x = small_cnn(nn.GELU), inputs()
    y = model(x).argmax(1)
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xx), y, reduction="sum"), xx)
    torch.testing.assert_close(flatness.fgsm(model, x, y, 0.1), x + 0.1 * g.sign())
    loss = lambda t: nn.functional.cross_entropy(model(t), y)
    for norm in ("linf", "l2"):
        adv = flatness.pgd(model, x, y, 0.3, norm=norm, steps=5, seed=0, clamp=(0.0, 1.0))
        d = (adv - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert (size <= 0.3 + 1e-9).all() and adv.min() >= 0 and adv.max() <= 1
        assert loss(adv) > loss(x)
    with pytest.raises(ValueError, match=r"y must be a \[B\] tensor"):
        flatness.pgd(model, x, y[:2], 0.1)
    with pytest.raises(ValueError, match="norm must be one of"):
        flatness.pgd(model, x, y, 0.1, norm="l1")


@pytest.mark.parametrize(
    "penalty",
    [
        lambda m, x: flatness.grad_norm_penalty(m, x),
        lambda m, x: flatness.curvature_penalty(m, x),
        lambda m, x: flatness.neighborhood_drop_penalty(m, x, 0.1),
        lambda m, x: flatness.fgsm(m, x, torch.zeros(len(x), dtype=torch.long), 0.1),
    ],
    ids=["grad_norm_penalty", "curvature_penalty", "neighborhood_drop_penalty", "fgsm"],
)
@pytest.mark.parametrize(
    "bad", [lambda out: out.sum(1), lambda out: out[:2], lambda out: out[:, None]], ids=["1-D", "2 rows", "3-D"]
)
def test_penalties_and_attacks_refuse_outputs_that_are_not_logits(penalty, bad):
    """As the measures do: a model output that is not [B, K] logits is refused by name, not
    turned into a number (checked by shape alone: no value is read, so no host sync)."""
    model, x = small_cnn(), inputs()
    with pytest.raises(ValueError, match=r"2-D logits \[B, K\]"):
        penalty(lambda t: bad(model(t)), x)


def test_neighborhood_drop_penalty_says_which_batch_the_model_got():
    """Its one forward is on x and the noisy copies concatenated: a shape error names both."""
    model, x = small_cnn(), inputs()
    with pytest.raises(ValueError, match=r"B = 12 .*x and its 2 noisy copies, concatenated: 3 x 4 = 12 rows"):
        flatness.neighborhood_drop_penalty(lambda t: model(t)[:2], x, 0.1, samples=2)
