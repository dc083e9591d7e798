"""Flatness measures against their oracles: exact_trace against the dense
Hessian, the estimators against exact_trace and eigvalsh, and the issue's
correctness target (Hutchinson with 1,000 probes within 3 standard errors of
exact_trace on a ReLU CNN)."""

import math
import warnings

import pytest
import torch
from torch import nn

from pykernels import flatness
from pykernels.reference import flatness as R
from tests.flatness.models import dense_hessians, inputs, small_cnn
from tests.helpers import backend_params


@pytest.fixture(scope="module")
def relu():
    model, x = small_cnn(nn.ReLU), inputs()
    return model, x, dense_hessians(model, x)


@pytest.fixture(scope="module")
def gelu():
    model, x = small_cnn(nn.GELU), inputs()
    return model, x, dense_hessians(model, x)


def traces(dense):
    return dense.diagonal(dim1=1, dim2=2).sum(-1)


def top_by_magnitude(dense, k):
    ev = torch.linalg.eigvalsh(dense)
    order = ev.abs().argsort(dim=1, descending=True)[:, :k]
    return ev.gather(1, order)


def test_exact_trace_equals_dense_hessian_trace(relu):
    model, x, dense = relu
    torch.testing.assert_close(flatness.exact_trace(model, x), traces(dense), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flatness.exact_trace(model, x, chunk_size=1), traces(dense), rtol=1e-10, atol=1e-12)


def test_exact_trace_refuses_curved_models_and_gives_the_gauss_newton_trace_when_asked(gelu):
    model, x, dense = gelu
    with pytest.raises(ValueError, match=r"piecewise linear .* curved ops: gelu \(x2\)"):
        flatness.exact_trace(model, x)
    gn = flatness.exact_trace(model, x, check=False)
    # tr(J^T A J) by hand from the dense Jacobian
    J = torch.stack(
        [torch.autograd.functional.jacobian(lambda t: model(t.reshape(1, 1, 6, 6))[0], xb.flatten()) for xb in x]
    )  # [B, K, D]
    s = torch.softmax(model(x), -1)
    A = torch.diag_embed(s) - s[:, :, None] * s[:, None, :]
    torch.testing.assert_close(gn, torch.einsum("bkl,bld,bkd->b", A, J, J))
    assert not torch.allclose(gn, traces(dense), rtol=1e-3)


@pytest.mark.parametrize("hvp", ["auto", "forward-over-reverse"])
def test_hutchinson_1000_probes_within_3_standard_errors_of_exact_trace(hvp):
    # The correctness target, on a ReLU CNN ("auto" takes the Gauss-Newton
    # path there; forward-over-reverse shares nothing with exact_trace).
    model, x = small_cnn(nn.ReLU, seed=3), inputs(B=8, seed=4)
    exact = flatness.exact_trace(model, x)
    est, se = flatness.hessian_trace(model, x, num_probes=1000, hvp=hvp)
    z = (est - exact) / se
    assert (z.abs() < 3).all(), f"z-scores {z.tolist()}"
    assert (se < 0.2 * exact).all(), "1000 probes should pin the trace down well"


@pytest.mark.parametrize("hvp", ["forward-over-reverse", "double-backward"])
def test_hutchinson_on_a_curved_model_within_3_standard_errors(gelu, hvp):
    model, x, dense = gelu
    est, se = flatness.hessian_trace(model, x, num_probes=400, hvp=hvp, seed=7)
    z = (est - traces(dense)) / se
    assert (z.abs() < 3).all(), f"z-scores {z.tolist()}"


def test_hutchinson_is_the_mean_of_the_probe_quadratic_forms(gelu):
    model, x, dense = gelu
    S, B, D = 6, x.shape[0], x[0].numel()
    V = R.probes((S, B, D), 9, "rademacher")
    q = torch.einsum("sbi,bij,sbj->sb", V, dense, V)
    est, se = flatness.hessian_trace(model, x, num_probes=S, seed=9)
    torch.testing.assert_close(est, q.mean(0))
    torch.testing.assert_close(se, q.std(0) / math.sqrt(S))


