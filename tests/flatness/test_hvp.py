"""Input-space Hessian-vector products of log p: every method against double
backward and the dense Hessian, per-example independence, fallbacks, train mode."""

import copy
import importlib
import sys
import time
import warnings

import pytest
import torch
from torch import nn

from pykernels import flatness
from pykernels.flatness._piecewise import curved_ops
from pykernels.flatness.hvp import FEW_VECTORS, InputHessian, ParameterHessian, prepared, twice_differentiable
from tests.flatness.models import (
    SMOOTH_FAMILIES,
    LSTMClassifier,
    NoForwardModeNet,
    ResidualBlock,
    TanhNet,
    _TanhBackward,
    dense_hessians,
    inputs,
    small_cnn,
)

METHODS = (
    "forward-over-reverse",
    "forward-over-reverse-per-example",
    "double-backward",
    "finite-difference",
    "gauss-newton",
)


def probes(S, x, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, *x.shape, generator=g, dtype=x.dtype)


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU], ids=["relu", "gelu"])
@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_double_backward_and_dense_hessian(act, method):
    model, x = small_cnn(act), inputs()
    V = probes(3, x)
    dense = dense_hessians(model, x)  # [B, D, D]
    expect = torch.einsum("bij,sbj->sbi", dense, V.flatten(2)).reshape(V.shape)
    reference = flatness.hvp(model, x, V, method="double-backward")
    torch.testing.assert_close(reference, expect, rtol=1e-10, atol=1e-12)
    out = flatness.hvp(model, x, V, method=method)
    scale = expect.abs().max().item()
    if method == "gauss-newton" and act is nn.GELU:  # only the PSD part: must differ
        assert (out - expect).abs().max() > 1e-3 * scale
        return
    # The target is 1e-5 in float64; exact methods reach rounding level.
    tol = 1e-5 if method == "finite-difference" else 1e-10
    assert (out - reference).abs().max().item() <= tol * scale, f"{method}: {(out - reference).abs().max()}"


def test_hvp_blocks_are_per_example():
    model, x = small_cnn(nn.GELU), inputs(B=3)
    V = probes(2, x)
    together = flatness.hvp(model, x, V)
    alone = torch.cat([flatness.hvp(model, x[b : b + 1], V[:, b : b + 1]) for b in range(3)], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_auto_method_picks_gauss_newton_only_for_piecewise_linear_models_and_many_vectors():
    """Many vectors: Gauss-Newton (the exact Hessian a.e.) on a piecewise-linear model, else the
    smooth-network choice; a few vectors: double backward on both."""
    x = inputs()
    for act, many in ((nn.ReLU, "gauss-newton"), (nn.GELU, "auto")):
        model = small_cnn(act)
        with prepared(model, x):
            assert InputHessian(model, x, expected_vectors=100).method == many, act
            assert InputHessian(model, x, expected_vectors=FEW_VECTORS).method == "double-backward", act
            assert InputHessian(model, x, expected_vectors=FEW_VECTORS + 1).method == many, act
    with prepared(small_cnn(nn.GELU), x):
        assert InputHessian(small_cnn(nn.GELU), x).curved == {"gelu": 2}


@pytest.mark.parametrize("family", list(SMOOTH_FAMILIES))
def test_every_exact_method_equals_double_backward_on_each_smooth_family(family):
    """forward-over-reverse, forward-adjoint's products, auto (few and many vectors) and the
    measures built on them equal double backward and the dense Hessian in float64, BatchNorm-eval
    and attention included."""
    model, x = SMOOTH_FAMILIES[family](), inputs()
    with twice_differentiable():
        dense = dense_hessians(model, x)
    V = probes(12, x)
    expect = torch.einsum("bij,sbj->sbi", dense, V.flatten(2)).reshape(V.shape)
    reference = flatness.hvp(model, x, V, method="double-backward")
    scale = expect.abs().max().item()
    assert (reference - expect).abs().max().item() <= 1e-10 * scale
    for method, vectors in (
        ("forward-over-reverse", V),
        ("forward-over-reverse-per-example", V),
        ("forward-adjoint", V),
        ("auto", V),
        ("auto", V[:2]),
    ):
        out = flatness.hvp(model, x, vectors, method=method)
        assert (out - reference[: len(vectors)]).abs().max().item() <= 1e-6 * scale, (method, len(vectors))
    trace = flatness.hessian_trace(model, x, 40, seed=3)
    trace_db = flatness.hessian_trace(model, x, 40, seed=3, hvp="double-backward")
    torch.testing.assert_close(trace.value, trace_db.value, rtol=1e-6, atol=1e-9)
    plus = flatness.hessian_trace(model, x, 36 * 3, "hutch++", seed=3)  # the sketch spans R^36: exact
    exact = dense.diagonal(dim1=1, dim2=2).sum(-1)
    torch.testing.assert_close(plus.value, exact, rtol=1e-6, atol=1e-9)
    eigen = torch.linalg.eigvalsh(dense)
    top = eigen.gather(1, eigen.abs().argmax(1, keepdim=True))
    torch.testing.assert_close(flatness.top_eigenvalues(model, x, 1, iters=36), top, rtol=1e-6, atol=1e-9)


@pytest.fixture
def tanh_knobs():
    yield _TanhBackward
    _TanhBackward.backward_delay = _TanhBackward.jvp_delay = 0.0
    _TanhBackward.backward_item = False


EXACT_PRODUCTS = {
    "double-backward": "_double_backward",
    "forward-over-reverse": "_forward_over_reverse",
    "forward-adjoint": "_forward_adjoint_products",
}


@pytest.mark.parametrize("expect", list(EXACT_PRODUCTS))
def test_auto_times_the_exact_methods_and_keeps_the_fastest(monkeypatch, expect):
    """With many vectors on a smooth net, "auto" runs double backward untimed on the model's first
    operator, then times the exact methods on the second one's chunk and keeps the fastest: make
    every product method but one (forward-over-reverse: both batchings) 0.3 s slower and that one
    must be chosen, give the same products, and be reused from the cache without timing again."""
    model, x = small_cnn(nn.Tanh), inputs()
    V = probes(FEW_VECTORS + 1, x)
    expect_values = flatness.hvp(model, x, V, method="double-backward")

    def delayed(original):
        def slower(self, *args):
            time.sleep(0.3)
            return original(self, *args)

        return slower

    for method, attribute in EXACT_PRODUCTS.items():
        if method != expect:
            monkeypatch.setattr(InputHessian, attribute, delayed(getattr(InputHessian, attribute)))
    with prepared(model, x):
        first = InputHessian(model, x)
        torch.testing.assert_close(first.matvec(V.flatten(2)).reshape(V.shape), expect_values)
        assert first.method == "double-backward" and first.timings is None, first.timings
        H = InputHessian(model, x)
        assert H.method == "auto"
        out = H.matvec(V.flatten(2))
        assert H.method.startswith(expect), H.timings
        assert set(H.timings) == {"forward-over-reverse", "forward-over-reverse-per-example", *EXACT_PRODUCTS}
        torch.testing.assert_close(out.reshape(V.shape), expect_values)
        again = InputHessian(model, x)
        again.matvec(V.flatten(2))
        assert again.method == H.method and again.timings is None  # from the cache, not timed again


def test_auto_drops_forward_adjoint_products_that_differ_from_double_backward(monkeypatch):
    """Timing keeps forward-adjoint's products only where they equal double backward's on the
    timed chunk (its quadratic forms may agree while autograd misses a term of their gradient):
    products made 1.5x too large, and the fastest, must be dropped with a warning."""
    from pykernels.flatness._forward_adjoint import ForwardAdjointQuad

    model, x = small_cnn(nn.Tanh, seed=11), inputs()
    V = probes(FEW_VECTORS + 1, x)
    expect = flatness.hvp(model, x, V, method="double-backward")
    products, backward = ForwardAdjointQuad.products, InputHessian._double_backward
    monkeypatch.setattr(ForwardAdjointQuad, "products", lambda self, V: 1.5 * products(self, V))
    monkeypatch.setattr(InputHessian, "_double_backward", lambda self, Vx: time.sleep(0.2) or backward(self, Vx))
    with prepared(model, x):
        InputHessian(model, x).matvec(V.flatten(2))  # the first operator: double backward, untimed
        H = InputHessian(model, x)
        with pytest.warns(RuntimeWarning, match="forward-adjoint products differ from double backward"):
            out = H.matvec(V.flatten(2))
    assert "forward-adjoint" not in H.timings and H.method != "forward-adjoint", H.timings
    torch.testing.assert_close(out.reshape(V.shape), expect)


def test_auto_timing_is_not_decided_by_a_one_off_cost_of_the_method_timed_first(monkeypatch):
    """The method timed first pays one-off costs (allocator growth, the first transform call).
    Forward-over-reverse pays 1 s once, double backward and forward-adjoint 0.3 s on every call:
    forward-over-reverse is the faster method and must be kept (a single timing round kept double
    backward)."""
    model, x = small_cnn(nn.Tanh, seed=7), inputs()
    V = probes(FEW_VECTORS + 1, x)
    forward, backward = InputHessian._forward_over_reverse, InputHessian._double_backward
    adjoint = InputHessian._forward_adjoint_products
    calls = []

    def forward_once_slow(self, *args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return forward(self, *args)

    def backward_slow(self, Vx):
        time.sleep(0.3)
        return backward(self, Vx)

    monkeypatch.setattr(InputHessian, "_forward_over_reverse", forward_once_slow)

    def adjoint_slow(self, Vx, *args):
        time.sleep(0.3)
        return adjoint(self, Vx, *args)

    monkeypatch.setattr(InputHessian, "_double_backward", backward_slow)
    monkeypatch.setattr(InputHessian, "_forward_adjoint_products", adjoint_slow)
    with prepared(model, x):
        InputHessian(model, x).matvec(V.flatten(2))  # the first operator: double backward, untimed
        H = InputHessian(model, x)
        H.matvec(V.flatten(2))
    assert H.method in ("forward-over-reverse", "forward-over-reverse-per-example"), H.timings


def test_piecewise_check_runs_once_per_model_and_shape_and_again_when_a_module_is_swapped(monkeypatch):
    """The one-shot hvp() checks the model once per input shape (a cached dispatch-mode forward),
    and again when its module structure changes: a ReLU swapped for a GELU must leave
    Gauss-Newton, which would silently drop the curved part."""
    from pykernels.flatness import _piecewise

    runs = []
    original = _piecewise.forward_ops
    monkeypatch.setattr(_piecewise, "forward_ops", lambda model, x: runs.append(1) or original(model, x))
    model, x = small_cnn(nn.ReLU), inputs()
    V = probes(2, x)
    flatness.hvp(model, x, V)
    flatness.hvp(model, x, V)
    assert len(runs) == 1
    flatness.hvp(model, x[:2], V[:, :2])  # another shape: checked
    assert len(runs) == 2
    model[1] = nn.GELU()
    out = flatness.hvp(model, x, V)
    assert len(runs) == 3
    with prepared(model, x):
        assert InputHessian(model, x, expected_vectors=2).method == "double-backward"
    torch.testing.assert_close(out, flatness.hvp(model, x, V, method="double-backward"))


def test_in_place_ops_are_judged_as_their_out_of_place_form():
    """`out += x`, ReLU(inplace=True) and ReLU6(inplace=True) (add_, relu_, hardtanh_) keep a
    ResNet block piecewise linear: Gauss-Newton is picked and equals the dense Hessian. An
    in-place product of two x-dependent tensors (mul_) is still curved."""
    x = inputs()
    model = ResidualBlock()
    assert curved_ops(model, x) == {}
    with prepared(model, x):
        H = InputHessian(model, x)
    assert H.method == "gauss-newton"
    V = probes(2, x)
    expect = torch.einsum("bij,sbj->sbi", dense_hessians(model, x), V.flatten(2)).reshape(V.shape)
    torch.testing.assert_close(flatness.hvp(model, x, V), expect, rtol=1e-10, atol=1e-10)
    assert curved_ops(ResidualBlock(square=True), x) == {"mul": 1}


class _SliceWrites(nn.Module):
    """A smooth network that writes x-dependent values into slices of a buffer it creates."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(36, 8), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        buf = torch.zeros(x.shape[0], 16, dtype=x.dtype)
        buf[:, :8] = h
        buf[:, 8:] = 2 * h
        return self.fc2(torch.tanh(buf))


class _SliceWritesBothWays(nn.Module):
    """Writes into slices as model code does: x-dependent values into a fresh buffer (a step, a
    negative start with an open end over part of it, one column) and constants into slices and
    a column of an x-dependent tensor (assigned, zeroed, filled)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(36, 8), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.tanh(self.fc1(x.flatten(1)))
        buf = torch.zeros(x.shape[0], 16, dtype=x.dtype)
        buf[:, ::2] = h
        buf[:, -7:] = h[:, 1:] ** 2
        buf[:, 1] = 3 * h[:, 0]
        out = torch.tanh(buf) * 1.5
        out[:, 3:5] = 0.5
        out[:, 5:7].zero_()
        out[:, 9].fill_(-2.0)
        return self.fc2(out)


def test_slice_writes_and_fills_take_no_vmap_fallback(capfd):
    """PyTorch 2.13's vmap has no batching rule for copy or fill: its fallback loops over the
    examples and prints a warning on stderr at every call. The captured graph is rewritten so
    that none is taken, in the primal pass or the tangent pass."""
    model, x = _SliceWritesBothWays().double(), inputs()
    V = probes(3, x)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # forward-adjoint ran, not a fallback from it
        _forward_adjoint_quads(model, x, V)
    err = capfd.readouterr().err
    assert "batching rule" not in err, err


def test_values_written_into_a_slice_of_a_fresh_buffer_carry_their_dependence_on_x():
    """`buf[:, :k] = h` writes into a view of buf: buf then depends on x, so tanh(buf) is curved,
    "auto" does not take Gauss-Newton and exact_trace refuses the model."""
    model, x = _SliceWrites().double().eval(), inputs()
    assert curved_ops(model, x) == {"tanh": 1}
    expect = dense_hessians(model, x).diagonal(dim1=1, dim2=2).sum(-1)
    V = probes(2, x)
    with prepared(model, x):
        H = InputHessian(model, x)
        assert H.method != "gauss-newton"
        expect_quads = InputHessian(model, x, method="double-backward").quad(V.flatten(2))
        torch.testing.assert_close(H.quad(V.flatten(2)), expect_quads)
    with pytest.raises(ValueError, match="piecewise linear"):
        flatness.exact_trace(model, x)
    assert expect.abs().max() > 1e-3  # the curvature the Gauss-Newton part would miss is there


def test_hardsigmoid_networks_are_piecewise_linear():
    """Hardsigmoid (relu6(x + 3) / 6) is piecewise linear; PyTorch has no double backward through
    it, so "auto" must take Gauss-Newton (exact here), which forward-adjoint (sigma' alone, no
    sigma'' rule needed) equals."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Hardsigmoid(), nn.Linear(16, 3)).double().eval()
    x = inputs() * 8 - 4  # across the three pieces
    assert curved_ops(model, x) == {}
    V = probes(FEW_VECTORS + 4, x)
    with prepared(model, x):
        H = InputHessian(model, x)
        assert H.method == "gauss-newton"
        expect = InputHessian(model, x, method="gauss-newton").quad(V.flatten(2))
        torch.testing.assert_close(InputHessian(model, x, method="forward-adjoint").quad(V.flatten(2)), expect)
    assert expect.abs().max() > 1e-4
    torch.testing.assert_close(flatness.exact_trace(model, x), flatness.exact_trace(model, x, check=False))


class _Relu6Sigmoid(nn.Module):
    def forward(self, a):
        return nn.functional.relu6(a + 3) / 6


class _SqueezeExcitation(nn.Module):
    """MobileNetV3's block: Hardswish, then channels scaled by a Hardsigmoid gate."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.act = nn.Conv2d(1, 6, 3, padding=1), nn.Hardswish()
        self.fc1, self.fc2, self.gate = nn.Conv2d(6, 4, 1), nn.Conv2d(4, 6, 1), gate
        self.head = nn.Linear(6 * 36, 3)

    def forward(self, x):
        h = self.act(self.conv(x))
        w = self.gate(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.head((h * w).flatten(1))


def test_models_with_hardsigmoid_get_second_derivatives():
    """PyTorch 2.13 has no double backward or forward-mode rule through hardsigmoid; while a
    measure runs, a model with a Hardsigmoid module has it computed in a form that has both. The
    traces (every method) and parameter quadratic forms equal those of the same model with
    relu6(a + 3) / 6 as its gate, and the module is untouched after."""
    model, x = _SqueezeExcitation(nn.Hardsigmoid()).double().eval(), inputs() * 4 - 2
    twin = _SqueezeExcitation(_Relu6Sigmoid()).double().eval()
    twin.load_state_dict(model.state_dict())
    expect = flatness.hessian_trace(twin, x, 12, hvp="double-backward").value
    assert expect.abs().max() > 1e-4
    for method in ("auto", "auto", "double-backward", "forward-over-reverse", "forward-adjoint"):
        torch.testing.assert_close(flatness.hessian_trace(model, x, 12, hvp=method).value, expect)
    y = torch.arange(x.shape[0]) % 3
    loss_fn = nn.functional.cross_entropy
    torch.testing.assert_close(
        flatness.parameter_hessian_trace(model, loss_fn, x, y, 6).value,
        flatness.parameter_hessian_trace(twin, loss_fn, x, y, 6).value,
    )
    a = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(model.gate(a), nn.functional.hardsigmoid(a), rtol=0, atol=0)


class _FunctionalHardsigmoid(nn.Module):
    """F.hardsigmoid called as a function: no Hardsigmoid module tells the measures it is there."""

    def forward(self, a):
        return nn.functional.hardsigmoid(a)


def test_models_calling_hardsigmoid_as_a_function_get_second_derivatives():
    """A smooth model that calls F.hardsigmoid itself: every measure that takes second
    derivatives (traces by every method, the top eigenvalue, one-shot products, the parameter
    trace, the curvature penalty and its gradient) equals the relu6 twin's, on its first call
    and after."""
    model, x = _SqueezeExcitation(_FunctionalHardsigmoid()).double().eval(), inputs() * 4 - 2
    twin = _SqueezeExcitation(_Relu6Sigmoid()).double().eval()
    twin.load_state_dict(model.state_dict())
    expect = flatness.hessian_trace(twin, x, 12, hvp="double-backward").value
    assert expect.abs().max() > 1e-4
    for method in ("double-backward", "auto", "auto", "forward-over-reverse", "forward-adjoint"):
        fresh = _SqueezeExcitation(_FunctionalHardsigmoid()).double().eval()  # each method on a first call too
        fresh.load_state_dict(model.state_dict())
        for m in (fresh, model):
            torch.testing.assert_close(flatness.hessian_trace(m, x, 12, hvp=method).value, expect)
    torch.testing.assert_close(flatness.top_eigenvalues(model, x, 1), flatness.top_eigenvalues(twin, x, 1))
    V = probes(3, x)
    torch.testing.assert_close(flatness.hvp(model, x, V), flatness.hvp(twin, x, V))
    y = torch.arange(x.shape[0]) % 3
    loss_fn = nn.functional.cross_entropy
    torch.testing.assert_close(
        flatness.parameter_hessian_trace(model, loss_fn, x, y, 6).value,
        flatness.parameter_hessian_trace(twin, loss_fn, x, y, 6).value,
    )
    for direction in ("gradient", "random"):  # random: one draw on the first call too, as the twin's
        penalties = []
        for m in (_SqueezeExcitation(_FunctionalHardsigmoid()).double().eval(), twin):
            m.load_state_dict(model.state_dict())
            torch.manual_seed(7)
            penalty = flatness.curvature_penalty(m, x, 0.1, direction=direction)
            penalties.append((penalty, torch.autograd.grad(penalty, list(m.parameters())), torch.rand(())))
        torch.testing.assert_close(penalties[0], penalties[1])


def test_gauss_newton_with_the_jacobian_formed_once_equals_the_jvp_path():
    model, x = small_cnn(nn.ReLU), inputs()
    V = probes(7, x).flatten(2)
    with prepared(model, x):
        per_vector = InputHessian(model, x, method="gauss-newton")
        with_jacobian = InputHessian(model, x, method="gauss-newton", expected_vectors=100)
        assert with_jacobian._use_jacobian and not per_vector._use_jacobian
        torch.testing.assert_close(with_jacobian.matvec(V), per_vector.matvec(V))
        torch.testing.assert_close(with_jacobian.quad(V), per_vector.quad(V))


def test_gauss_newton_forms_the_jacobian_where_forward_mode_cannot_run_the_model():
    """nn.MultiheadAttention in eval with frozen weights takes PyTorch's fused attention, which
    has no forward-mode rule: Gauss-Newton's J v then comes from J formed by K reverse passes
    (reported once), and its products and quadratic forms equal J^T (diag s - s s^T) J from
    autograd's dense Jacobians."""
    model, x = SMOOTH_FAMILIES["attention"]().eval(), inputs()
    V = probes(3, x)
    J = torch.stack(
        [torch.autograd.functional.jacobian(lambda t: model(t.reshape(1, *x.shape[1:]))[0], xb.flatten()) for xb in x]
    )  # [B, K, D]
    s = torch.softmax(model(x), -1)
    A = torch.diag_embed(s) - s.unsqueeze(2) * s.unsqueeze(1)
    expect = torch.einsum("bkd,bkl,ble,sbe->sbd", J, A, J, V.flatten(2)).reshape(V.shape)
    with pytest.warns(RuntimeWarning, match="gauss-newton forms the Jacobian from 5 reverse passes"):
        got = flatness.hvp(model, x, V, method="gauss-newton")
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    with prepared(model, x):
        quads = InputHessian(model, x, method="gauss-newton").quad(V.flatten(2))
    torch.testing.assert_close(quads, (expect * V).flatten(2).sum(-1), rtol=1e-10, atol=1e-12)


def test_gauss_newton_without_forward_mode_refuses_a_jacobian_over_its_budget(monkeypatch):
    monkeypatch.setattr(importlib.import_module("pykernels.flatness.hvp"), "JACOBIAN_BUDGET", 100)
    model, x = SMOOTH_FAMILIES["attention"]().eval(), inputs()  # J: 5 x 4 x 36 elements
    with pytest.raises(RuntimeError, match=r"forward mode failed .* Jacobian \(720 elements\) is over the 100"):
        flatness.hvp(model, x, probes(2, x), method="gauss-newton")


@pytest.mark.parametrize("method", ["auto", "double-backward"])
def test_one_shot_hvp_runs_the_model_forward_once(method):
    """hvp() validates the logits of the forward that builds the gradient graph: one forward
    per call once the model's structure is cached, and the same products."""
    model, x = SMOOTH_FAMILIES["mlp-gelu"](), inputs()
    v = probes(2, x)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    first = flatness.hvp(model, x, v, method=method)  # caches the piecewise-linear check
    calls.clear()
    again = flatness.hvp(model, x, v, method=method)
    assert len(calls) == 1
    assert torch.equal(first, again)
    expect = torch.einsum("bij,sbj->sbi", dense_hessians(model, x), v.flatten(2)).reshape(v.shape)
    assert torch.allclose(again, expect, rtol=1e-10, atol=1e-12)


def test_single_vector_shape_and_chunking():
    model, x = small_cnn(nn.GELU), inputs()
    V = probes(5, x)
    full = flatness.hvp(model, x, V)
    torch.testing.assert_close(flatness.hvp(model, x, V, chunk_size=2), full, rtol=1e-12, atol=1e-14)
    one = flatness.hvp(model, x, V[0])
    assert one.shape == x.shape
    torch.testing.assert_close(one, full[0], rtol=1e-12, atol=1e-14)


def test_torchscript_model():
    model, x = small_cnn(nn.GELU), inputs()
    V = probes(2, x)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(flatness.hvp(scripted, x, V), flatness.hvp(model, x, V, method="double-backward"))


@pytest.mark.parametrize("family", ["mlp-tanh", "resnet-silu-batchnorm", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forward_adjoint_captures_torchscript_models(family, dtype):
    """A TorchScript module refuses functional_call: its graph is captured as a plain callable's,
    with its tensors as constants (`pykernels flatness --model` takes TorchScript files). It fell
    back to double backward, with a warning, before."""
    model = torch.jit.script(_forward_adjoint_family(family).to(dtype).eval())
    x = inputs(dtype=dtype)
    V = probes(5, x)
    expect = _quads_by_double_backward(model, x, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _forward_adjoint_quads(model, x, V)
        traces = flatness.hessian_trace(model, x, FEW_VECTORS + 4).value
    expect_traces = flatness.hessian_trace(model, x, FEW_VECTORS + 4, hvp="double-backward").value
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (got - expect).abs().max().item() <= tol * expect.abs().max().item()
    assert (traces - expect_traces).abs().max().item() <= tol * expect_traces.abs().max().item()


def test_model_without_forward_mode_falls_back_once_to_double_backward():
    model, x = NoForwardModeNet().double().eval(), inputs()
    V = probes(2, x)
    with pytest.warns(RuntimeWarning, match="forward-mode AD failed.*double backward") as record:
        out = flatness.hvp(model, x, V, method="forward-over-reverse")
    assert len([w for w in record if "forward-mode" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per model: no second warning
        again = flatness.hvp(model, x, V, method="forward-over-reverse")
    expect = flatness.hvp(model, x, V, method="double-backward")
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(again, expect)


class OldStyleTanh(torch.autograd.Function):
    """A pre-torch.func autograd.Function (ctx in forward, no setup_context): plain autograd runs
    it, torch.func transforms refuse it with a RuntimeError."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class OldStyleTanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = small_cnn(nn.Tanh)

    def forward(self, x):
        return self.inner(OldStyleTanh.apply(x))


class FailsOnce(nn.Module):
    """Raises `error` on its second call (the first after the validating forward), then works;
    persistent: on every call after the first."""

    def __init__(self, error, persistent: bool = False):
        super().__init__()
        self.inner, self.error, self.calls, self.persistent = small_cnn(nn.Tanh), error, 0, persistent

    def forward(self, x):
        self.calls += 1
        if self.calls == 2 or self.persistent and self.calls > 1:
            raise self.error
        return self.inner(x)


def test_double_backward_falls_back_to_one_vector_at_a_time_when_batching_fails(tanh_knobs):
    """A second-order op whose backward cannot run batched (.item() under vmap): the batched
    attempt fails, and the graph must survive it for the vector-by-vector loop (it did not:
    "Trying to backward through the graph a second time")."""
    model, x = TanhNet(), inputs()
    V = probes(3, x)
    expect = flatness.hvp(model, x, V, method="forward-over-reverse")
    tanh_knobs.backward_item = True
    torch.testing.assert_close(flatness.hvp(model, x, V, method="double-backward"), expect)


def test_forward_mode_falls_back_only_when_the_model_is_beyond_it():
    x = inputs()
    V = probes(2, x)
    model = OldStyleTanhNet()
    with pytest.warns(RuntimeWarning, match="forward-mode AD failed.*setup_context.*double backward"):
        out = flatness.hvp(model, x, V, method="forward-over-reverse")
    torch.testing.assert_close(out, flatness.hvp(model, x, V, method="double-backward"))
    # Running out of memory is the user's to see: no fallback, no switch. A bug in the model is
    # too: double backward, tried once, fails as well, and the first error is raised.
    for error, calls in (
        (torch.OutOfMemoryError("CUDA out of memory (simulated)"), 2),
        (RuntimeError("mat1 and mat2"), 3),
    ):
        model = FailsOnce(error, persistent=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(type(error), match=str(error)[:10]):
                flatness.hvp(model, x, V, method="forward-over-reverse")
        assert model.calls == calls


@pytest.mark.parametrize(
    "error, in_every_product, falls_back",
    [
        (torch.OutOfMemoryError("CUDA out of memory (simulated)"), False, False),
        (RuntimeError("Batching rule not implemented for aten::foo (simulated)"), False, True),
        # a shape error only when batched: PyTorch's GroupNorm double backward raises one
        (RuntimeError("The size of tensor a (3) must match the size of tensor b (2)"), False, True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), True, False),  # the model's own bug
    ],
)
def test_double_backward_goes_vector_by_vector_only_when_the_batching_failed(
    monkeypatch, error, in_every_product, falls_back
):
    """Out of memory in the batched double backward, or an error one vector alone raises too (a
    bug in the model), reaches the caller; an error only the batched call raises is retried one
    vector at a time, reported once."""
    model, x = small_cnn(nn.ReLU), inputs()
    V = probes(2, x)
    expect = flatness.hvp(model, x, V, method="double-backward")
    real_grad = torch.autograd.grad

    def grad(*args, is_grads_batched=False, **kwargs):
        is_product = len(args) > 2  # (g, x, v): a product; building the gradient passes (log p, x)
        if is_grads_batched or (in_every_product and is_product):
            raise error
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    if falls_back:
        with pytest.warns(RuntimeWarning, match="batched double backward failed.*one vector at a time"):
            torch.testing.assert_close(flatness.hvp(model, x, V, method="double-backward"), expect)
    else:
        with pytest.raises(type(error), match=str(error)[:10]):
            flatness.hvp(model, x, V, method="double-backward")


def test_train_mode_batchnorm_is_measured_in_eval_mode_or_refused():
    model, x = small_cnn(batchnorm=True), inputs()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
    V = probes(2, x)
    expect = flatness.hvp(model, x, V)  # eval mode
    model.train()
    with pytest.warns(RuntimeWarning, match="BatchNorm2d '1' in train mode couples the examples"):
        out = flatness.hvp(model, x, V)
    torch.testing.assert_close(out, expect)
    assert all(m.training for m in model.modules()), "train mode must be restored"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad must be restored"
    with pytest.raises(ValueError, match="the model is in train mode: BatchNorm2d '1' .* Call model.eval"):
        flatness.hvp(model, x, V, train_mode="raise")


def test_parameter_hessian_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    H = ParameterHessian(model, nn.functional.cross_entropy, x, y)
    params = [p for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(theta):
        chunks, i = {}, 0
        for name, p in model.named_parameters():
            chunks[name] = theta[i : i + p.numel()].view_as(p)
            i += p.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, chunks, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, flat)
    V = torch.randn(3, 1, flat.numel(), dtype=torch.float64)
    torch.testing.assert_close(H.matvec(V), (V @ dense.T))


PARAMETER_METHODS = ("forward-over-reverse", "double-backward", "double-backward-loop", "auto")


@pytest.mark.parametrize("family", list(SMOOTH_FAMILIES))
def test_every_parameter_hvp_method_equals_double_backward_on_each_family(family):
    """Each parameter-Hessian product (and auto's timed choice) equals one double backward per
    vector through torch.autograd in float64, BatchNorm-eval and attention included."""
    model, x = SMOOTH_FAMILIES[family](), inputs()
    for p in model.parameters():
        p.requires_grad_(True)
    y = torch.arange(x.shape[0]) % 5
    params = list(model.parameters())
    D = sum(p.numel() for p in params)
    V = torch.randn(3, 1, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with twice_differentiable():
        g = torch.cat(
            [
                t.reshape(-1)
                for t in torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
            ]
        )
        expect = torch.stack(
            [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g, params, v[0], retain_graph=True)]) for v in V]
        ).unsqueeze(1)
    scale = expect.abs().max().item()
    for method in PARAMETER_METHODS:
        H = ParameterHessian(model, nn.functional.cross_entropy, x, y, method=method)
        out = H.matvec(V)
        assert (out - expect).abs().max().item() <= 1e-6 * scale, method
        again = H.matvec(V[:1])  # a later call reuses the operator's gradient graph
        assert (again - expect[:1]).abs().max().item() <= 1e-6 * scale, method


@pytest.mark.parametrize("slow", ["_forward_over_reverse", "_double_backward"])
def test_parameter_auto_times_the_methods_once_and_keeps_the_fastest(monkeypatch, slow):
    """Make forward-over-reverse, or both double-backward methods, 0.2 s slower: auto must keep
    a method of the other kind, equal to double backward, and reuse the choice from the cache."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    V = torch.randn(4, 1, 26, dtype=torch.float64)
    expect = ParameterHessian(model, nn.functional.cross_entropy, x, y, method="double-backward-loop").matvec(V)
    original = getattr(ParameterHessian, slow)

    def delayed(self, *args, **kwargs):
        time.sleep(0.2)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ParameterHessian, slow, delayed)
    H = ParameterHessian(model, nn.functional.cross_entropy, x, y)
    torch.testing.assert_close(H.matvec(V), expect)
    assert set(H.timings) == {"forward-over-reverse", "double-backward", "double-backward-loop"}
    if slow == "_forward_over_reverse":
        assert H.method in ("double-backward", "double-backward-loop"), H.timings
    else:
        assert H.method == "forward-over-reverse", H.timings
    again = ParameterHessian(model, nn.functional.cross_entropy, x, y)
    torch.testing.assert_close(again.matvec(V), expect)
    assert again.method == H.method and again.timings is None


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda m, x: flatness.hvp(m, x[0, 0, 0], x[0, 0, 0]), ValueError, r"x must have a batch dim \[B, ...\]"),
        (
            lambda m, x: flatness.hvp(m, x[0], x[0]),
            RuntimeError,
            r"the model failed on x of shape \(1, 6, 6\) \(x must be a batch \[B, ...\]",
        ),
        (lambda m, x: flatness.hvp(m, x.long(), x), TypeError, "x must be a floating-point tensor"),
        (lambda m, x: flatness.hvp(m, x, x[:, :, :3]), ValueError, r"v must be \[S, \*x.shape\]"),
        (lambda m, x: flatness.hvp(m, x, x, method="magic"), ValueError, "method must be one of"),
        (
            lambda m, x: flatness.hvp(lambda t: m(t).unsqueeze(-1), x, x),
            ValueError,
            r"2-D logits \[B, K\] with B = 4 \(x.shape\[0\]\), got shape \(4, 5, 1\)",
        ),
        (lambda m, x: flatness.hvp(lambda t: m(t)[:2], x, x), ValueError, r"got shape \(2, 5\)"),
        (lambda m, x: flatness.hvp(lambda t: (m(t),), x, x), TypeError, "must return a logits tensor"),
        (
            lambda m, x: flatness.hvp(lambda t: m(t) / (t.flatten(1)[:, :1] > 0.5), x, x),
            ValueError,
            r"NaN or infinite logits for \d example\(s\) \(indices",
        ),
        (lambda m, x: flatness.hvp(m, x, x, train_mode="train"), ValueError, "train_mode must be one of"),
        (lambda m, x: InputHessian(m, x, expected_vectors="32"), TypeError, "expected_vectors must be an int"),
        (
            lambda m, x: ParameterHessian(m, nn.functional.cross_entropy, x, None, expected_vectors=-1),
            ValueError,
            "expected_vectors must be >= 0",
        ),
    ],
)
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(small_cnn(), inputs())


# ---------------------------------------------------------------- forward-adjoint (v . H v)


def _quads_by_double_backward(model, x, V):
    return (V * flatness.hvp(model, x, V, method="double-backward")).flatten(2).sum(-1)


def _forward_adjoint_quads(model, x, V, method="forward-adjoint"):
    with prepared(model, x):
        return InputHessian(model, x, method=method).quad(V.flatten(2))


class _Branchy(nn.Module):
    """A data-dependent branch: make_fx cannot capture it, so forward-adjoint falls back."""

    def __init__(self):
        super().__init__()
        self.inner = small_cnn(nn.GELU)

    def forward(self, x):
        return self.inner(x) if x.sum() > 0 else self.inner(-x)


@pytest.mark.parametrize(
    "family",
    list(SMOOTH_FAMILIES)
    + ["cnn-relu", "residual-in-place-square", "plain-callable", "layernorm-only", "lstm", "max-pools", "slice-writes"],
)
def test_forward_adjoint_quads_equal_double_backward(family):
    """v . H v from one tangent pass and the adjoints equals double backward in float64 on every
    family: BatchNorm-eval, attention (LayerNorm, whose nested forward mode PyTorch gets wrong,
    softmax, products of two x-dependent tensors), in-place ops, a plain callable."""
    model, x = _forward_adjoint_family(family), inputs()
    V = probes(5, x)
    expect = _quads_by_double_backward(model, x, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback report: the method itself ran
        got = _forward_adjoint_quads(model, x, V)
    assert (got - expect).abs().max().item() <= 1e-10 * expect.abs().max().item(), family


@pytest.mark.parametrize("family", [*SMOOTH_FAMILIES, "lstm", "max-pools", "slice-writes"])
def test_forward_adjoint_quads_in_float32_match_double_backward_in_float64(family):
    """The same in float32, what models run in: the fused kernel's float32 path, the in-place
    tangents and the stale-graph check's float32 tolerance, against float64 double backward."""
    model, x = _forward_adjoint_family(family), inputs()
    V = probes(5, x)
    expect = _quads_by_double_backward(model, x, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _forward_adjoint_quads(copy.deepcopy(model).float(), x.float(), V.float())
    assert got.dtype == torch.float32
    assert (got.double() - expect).abs().max().item() <= 1e-5 * expect.abs().max().item(), family


def _forward_adjoint_family(family):
    """A float64 model of test_forward_adjoint_quads_equal_double_backward's families."""
    if family == "cnn-relu":
        model = small_cnn(nn.ReLU)
    elif family == "residual-in-place-square":
        model = ResidualBlock(square=True)
    elif family == "plain-callable":
        inner = SMOOTH_FAMILIES["mlp-tanh"]()
        model = lambda t: inner(t) * 1.5  # noqa: E731  (a callable that is not an nn.Module)
    elif family == "layernorm-only":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.LayerNorm(36), nn.Linear(36, 5)).double()
    elif family == "lstm":
        model = LSTMClassifier().double().eval()
    elif family == "max-pools":
        model = _MaxPools().double().eval()
    elif family == "slice-writes":  # PyTorch's vmap rules of slice_scatter and select_scatter: rewritten
        model = _SliceWritesBothWays().double()
    else:
        model = SMOOTH_FAMILIES[family]()
    return model


class _MaxPools(nn.Module):
    """Every max pooling forward-adjoint has a rule for (1d, 2d with padding and ceil_mode, 3d,
    adaptive 2d and 3d) behind a smooth convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(64 + 16 + 18 + 36 + 8, 5)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.conv(x))  # [B, 4, 6, 6]
        F = torch.nn.functional
        pools = [
            F.max_pool2d(h, 3, stride=2, padding=1, ceil_mode=True),  # [B, 4, 4, 4]
            F.adaptive_max_pool2d(h, 2),  # [B, 4, 2, 2]
            F.max_pool3d(h.unsqueeze(1), 2),  # [B, 1, 2, 3, 3]
            F.max_pool1d(h.flatten(2), 4),  # [B, 4, 9]
            F.adaptive_max_pool3d(h.unsqueeze(1), (2, 2, 2)),  # [B, 1, 2, 2, 2]
        ]
        return self.head(torch.tanh(torch.cat([p.flatten(1) for p in pools], 1)))


def test_forward_adjoint_takes_max_pool_tangents_from_the_primal_indices():
    """Once prepared, a quadratic form runs no pooling: the tangent is gathered at the primal's
    argmax (the generic rule ran each max pooling again per probe chunk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pykernels.flatness._forward_adjoint import ForwardAdjointQuad

    class Pools(TorchDispatchMode):
        runs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Pools.runs += "max_pool" in str(func)
            return func(*args, **(kwargs or {}))

    model, x = _MaxPools().double().eval(), inputs()
    V = probes(3, x)
    with prepared(model, x):
        quad = ForwardAdjointQuad(model, x)
        first = quad(V)  # prepares: the primal pools run here
        with Pools():
            again = quad(V)
    assert Pools.runs == 0
    assert torch.equal(first, again)


class _SharedTangents(nn.Module):
    """Tangents with one reader and with several: tanh straight on the (flattened) input, a
    linear layer read by two activations, a view between a linear layer and its activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.head = nn.Linear(36, 16), nn.Linear(16, 16), nn.Linear(8, 5)

    def forward(self, x):
        h = self.first(torch.tanh(x.flatten(1)))
        h = torch.sigmoid(h) * torch.nn.functional.softplus(h) + h  # three readers of h's tangent
        g = torch.nn.functional.gelu(self.second(h).view(-1, 2, 8)).sum(1)
        return self.head(torch.tanh(g) + g)


def test_forward_adjoint_writes_in_place_only_into_tangents_it_alone_holds(monkeypatch):
    """The activations' tangents are written into their input's tangent only where the pass
    allocated it and the activation is its one reader: never into the caller's probes, never
    into a tangent another op still reads. Input and parameter space, against double backward."""
    from pykernels.flatness import _forward_adjoint

    flags, scaled, fused = [], _forward_adjoint._scaled, _forward_adjoint._fused_step

    def recorded(t, d, in_place):
        flags.append(in_place)
        return scaled(t, d, in_place)

    def recorded_fused(t, d1, c2):  # called only where the pass may write into t
        flags.append(True)
        return fused(t, d1, c2)

    monkeypatch.setattr(_forward_adjoint, "_scaled", recorded)
    monkeypatch.setattr(_forward_adjoint, "_fused_step", recorded_fused)
    model, x = _SharedTangents().double().eval(), inputs()
    V = probes(3, x)
    kept = V.clone()
    expect = _quads_by_double_backward(model, x, V)
    first, again = _forward_adjoint_quads(model, x, V), _forward_adjoint_quads(model, x, V)
    assert torch.equal(V, kept)  # the probes are the caller's
    assert torch.equal(first, again)  # nothing kept between calls was overwritten
    assert (first - expect).abs().max().item() <= 1e-10 * expect.abs().max().item()
    assert True in flags and False in flags  # both kinds of tangent occur here

    for p in model.parameters():
        p.requires_grad_(True)
    y, loss_fn = torch.arange(x.shape[0]) % 5, nn.CrossEntropyLoss()
    H = ParameterHessian(model, loss_fn, x, y, method="forward-adjoint")
    W = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kept = W.clone()
    got = H.quad(W.unsqueeze(1))
    assert torch.equal(W, kept)
    expect = _parameter_quads_by_double_backward(model, loss_fn, x, y, W)
    assert (got - expect).abs().max().item() <= 1e-10 * expect.abs().max().item()


def test_forward_adjoint_runs_each_activation_as_one_kernel_call_on_the_unwrapped_tensors(monkeypatch):
    """The curved activations whose tangent the pass owns run as one curvature_step_ call on the
    tensors under the vmap wrappers (_unbatched_step), in input space (probes and examples
    vmapped) and parameter space (probes vmapped); the values equal double backward."""
    from pykernels.flatness import _forward_adjoint

    direct, unbatched = [], _forward_adjoint._unbatched_step

    def recorded(t, d1, c2):
        out = unbatched(t, d1, c2)
        direct.append(out is not None)
        return out

    monkeypatch.setattr(_forward_adjoint, "_unbatched_step", recorded)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.Tanh(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 5))
    model, x = model.double().eval(), inputs()
    V = probes(4, x)
    expect = _quads_by_double_backward(model, x, V)
    got = _forward_adjoint_quads(model, x, V)
    assert (got - expect).abs().max().item() <= 1e-10 * expect.abs().max().item()
    assert direct == [True, True]

    direct.clear()
    for p in model.parameters():
        p.requires_grad_(True)
    y, loss_fn = torch.arange(x.shape[0]) % 5, nn.CrossEntropyLoss()
    W = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(3))
    got = ParameterHessian(model, loss_fn, x, y, method="forward-adjoint").quad(W.double().unsqueeze(1))
    expect = _parameter_quads_by_double_backward(model, loss_fn, x, y, W.double())
    assert (got - expect).abs().max().item() <= 1e-10 * expect.abs().max().item()
    assert direct and all(direct)


def test_forward_adjoint_without_its_fast_paths_equals_double_backward(monkeypatch):
    """Where torch's vmap internals are missing (or a layout is not the pass's), nothing looks
    batched: the activations go through curvature_step_'s own vmap rules, with the same values."""
    from pykernels.flatness import _forward_adjoint

    monkeypatch.setattr(_forward_adjoint, "is_batchedtensor", lambda x: False)
    steps, fused = [], _forward_adjoint._fused_step

    def recorded(*args):
        term = fused(*args)
        steps.append(term is not None)  # the op ran (through its vmap rules)
        return term

    monkeypatch.setattr(_forward_adjoint, "_fused_step", recorded)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.Tanh(), nn.Linear(24, 5)).double().eval()
    x = inputs()
    V = probes(4, x)
    expect = _quads_by_double_backward(model, x, V)
    got = _forward_adjoint_quads(model, x, V)
    assert steps and all(steps) and (got - expect).abs().max().item() <= 1e-10 * expect.abs().max().item()


@pytest.mark.parametrize(
    "activation",
    [
        lambda a: torch.nn.functional.gelu(a),
        lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
        torch.tanh,
        torch.sigmoid,
        lambda a: torch.nn.functional.silu(a),
        lambda a: torch.nn.functional.softplus(a, beta=2.0, threshold=5.0),  # identity above a = 2.5
        lambda a: torch.nn.functional.softplus(a),
        torch.exp,
    ],
    ids=["gelu", "gelu-tanh", "tanh", "sigmoid", "silu", "softplus-beta2-threshold5", "softplus", "exp"],
)
def test_closed_form_activation_derivatives_equal_nested_forward_mode(activation):
    """The closed forms of sigma' and sigma'' that forward-adjoint uses for common activations equal
    nested forward mode on the op itself, in float64 across the saturated and linear regions."""
    from torch.func import jvp
    from torch.fx.experimental.proxy_tensor import make_fx

    from pykernels.flatness._forward_adjoint import closed_form_derivatives

    a = torch.cat(
        [torch.linspace(-12, 12, 241, dtype=torch.float64), torch.tensor([2.4, 2.5, 2.6], dtype=torch.float64)]
    )
    (node,) = [n for n in make_fx(activation)(a).graph.nodes if n.op == "call_function"]
    got = closed_form_derivatives(node, a, activation(a))
    assert got is not None, node.target
    first = lambda b: jvp(activation, (b,), (torch.ones_like(b),))[1]  # noqa: E731
    expect = jvp(first, (a,), (torch.ones_like(a),))
    for which, g, e in zip(("first", "second"), got, expect):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m, w=which: f"{node.target} {w}: {m}")


def test_forward_adjoint_uses_the_current_weights():
    """The captured graph takes parameters as inputs: weights changed in place after the first
    call give the new Hessian, not the one captured."""
    model, x = SMOOTH_FAMILIES["mlp-gelu"](), inputs()
    V = probes(3, x)
    _forward_adjoint_quads(model, x, V)
    with torch.no_grad():
        model[1].weight.mul_(1.7)
    torch.testing.assert_close(_forward_adjoint_quads(model, x, V), _quads_by_double_backward(model, x, V))


def test_forward_adjoint_falls_back_when_the_graph_cannot_be_captured():
    model, x = _Branchy().double(), inputs()
    V = probes(3, x)
    with pytest.warns(RuntimeWarning, match="graph could not be captured.*forward-adjoint is not used"):
        got = _forward_adjoint_quads(model, x, V)
    torch.testing.assert_close(got, _quads_by_double_backward(model, x, V))


def count_calls(monkeypatch, cls, name: str) -> list:
    """Replaces cls.name by a wrapper that records the number of vectors of each call."""
    calls, original = [], getattr(cls, name)

    def recorded(self, V, *args, **kwargs):
        calls.append(V.shape[0])
        return original(self, V, *args, **kwargs)

    monkeypatch.setattr(cls, name, recorded)
    return calls


def test_auto_takes_forward_adjoint_for_quadratic_forms_without_timing(monkeypatch):
    """Hutchinson's v . H v on a smooth net: "auto" checks forward-adjoint against double backward
    on two random vectors and then uses it, without timing the product methods (which made a
    model's first trace several times slower than the trace); a second operator on the same model
    takes the choice from the cache, without checking again. (Here capturing is free, so that
    the first call takes it: see the next test.)"""
    monkeypatch.setattr(sys.modules["pykernels.flatness.hvp"], "CAPTURE_SECONDS_PER_OP", 0.0)
    model, x = small_cnn(nn.Tanh, seed=3), inputs()
    V = probes(FEW_VECTORS + 1, x)
    expect = _quads_by_double_backward(model, x, V)
    forward = count_calls(monkeypatch, InputHessian, "_forward_over_reverse")
    backward = count_calls(monkeypatch, InputHessian, "_double_backward")
    with prepared(model, x):
        H = InputHessian(model, x)
        got = H.quad(V.flatten(2))
    assert H.quad_method == "forward-adjoint" and H.timings is None, H.timings
    assert forward == [] and backward == [2], (forward, backward)  # only the check's two vectors
    torch.testing.assert_close(got, expect)
    with prepared(model, x):
        again = InputHessian(model, x)
        torch.testing.assert_close(again.quad(V.flatten(2)), expect)
    assert again.quad_method == "forward-adjoint" and backward == [2], backward


def test_auto_takes_forward_adjoint_for_many_quadratic_forms_in_small_chunks(monkeypatch):
    """A trace of many probes run in chunks of FEW_VECTORS or fewer (a small chunk_size bounds
    the memory) is many quadratic forms, not a few: forward-adjoint, as without chunks (it took
    the products, 3.2x slower on the bench's GELU CNN). Input and parameter space."""
    from pykernels.flatness._forward_adjoint import ForwardAdjointQuad, ParameterForwardAdjointQuad

    monkeypatch.setattr(sys.modules["pykernels.flatness.hvp"], "CAPTURE_SECONDS_PER_OP", 0.0)
    model, x = small_cnn(nn.Tanh, seed=6), inputs()
    input_quads = count_calls(monkeypatch, ForwardAdjointQuad, "__call__")
    parameter_quads = count_calls(monkeypatch, ParameterForwardAdjointQuad, "__call__")
    num_probes, chunk = 3 * FEW_VECTORS, FEW_VECTORS // 2
    trace = flatness.hessian_trace(model, x, num_probes, chunk_size=chunk)
    assert input_quads.count(chunk) == num_probes // chunk, input_quads  # besides the check's two vectors
    expect = flatness.hessian_trace(model, x, num_probes, hvp="double-backward", chunk_size=chunk)
    torch.testing.assert_close(trace.value, expect.value)

    y = torch.arange(x.shape[0]) % 5
    loss_fn = nn.functional.cross_entropy
    for p in model.parameters():
        p.requires_grad_(True)
    trace = flatness.parameter_hessian_trace(model, loss_fn, x, y, num_probes, chunk_size=chunk)
    assert parameter_quads.count(chunk) == num_probes // chunk, parameter_quads
    expect = flatness.parameter_hessian_trace(model, loss_fn, x, y, num_probes, hvp="double-backward", chunk_size=chunk)
    torch.testing.assert_close(trace.value, expect.value)


def test_auto_defers_forward_adjoint_on_a_small_models_first_call():
    """Where capturing the graph costs more than forward-adjoint saves on a call's quadratic
    forms (a small model, few vectors), the first call takes double backward without capturing,
    the next captures and takes forward-adjoint, and a call with another vector count on the
    captured model takes it at once, as does a second call with another vector count. Where it
    pays (a large forward), the first call captures."""
    from pykernels.flatness._forward_adjoint import is_captured

    model, x = SMOOTH_FAMILIES["mlp-tanh"](), inputs()
    V = probes(FEW_VECTORS + 2, x)
    expect = _quads_by_double_backward(model, x, V)
    with prepared(model, x):
        first = InputHessian(model, x)
        torch.testing.assert_close(first.quad(V.flatten(2)), expect)
        assert first.quad_method == "double-backward" and not is_captured(model, x)
        second = InputHessian(model, x)
        torch.testing.assert_close(second.quad(V.flatten(2)), expect)
        assert second.quad_method == "forward-adjoint" and is_captured(model, x)
        third = InputHessian(model, x)
        torch.testing.assert_close(third.quad(V[:-1].flatten(2)), expect[:-1])
        assert third.quad_method == "forward-adjoint"

    model = SMOOTH_FAMILIES["mlp-gelu"]()  # a second call with another number of vectors captures too
    with prepared(model, x):
        InputHessian(model, x).quad(V.flatten(2))
        again = InputHessian(model, x)
        torch.testing.assert_close(again.quad(V[:-1].flatten(2)), _quads_by_double_backward(model, x, V[:-1]))
        assert again.quad_method == "forward-adjoint" and is_captured(model, x)

    slow = SMOOTH_FAMILIES["mlp-softplus"]()
    with prepared(slow, x):
        H = InputHessian(slow, x)
        H._forward_seconds = 1.0  # as if one forward took a second
        H.quad(V.flatten(2))
    assert H.quad_method == "forward-adjoint"


def test_auto_drops_forward_adjoint_when_it_disagrees_with_double_backward(monkeypatch):
    """A capture that gives wrong values (a branch taken at trace time, an op rule PyTorch gets
    wrong) must not be used: the check on two random vectors drops it, with a warning."""
    from pykernels.flatness._forward_adjoint import ForwardAdjointQuad

    original = ForwardAdjointQuad.__call__
    monkeypatch.setattr(ForwardAdjointQuad, "__call__", lambda self, V: original(self, V) * 1.01)
    monkeypatch.setattr(sys.modules["pykernels.flatness.hvp"], "CAPTURE_SECONDS_PER_OP", 0.0)  # checked at once
    model, x = small_cnn(nn.Tanh, seed=5), inputs()
    V = probes(FEW_VECTORS + 1, x)
    with prepared(model, x), pytest.warns(RuntimeWarning, match="forward-adjoint quadratic forms differ"):
        H = InputHessian(model, x)
        got = H.quad(V.flatten(2))
    assert H.quad_method == "double-backward", H.quad_method  # the products, untimed on a first operator
    torch.testing.assert_close(got, _quads_by_double_backward(model, x, V))


def test_forward_adjoint_handles_comparisons_and_masks():
    """Booleans from a comparison (a mask, torch.where) carry no tangent; the quadratic forms
    still equal double backward's."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_cnn(nn.GELU)

        def forward(self, x):
            mask = (x < 0.8).to(x.dtype)  # x reaches it only through booleans
            return self.inner(torch.where(x > 0.5, torch.tanh(x), x * x) * mask)

    model, x = Masked().double(), inputs()
    V = probes(3, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _forward_adjoint_quads(model, x, V)
    torch.testing.assert_close(got, _quads_by_double_backward(model, x, V))


def test_forward_adjoint_runs_on_a_channels_last_input():
    """vmap's convolution of a channels-last input gives strides the fake-tensor capture did not
    see, so the graph's views must not require them: no fallback, and the double-backward values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(64, 5)).double().eval()
    x = inputs().repeat(1, 3, 1, 1).contiguous(memory_format=torch.channels_last)
    V = probes(3, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _forward_adjoint_quads(model, x, V)
    torch.testing.assert_close(got, _quads_by_double_backward(model, x.contiguous(), V))


def _group_norm_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(64, 5)).double()


@pytest.mark.filterwarnings("ignore:pykernels.flatness. batched double backward failed:RuntimeWarning")
def test_group_norm_models_get_double_backward_one_vector_at_a_time():
    """PyTorch 2.13's batched double backward through GroupNorm raises a shape error: the products
    fall back to one vector at a time, in input and parameter space, with the same values as
    forward-over-reverse."""
    model, x = _group_norm_cnn().eval(), inputs()
    V = probes(4, x)
    expect = flatness.hvp(model, x, V, method="forward-over-reverse")
    torch.testing.assert_close(flatness.hvp(model, x, V, method="double-backward"), expect)
    torch.testing.assert_close(flatness.hvp(model, x, V), expect)  # auto: double backward for few vectors
    trace = flatness.hessian_trace(model, x, 12).value
    torch.testing.assert_close(trace, flatness.hessian_trace(model, x, 12, hvp="forward-over-reverse").value)
    y, loss_fn = torch.arange(x.shape[0]) % 5, nn.CrossEntropyLoss()
    by_products = flatness.parameter_hessian_trace(model, loss_fn, x, y, 12, hvp="double-backward").value
    expect = flatness.parameter_hessian_trace(model, loss_fn, x, y, 12, hvp="forward-over-reverse").value
    torch.testing.assert_close(by_products, expect)


# ---------------------------------------------------------------- forward-adjoint, parameter space


def _parameter_quads_by_double_backward(model, loss_fn, x, y, V):
    params = [p for p in model.parameters() if p.requires_grad]
    with twice_differentiable():
        g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        g = torch.cat([t.reshape(-1) for t in g])
        hv = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g, params, v, retain_graph=True)]) for v in V]
    return (V * torch.stack(hv)).sum(1, keepdim=True)