def test_hutch_plus_plus(relu, gelu):
    model, x, dense = relu  # rank <= K - 1 = 4: a sketch of 10 columns captures H exactly
    est, se = flatness.hessian_trace(model, x, num_probes=30, method="hutch++")
    torch.testing.assert_close(est, traces(dense), rtol=1e-8, atol=1e-12)
    assert (se < 1e-8 * traces(dense)).all()
    model, x, dense = gelu
    est, se = flatness.hessian_trace(model, x, num_probes=60, method="hutch++", seed=3)
    assert (((est - traces(dense)) / se).abs() < 4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hutch_plus_plus_agrees_across_backends_with_coinciding_probes(dtype):
    # 9 probes, D = 5-8: three Rademacher sketch probes often coincide (up to sign), so the
    # sketch is rank-deficient; its basis must not depend on rounding noise (it moved the
    # estimate by 0.2-8% between backends). Plain Hutchinson agrees to rounding, and so must this.
    torch.manual_seed(0)
    backends = ["reference"] + [p.values[0] for p in backend_params() if not p.marks]
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for D in (5, 6, 8):
        model = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 10)).to(dtype)
        x = torch.randn(4, D, dtype=dtype)
        runs = {b: flatness.hessian_trace(model, x, num_probes=9, method="hutch++", backend=b) for b in backends}
        for b, (est, se) in runs.items():
            torch.testing.assert_close(
                est, runs["reference"].value, rtol=tol, atol=tol, msg=lambda m: f"D={D} {b}: {m}"
            )
            torch.testing.assert_close(
                se, runs["reference"].stderr, rtol=tol, atol=tol, msg=lambda m: f"D={D} {b}: {m}"
            )


def test_same_probes_same_estimate_whatever_the_hvp_path_and_backend(relu):
    model, x, _ = relu
    runs = [
        flatness.hessian_trace(model, x, num_probes=12, seed=4, hvp=h)
        for h in ("gauss-newton", "forward-over-reverse", "double-backward")
    ]
    for backend in ["reference"] + [p.values[0] for p in backend_params() if not p.marks]:
        runs.append(flatness.hessian_trace(model, x, num_probes=12, seed=4, backend=backend))
    for other in runs[1:]:
        torch.testing.assert_close(other.value, runs[0].value, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("fixture", ["relu", "gelu"])
def test_top_eigenvalues_match_eigvalsh(method, fixture, request):
    model, x, dense = request.getfixturevalue(fixture)
    values, vectors = flatness.top_eigenvalues(
        model, x, k=3, method=method, return_eigenvectors=True, iters=None if method == "lanczos" else 500, tol=1e-12
    )
    torch.testing.assert_close(values, top_by_magnitude(dense, 3), rtol=1e-6, atol=1e-10)
    assert vectors.shape == (x.shape[0], 3, *x.shape[1:])
    v = vectors.flatten(2)
    torch.testing.assert_close(v.norm(dim=2), torch.ones(v.shape[:2], dtype=v.dtype))
    residual = torch.einsum("bij,bkj->bki", dense, v) - values[..., None] * v
    assert residual.norm(dim=2).max() < 1e-3 * values.abs().max()


def test_spectral_density(relu):
    model, x, dense = relu
    sd = flatness.spectral_density(model, x, starts=3, steps=36)
    step = (sd.grid[1] - sd.grid[0]).item()
    torch.testing.assert_close(sd.density.sum(1) * step, torch.ones(x.shape[0], dtype=x.dtype), atol=1e-2, rtol=0)
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(x.shape[0], dtype=x.dtype))
    # D = 36 steps: each run's nodes are all eigenvalues, and its weights reproduce
    # the quadratic form q . H q of its (seeded Gaussian, normalised) start q.
    ev = torch.linalg.eigvalsh(dense)
    for r in range(3):
        nodes = sd.nodes[:, r * 36 : (r + 1) * 36].sort(dim=1).values
        torch.testing.assert_close(nodes, ev, rtol=1e-8, atol=1e-10)
    q = R.probes((3, x.shape[0], 36), 0, "gaussian")
    q = q / q.norm(dim=2, keepdim=True)
    expect = torch.einsum("sbi,bij,sbj->b", q, dense, q) / 3
    torch.testing.assert_close((sd.weights * sd.nodes).sum(1), expect, rtol=1e-8, atol=1e-12)


def test_log_likelihood_and_grad_norm(gelu):
    model, x, _ = gelu
    torch.testing.assert_close(flatness.log_likelihood(model, x), torch.logsumexp(model(x), -1))
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch.logsumexp(model(xx), -1).sum(), xx)
    torch.testing.assert_close(flatness.grad_norm(model, x), g.flatten(1).norm(dim=1))


def test_normalized_outputs_are_reported_once_per_model():
    """log_softmax outputs make log p constant (every measure 0); softmax outputs are not
    logits either. Both are reported, once per model; logits are not."""
    model, x = small_cnn(nn.GELU), inputs()
    log_probs = nn.Sequential(model, nn.LogSoftmax(-1))
    with pytest.warns(RuntimeWarning, match="look like log-probabilities .* every measure is 0.*pre-softmax logits"):
        g = flatness.grad_norm(log_probs, x)
    assert (g < 1e-12).all()  # what the warning is about
    probs = nn.Sequential(model, nn.Softmax(-1))
    with pytest.warns(RuntimeWarning, match="look like probabilities .*pre-softmax logits"):
        flatness.hessian_trace(probs, x, num_probes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flatness.log_likelihood(log_probs, x)  # reported already
        flatness.grad_norm(model, x)
        flatness.log_likelihood(lambda t: model(t) - 1.0, x)  # negative logits, rows of any sum


def noise_draws(S, x, radius, noise="sigma", seed=0):
    """The S perturbations neighborhood_drop draws, [S, *x.shape]: Gaussian probes z of the
    stream `seed`, times sigma, or eps * erf(z / sqrt 2) (uniform on (-eps, eps)). One call for
    all S: the implementation's chunks must continue the same stream."""
    z = flatness.probe_vectors((S, *x.shape), seed, kind="gaussian", dtype=x.dtype)
    return radius * z if noise == "sigma" else radius * torch.erf(z / math.sqrt(2))


@pytest.mark.parametrize("noise", ["sigma", "eps"])
def test_neighborhood_drop_is_the_monte_carlo_mean(gelu, noise):
    model, x, _ = gelu
    S = 50
    est, se = flatness.neighborhood_drop(model, x, samples=S, seed=3, chunk_size=7, **{noise: 0.2})
    d = noise_draws(S, x, 0.2, noise, seed=3)
    drops = torch.logsumexp(model(x), -1) - torch.logsumexp(model((x + d).flatten(0, 1)), -1).reshape(S, -1)
    torch.testing.assert_close(est, drops.mean(0))
    torch.testing.assert_close(se, drops.std(0) / math.sqrt(S))


@pytest.mark.parametrize("noise, variance", [("sigma", 1.0), ("eps", 1 / 3)])
def test_neighborhood_drop_second_order_link(noise, variance):
    """log p(x) = logsumexp(W x + b): E[log p(x) - log p(x + d)] = -(var / 2) tr H + O(r^4), with
    var = sigma^2 (Gaussian) or eps^2 / 3 (uniform in the box, so the docstring's eps^2 / 6).
    The first-order term g . d averages to 0 but its noise (~r |g| / sqrt(S)) is far larger
    than r^2 tr H, so it is subtracted draw by draw (a control variate with the very draws
    neighborhood_drop used): what remains has a standard error of ~1% of the target or less,
    so a wrong sign, a missing factor 1/2, a box noise of the wrong spread or a zero fails."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    radius, S = 1e-2, 20_000
    est, _ = flatness.neighborhood_drop(model, x, samples=S, chunk_size=5_000, **{noise: radius})
    d = noise_draws(S, x, radius, noise)
    if noise == "eps":
        assert d.abs().max() < radius
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch.logsumexp(model(xx), -1).sum(), xx)
    first_order = (d * g).sum(-1)  # [S, B]
    drops = torch.logsumexp(model(x), -1) - torch.logsumexp(model(x + d), -1)
    torch.testing.assert_close(est, drops.mean(0), rtol=1e-12, atol=1e-15)  # the same draws
    second_order = est + first_order.mean(0)
    se = (drops + first_order).std(0) / math.sqrt(S)
    target = -(radius**2) * variance / 2 * flatness.exact_trace(model, x)
    assert (4 * se < 0.05 * target.abs()).all(), (se, target)  # tight enough to fail
    assert ((second_order - target).abs() < 4 * se).all(), (second_order, target, se)


def test_parameter_hessian_trace_and_eigenvalues():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def loss(theta):
        chunks, i = {}, 0
        for n, shape, size in names:
            chunks[n] = theta[i : i + size].view(shape)
            i += size
        return nn.functional.cross_entropy(torch.func.functional_call(model, chunks, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, flat)
    est, se = flatness.parameter_hessian_trace(model, nn.functional.cross_entropy, x, y, num_probes=2000)
    assert abs((est - dense.trace()) / se) < 3
    top = flatness.parameter_top_eigenvalues(model, nn.functional.cross_entropy, x, y, k=2)
    torch.testing.assert_close(top[0], top_by_magnitude(dense[None], 2)[0], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda m, x: flatness.hessian_trace(m, x, num_probes=0), ValueError, "num_probes must be >= 1, got 0"),
        (
            lambda m, x: flatness.hessian_trace(m, x, num_probes=2, method="hutch++"),
            ValueError,
            "hutch\\+\\+ needs num_probes >= 3",
        ),
        (lambda m, x: flatness.hessian_trace(m, x, method="xtrace"), ValueError, "method must be one of"),
        (lambda m, x: flatness.hessian_trace(m, x, probes="sobol"), ValueError, "probes must be one of"),
        (
            lambda m, x: flatness.top_eigenvalues(m, x, k=37),
            ValueError,
            "k = 37 is larger than the input dimension D = 36",
        ),
        (lambda m, x: flatness.top_eigenvalues(m, x, k=0), ValueError, "k must be >= 1"),
        (lambda m, x: flatness.top_eigenvalues(m, x, k=5, iters=3), ValueError, "lanczos needs iters >= k = 5"),
        (lambda m, x: flatness.neighborhood_drop(m, x), ValueError, "give exactly one of sigma"),
        (lambda m, x: flatness.neighborhood_drop(m, x, sigma=0.1, eps=0.1), ValueError, "give exactly one of sigma"),
        (lambda m, x: flatness.neighborhood_drop(m, x, sigma=-1.0), ValueError, "sigma must be > 0"),
        (lambda m, x: flatness.spectral_density(m, x, sigma=0.0), ValueError, "sigma .* must be > 0, got 0.0"),
        (lambda m, x: flatness.spectral_density(m, x, sigma=float("nan")), ValueError, "must be > 0, got nan"),
        (lambda m, x: flatness.grad_norm(m, x[0, 0, 0]), ValueError, "x must have a batch dim"),
        (lambda m, x: flatness.log_likelihood(lambda t: m(t).flatten(), x), ValueError, "2-D logits"),
        (lambda m, x: flatness.hessian_trace(lambda t: m(t) * float("nan"), x), ValueError, "NaN or infinite"),
        (lambda m, x: flatness.exact_trace(lambda t: m(t) + float("inf"), x), ValueError, "NaN or infinite"),
        (lambda m, x: flatness.neighborhood_drop(m, x[:0], sigma=0.1), ValueError, "empty batch"),
        (lambda m, x: flatness.hessian_trace(m, x[:0]), ValueError, "empty batch"),
        (
            lambda m, x: flatness.log_likelihood(m.half(), x),
            RuntimeError,
            "x is float64 and the model's parameters are float16",
        ),
        (
            lambda m, x: flatness.parameter_top_eigenvalues(
                m, nn.functional.cross_entropy, x, torch.arange(len(x)) % 5, k=10**6
            ),
            ValueError,
            "larger than the number of parameters",
        ),
        (
            lambda m, x: flatness.parameter_hessian_trace(
                m, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), x, torch.arange(len(x)) % 5
            ),
            ValueError,
            r"must return a scalar tensor .*got shape \(4,\)",
        ),
    ],
)
def test_bad_input(call, exc, pattern):
    with warnings.catch_warnings():  # the error alone: no method reported as failed first
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(exc, match=pattern):
            call(small_cnn(), inputs())


HESSIAN_MEASURES = {
    "hvp": lambda m, x: flatness.hvp(m, x, x),
    "hessian_trace": lambda m, x: flatness.hessian_trace(m, x, num_probes=4),
    "exact_trace": flatness.exact_trace,
    "top_eigenvalues": flatness.top_eigenvalues,
    "spectral_density": flatness.spectral_density,
    "parameter_hessian_trace": lambda m, x: flatness.parameter_hessian_trace(
        m, nn.functional.cross_entropy, x, torch.arange(len(x)) % 5, num_probes=4
    ),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("measure", list(HESSIAN_MEASURES), ids=str)
def test_hessian_measures_refuse_16_bit_models_saying_why(measure, dtype):
    """16-bit inputs or models are refused by name before any internal call fails (a 16-bit
    model fed float32 x fails in the model itself, with the model's own error)."""
    call = HESSIAN_MEASURES[measure]
    model = small_cnn(dtype=dtype)
    what = "the model's parameters" if measure.startswith("parameter") else "x"
    with pytest.raises(TypeError, match=f"need float32 or float64, got {what} in {str(dtype)[6:]}.* x.float"):
        call(model, inputs(dtype=dtype))
    if measure != "parameter_hessian_trace":  # a model that returns 16-bit logits from float32 x
        with pytest.raises(TypeError, match=f"got the model's output in {str(dtype)[6:]}"):
            call(lambda t: model(t.to(dtype)), inputs(dtype=torch.float32))
    # The first-order measures run in 16-bit.
    assert flatness.grad_norm(model, inputs(dtype=dtype)).dtype == dtype
    drop = flatness.neighborhood_drop(model, inputs(dtype=dtype), sigma=0.1, samples=4).value
    assert drop.dtype == dtype and torch.isfinite(drop).all()