def _label_smoothed_sum(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum", label_smoothing=0.1)


def _squared_error_of_softmax(out, y):
    """A loss without log_softmax: products and a softmax of the logits."""
    return ((out.softmax(-1) - nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)) ** 2).sum(-1).mean()


def _mse_to_one_hot(out, y):
    """mse_loss, whose forward-over-reverse fails in PyTorch 2.13 ("ZeroTensors are immutable")."""
    return nn.functional.mse_loss(out, nn.functional.one_hot(y, out.shape[-1]).to(out.dtype))


PARAMETER_LOSSES = {
    "cross-entropy": nn.functional.cross_entropy,
    "label-smoothed-sum": _label_smoothed_sum,
    "squared-error-of-softmax": _squared_error_of_softmax,
    "mse": _mse_to_one_hot,
}


class _LayerNormOfAWholeTensor(nn.Module):
    """A LayerNorm whose input has no row dims (the batch mean, normalised over all of it), and
    one over every dim but the batch: the live weight's term then sums over no rows or one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(36, 8), nn.Linear(8, 5)
        self.pooled, self.rows = nn.LayerNorm(8), nn.LayerNorm([1, 6, 6])

    def forward(self, x):
        h = torch.tanh(self.fc(self.rows(x).flatten(1)))
        return self.head(h + self.pooled(h.mean(0)))


@pytest.mark.parametrize("loss_name", list(PARAMETER_LOSSES))
@pytest.mark.parametrize(
    "family",
    list(SMOOTH_FAMILIES)
    + [
        "cnn-relu",
        "cnn-gelu-batchnorm",
        "cnn-instancenorm",
        "residual-in-place-square",
        "partly-frozen",
        "lstm",
        "max-pools",
        "whole-tensor-layernorm",
        "slice-writes",
    ],
)
def test_parameter_forward_adjoint_quads_equal_double_backward(family, loss_name):
    """v . H v over the parameters from one tangent pass through the loss's graph equals double
    backward in float64 on every family (weights times activations are the products that curve
    it here; BatchNorm-eval with a live weight, attention, in-place ops), for several losses and
    with some parameters frozen (those get no direction)."""
    if family == "cnn-relu":
        model = small_cnn(nn.ReLU)
    elif family == "cnn-gelu-batchnorm":
        model = small_cnn(nn.GELU, batchnorm=True).eval()
    elif family == "residual-in-place-square":
        model = ResidualBlock(square=True)
    elif family == "partly-frozen":
        model = SMOOTH_FAMILIES["mlp-gelu"]()
        model[1].weight.requires_grad_(False)
    elif family == "lstm":
        model = LSTMClassifier().double()
    elif family == "max-pools":
        model = _MaxPools().double()
    elif family == "whole-tensor-layernorm":
        model = _LayerNormOfAWholeTensor().double()
    elif family == "slice-writes":
        model = _SliceWritesBothWays().double()
    elif family == "cnn-instancenorm":  # batch norm on a reshaped input: its tangents need a reshape, not a view
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.SiLU(), nn.Flatten(), nn.Linear(64, 5)
        ).double()
    else:
        model = SMOOTH_FAMILIES[family]()
    if family != "partly-frozen":
        for p in model.parameters():
            p.requires_grad_(True)
    x, loss_fn = inputs(), PARAMETER_LOSSES[loss_name]
    y = torch.arange(x.shape[0]) % 5
    H = ParameterHessian(model, loss_fn, x, y, method="forward-adjoint")
    V = torch.randn(4, H.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expect = _parameter_quads_by_double_backward(model, loss_fn, x, y, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback report: the method itself ran
        got = H.quad(V.unsqueeze(1))
    assert got.shape == (4, 1)
    assert (got - expect).abs().max().item() <= 1e-10 * expect.abs().max().item(), (family, loss_name)


@pytest.mark.parametrize("family", [*SMOOTH_FAMILIES, "lstm", "slice-writes"])
def test_parameter_forward_adjoint_quads_in_float32_match_double_backward_in_float64(family):
    """The same in float32 under cross-entropy: a float32 nn.LSTM on a CPU runs as oneDNN's
    mkldnn_rnn_layer, which has no forward mode; the captured graph takes its cells instead."""
    model = _forward_adjoint_family(family)
    for p in model.parameters():
        p.requires_grad_(True)
    x, y = inputs(), torch.arange(4) % 5
    loss_fn = nn.functional.cross_entropy
    V = torch.randn(4, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(3))
    expect = _parameter_quads_by_double_backward(model, loss_fn, x, y, V.double())
    model32 = copy.deepcopy(model).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = ParameterHessian(model32, loss_fn, x.float(), y, method="forward-adjoint").quad(V.unsqueeze(1))
    assert got.dtype == torch.float32
    assert (got.double() - expect).abs().max().item() <= 1e-5 * expect.abs().max().item(), family


def test_parameter_traces_take_the_products_again_once_forward_adjoint_was_dropped():
    """A loss whose graph cannot be captured (an autograd.Function without a functionalization
    rule): "auto" drops forward-adjoint and caches the product method it timed. The model's later
    traces, and later chunks of one, take that method; they chose again before, without end
    (RecursionError from the second call on)."""
    model, x = NoForwardModeNet().double().eval(), inputs()
    y = torch.arange(x.shape[0]) % 5
    loss_fn = nn.functional.cross_entropy
    with pytest.warns(RuntimeWarning, match="forward-adjoint graph could not be captured"):
        first = flatness.parameter_hessian_trace(model, loss_fn, x, y, 12, seed=3).value
    for chunk_size in (None, 4):
        again = flatness.parameter_hessian_trace(model, loss_fn, x, y, 12, seed=3, chunk_size=chunk_size).value
        torch.testing.assert_close(again, first)
    V = torch.randn(12, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with prepared(model, x, freeze=False):
        H = ParameterHessian(model, loss_fn, x, y)
        torch.testing.assert_close(H.quad(V), H.quad(V))
        assert H.quad_method in ("double-backward", "double-backward-loop", "forward-over-reverse"), H.quad_method


@pytest.mark.parametrize("hvp", ["auto", "forward-adjoint"])
def test_labels_the_loss_refuses_raise_its_own_error_without_a_fallback_report(hvp):
    model, x = SMOOTH_FAMILIES["mlp-tanh"](), inputs()
    y = torch.arange(x.shape[0] + 1) % 5  # one label too many
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="Expected input batch_size"):
            flatness.parameter_hessian_trace(model, nn.functional.cross_entropy, x, y, 12, hvp=hvp)


def test_parameter_forward_adjoint_uses_the_current_weights():
    """The loss's graph is captured once per model and loss; weights changed in place after
    that give the new Hessian."""
    model, x = SMOOTH_FAMILIES["mlp-tanh"](), inputs()
    for p in model.parameters():
        p.requires_grad_(True)
    y = torch.arange(x.shape[0]) % 5
    loss_fn = nn.functional.cross_entropy
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ParameterHessian(model, loss_fn, x, y, method="forward-adjoint").quad(V.unsqueeze(1))
    with torch.no_grad():
        model[1].weight.mul_(1.7)
    got = ParameterHessian(model, loss_fn, x, y, method="forward-adjoint").quad(V.unsqueeze(1))
    torch.testing.assert_close(got, _parameter_quads_by_double_backward(model, loss_fn, x, y, V))


def test_parameter_forward_adjoint_recaptures_when_the_trainable_parameters_change():
    """The cached loss graph has the trainable parameters as its inputs: freezing one after a
    first call must give the smaller operator, not reuse the graph."""
    model, x = SMOOTH_FAMILIES["mlp-gelu"](), inputs()
    for p in model.parameters():
        p.requires_grad_(True)
    y = torch.arange(x.shape[0]) % 5
    loss_fn = nn.functional.cross_entropy
    for freeze in (False, True):
        model[1].weight.requires_grad_(not freeze)
        H = ParameterHessian(model, loss_fn, x, y, method="forward-adjoint")
        V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback: the method itself ran
            got = H.quad(V.unsqueeze(1))
        torch.testing.assert_close(got, _parameter_quads_by_double_backward(model, loss_fn, x, y, V))


class _GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = nn.GRU(6, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):  # x [B, 1, 6, 6]: 6 steps of 6 features
        out, _ = self.rnn(x.flatten(1, 2))
        return self.head(out[:, -1])


def test_a_product_method_that_torch_breaks_on_falls_back_to_double_backward():
    """GRU under vmap per example raises a shape error that names no transform: "auto" drops that
    method when it times it (the model's second operator), an explicit request falls back with a
    warning; both give double backward's products."""
    model, x = _GRUClassifier().double().eval(), inputs()
    V = probes(FEW_VECTORS + 4, x)
    expect = flatness.hvp(model, x, V, method="double-backward")
    for _ in range(2):
        torch.testing.assert_close(flatness.hvp(model, x, V), expect)
    with pytest.warns(RuntimeWarning, match="forward-over-reverse-per-example is not used"):
        got = flatness.hvp(_GRUClassifier().double().eval(), x, V, method="forward-over-reverse-per-example")
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_log_softmax_head_gives_no_forward_adjoint_mismatch_report(dtype):
    """log p is constant (H = 0): forward-adjoint and double backward both give rounding noise,
    which is agreement; only the normalised-output warning is given."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, 5), nn.LogSoftmax(1))
    model, x = model.to(dtype).eval(), inputs(dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            trace = flatness.hessian_trace(model, x, FEW_VECTORS + 8).value
    messages = [str(w.message) for w in caught]
    assert any("look like log-probabilities" in m for m in messages)
    assert not any("differ" in m for m in messages), messages
    assert trace.abs().max() < 1e-6


class _Tempered(nn.Module):
    """logits / T with T a plain Python float: make_fx bakes T into the captured graph."""

    def __init__(self):
        super().__init__()
        self.net, self.T = SMOOTH_FAMILIES["mlp-tanh"](), 1.0

    def forward(self, x):
        return self.net(x) / self.T


def test_forward_adjoint_captures_again_when_python_state_the_forward_reads_changed():
    """A cached graph whose value at x differs from the model's (here T changed from 1 to 4
    after the capture) is captured again: input and parameter quadratic forms follow T, without
    a fallback warning."""
    model, x = _Tempered().double().eval(), inputs()
    V = probes(3, x)
    y = torch.arange(x.shape[0]) % 5
    loss_fn = nn.functional.cross_entropy
    W = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for T in (1.0, 4.0, 4.0):
        model.T = T
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = _forward_adjoint_quads(model, x, V)
            got_parameters = ParameterHessian(model, loss_fn, x, y, method="forward-adjoint").quad(W.unsqueeze(1))
        torch.testing.assert_close(got, _quads_by_double_backward(model, x, V))
        torch.testing.assert_close(got_parameters, _parameter_quads_by_double_backward(model, loss_fn, x, y, W))


def test_a_graph_value_equals_the_models_within_rounding_with_equal_infinities_and_never_nan():
    """The stale-graph comparison: relative to the largest finite value, an equal infinity
    agrees, a NaN or an infinity of the other sign does not."""
    from pykernels.flatness._forward_adjoint import _close

    model = torch.tensor([1.0, -2.0, 100.0, float("inf")])
    assert _close(model + 0.05, model)  # within 1e-3 of 1 + 100
    assert not _close(model + torch.tensor([0.2, 0, 0, 0]), model)
    assert not _close(torch.tensor([1.0, -2.0, 100.0, float("-inf")]), model)
    assert not _close(torch.tensor([1.0, -2.0, float("nan"), float("inf")]), model)
    assert not _close(model, torch.tensor([1.0, -2.0, float("nan"), float("inf")]))
    assert _close(model.double() + 1e-7, model.double()) and not _close(model.double() + 1e-5, model.double())
    assert _close(torch.empty(0), torch.empty(0))


def test_forward_adjoint_of_a_plain_callable_follows_a_reassigned_parameter_and_keeps_no_graph():
    """A plain callable's tensors are constants of its graph: a parameter reassigned (not changed
    in place) after the capture shows as another value at x, and the graph is captured again.
    The quadratic forms carry no autograd graph (its parameters require grad)."""
    net, x = SMOOTH_FAMILIES["mlp-gelu"](), inputs()
    model = lambda z: net(z)  # noqa: E731
    V = probes(3, x)
    for scale in (1.0, 1.5):
        net[1].weight = nn.Parameter(net[1].weight.detach() * scale)
        got = _forward_adjoint_quads(model, x, V)
        assert not got.requires_grad
        torch.testing.assert_close(got, _quads_by_double_backward(model, x, V).detach())


def test_parameter_forward_adjoint_falls_back_when_the_graph_cannot_be_captured():
    model, x = _Branchy().double(), inputs()
    y = torch.arange(x.shape[0]) % 5
    loss_fn = nn.functional.cross_entropy
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    H = ParameterHessian(model, loss_fn, x, y, method="forward-adjoint")
    with pytest.warns(RuntimeWarning, match="forward-adjoint graph could not be captured.*Hessian-vector products"):
        got = H.quad(V.unsqueeze(1))
    torch.testing.assert_close(got, _parameter_quads_by_double_backward(model, loss_fn, x, y, V))


def test_parameter_auto_runs_where_forward_over_reverse_fails():
    """PyTorch 2.13's forward-over-reverse through mse_loss raises ("ZeroTensors are immutable"):
    "auto" must drop that product method, not fail the trace, and still give double backward's
    values (products, and the quadratic forms from forward-adjoint)."""
    model, x = SMOOTH_FAMILIES["mlp-tanh"](), inputs()
    for p in model.parameters():
        p.requires_grad_(True)
    y = torch.arange(x.shape[0]) % 5
    V = torch.randn(FEW_VECTORS + 2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    expect = _parameter_quads_by_double_backward(model, _mse_to_one_hot, x, y, V)
    H = ParameterHessian(model, _mse_to_one_hot, x, y)
    torch.testing.assert_close((V.unsqueeze(1) * H.matvec(V.unsqueeze(1))).sum(-1), expect)
    assert "forward-over-reverse" not in H.timings, H.timings
    torch.testing.assert_close(ParameterHessian(model, _mse_to_one_hot, x, y).quad(V.unsqueeze(1)), expect)
    # asked for by name, it falls back to double backward with a warning
    H = ParameterHessian(model, _mse_to_one_hot, x, y, method="forward-over-reverse")
    with pytest.warns(RuntimeWarning, match="forward-over-reverse failed.*ZeroTensors.*double backward"):
        torch.testing.assert_close((V.unsqueeze(1) * H.matvec(V.unsqueeze(1))).sum(-1), expect)


@pytest.mark.parametrize("case", ["forward-adjoint right", "forward-adjoint wrong"])
def test_parameter_auto_quads_take_forward_adjoint_when_it_is_right(monkeypatch, case):
    """Hutchinson over the parameters: "auto" checks forward-adjoint against double backward on two
    random vectors and uses it untimed (no product method timed or run beyond the check), or
    drops it, with a warning, when its values are off by 1 %."""
    from pykernels.flatness._forward_adjoint import ParameterForwardAdjointQuad

    model, x = small_cnn(nn.Tanh, seed=6), inputs()
    for p in model.parameters():
        p.requires_grad_(True)
    y = torch.arange(x.shape[0]) % 5
    loss_fn = nn.functional.cross_entropy
    D = sum(p.numel() for p in model.parameters())
    V = torch.randn(FEW_VECTORS + 2, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expect = _parameter_quads_by_double_backward(model, loss_fn, x, y, V)
    if case == "forward-adjoint wrong":
        original = ParameterForwardAdjointQuad.__call__
        monkeypatch.setattr(ParameterForwardAdjointQuad, "__call__", lambda s, f: original(s, f) * 1.01)
    forward = count_calls(monkeypatch, ParameterHessian, "_forward_over_reverse")
    backward = count_calls(monkeypatch, ParameterHessian, "_double_backward")
    H = ParameterHessian(model, loss_fn, x, y)
    if case == "forward-adjoint wrong":
        with pytest.warns(RuntimeWarning, match="forward-adjoint quadratic forms differ"):
            got = H.quad(V.unsqueeze(1))
        assert H.quad_method != "forward-adjoint", H.timings
    else:
        got = H.quad(V.unsqueeze(1))
        assert H.quad_method == "forward-adjoint" and H.timings is None, H.timings
        assert forward == [] and backward == [2], (forward, backward)
    torch.testing.assert_close(got, expect)
