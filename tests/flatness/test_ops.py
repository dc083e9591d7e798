"""The flatness kernels: the reference against hand-worked values, then every
fast backend against the float64 reference (odd sizes, non-contiguous inputs,
every dtype, special values), autograd in every mode, compile (opcheck:
tests/test_ops.py)."""

import math

import pytest
import torch
from torch.func import grad, jvp, vmap

from pykernels.flatness import ops
from pykernels.reference import flatness as R
from tests.helpers import backend_device, backend_params, compile_and_check_ops

ALL_BACKENDS = ["reference"] + backend_params()
LOGIT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
EPS = {torch.float64: 1e-15, torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.9e-3}


def device_of(backend):
    return "cpu" if backend == "reference" else backend_device(backend)


def randn(*shape, seed=0, dtype=torch.float64, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype)


def logits_layouts(device, dtype, seed):
    """Odd shapes and non-contiguous views of logits."""
    yield "1-D", randn(7, seed=seed, dtype=dtype, device=device)
    yield "3-D", randn(2, 3, 5, seed=seed + 1, dtype=dtype, device=device)
    yield "transposed", randn(11, 6, seed=seed + 2, dtype=dtype, device=device).t()  # class dim strided
    yield "row-sliced", randn(9, 20, seed=seed + 3, dtype=dtype, device=device)[::2, 3:17]
    yield "K=1", randn(4, 1, seed=seed + 4, dtype=dtype, device=device)
    yield "K=2500", randn(3, 2500, seed=seed + 5, dtype=dtype, device=device)


# ---------------------------------------------------------------- reference, by hand


def test_reference_energy_and_hvp_by_hand():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(R.energy(z), torch.tensor([-math.log(2.0), -math.log(4.0)], dtype=torch.float64))
    u = torch.tensor([[[1.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    s, e, h = R.logsumexp_hvp(z, u)
    # row 0: s = (1/2, 1/2), s.u = 1/2 -> s * (u - 1/2) = (1/4, -1/4)
    # row 1: s = (3/4, 1/4), s.u = 1   -> s * (u - 1)   = (-3/4, 3/4)
    torch.testing.assert_close(s, torch.tensor([[0.5, 0.5], [0.75, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(h[0], torch.tensor([[0.25, -0.25], [-0.75, 0.75]], dtype=torch.float64))


def test_reference_curvature_step_by_hand():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=torch.float64)
    d1 = torch.tensor([[2.0, 0.5], [1.0, -1.0]], dtype=torch.float64)  # P = 2: rows 0, 2 | 1, 3
    c2 = torch.tensor([[1.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    q = R.curvature_step_(t, d1, c2)
    # sum c2 t^2: 1 - 4, 0.5 * 9, 25 - 36, 0.5 * 49; then t *= d1 (in place)
    torch.testing.assert_close(q, torch.tensor([-3.0, 4.5, -11.0, 24.5], dtype=torch.float64))
    expect = torch.tensor([[2.0, 1.0], [3.0, -4.0], [10.0, 3.0], [7.0, -8.0]], dtype=torch.float64)
    torch.testing.assert_close(t, expect)


def test_reference_hvp_is_the_logsumexp_hessian():
    z = randn(6, seed=1)
    H = torch.autograd.functional.hessian(lambda z: torch.logsumexp(z, 0), z)
    U = randn(4, 6, seed=2)
    torch.testing.assert_close(R.logsumexp_hvp(z, U)[2], U @ H)


def test_reference_hash_matches_plain_integer_arithmetic():
    def mix32_int(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 0xFFFFFFFF, 0x80000000, 123456789] + torch.randint(0, 2**32, (200,)).tolist()
    got = R.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix32_int(v) for v in values]


def test_reference_probe_statistics():
    g = R.probes((1_000_000,), seed=3, kind="gaussian")
    assert abs(g.mean()) < 5e-3 and abs(g.var() - 1) < 5e-3 and abs((g**4).mean() - 3) < 0.05
    r = R.probes((1_000_000,), seed=3, kind="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 5e-3
    other = R.probes((1_000_000,), seed=4, kind="rademacher")
    assert abs((r * other).mean()) < 5e-3  # different seeds: uncorrelated streams


def test_reference_probes_chunk_by_offset():
    S, B, D = 10, 3, 7
    full = R.probes((S, B, D), seed=11, kind="gaussian")
    part = R.probes((4, B, D), seed=11, kind="gaussian", offset=5 * B * D)
    torch.testing.assert_close(part, full[5:9], rtol=0, atol=0)


# ---------------------------------------------------------------- backends vs reference


def _max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def _energy_tol(dtype, ref):
    # Inputs widen exactly; the result is rounded once to dtype (plus float32 arithmetic).
    return 4 * max(EPS[dtype], EPS[torch.float32]) * (1.0 + _max_abs(ref))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_energy_matches_reference(backend, dtype):
    device = backend_device(backend)
    for name, z in logits_layouts(device, dtype, seed=10):
        out = ops.energy(z, backend=backend)
        ref = R.energy(z.cpu().double())
        assert out.dtype == dtype and out.shape == z.shape[:-1]
        torch.testing.assert_close(
            out.cpu().double(), ref, rtol=0, atol=_energy_tol(dtype, ref), msg=lambda m: f"{name}: {m}"
        )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # inf/NaN arithmetic in Triton's interpreter
def test_energy_special_values(backend):
    inf, nan = float("inf"), float("nan")
    z = torch.tensor(
        [
            [inf, 1.0, 2.0],
            [-inf, -inf, -inf],
            [nan, 1.0, 2.0],
            [inf, nan, 0.0],
            [inf, inf, 0.0],
            [-inf, 0.0, -inf],
            [1e30, 1e30, -1e30],
        ],
        device=device_of(backend),
    )
    expect = torch.tensor([-inf, inf, nan, nan, -inf, 0.0, -(1e30 + math.log(2.0))])
    out = ops.energy(z, backend=backend).cpu()
    torch.testing.assert_close(out, expect, equal_nan=True)
    assert ops.energy(torch.empty(3, 0, device=z.device), backend=backend).cpu().tolist() == [inf] * 3


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_logsumexp_hvp_matches_reference(backend, dtype):
    device = backend_device(backend)
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    for seed, (name, z) in enumerate(logits_layouts(device, dtype, seed=20)):
        for S, layout in ((0, "contiguous"), (1, "contiguous"), (5, "permuted"), (3, "expanded")):
            if layout == "permuted":  # sample dim not outermost in memory
                U = randn(*z.shape[:-1], S, z.shape[-1], seed=seed, dtype=dtype, device=device).movedim(-2, 0)
            elif layout == "expanded":
                U = randn(*z.shape, seed=seed, dtype=dtype, device=device).expand(S, *z.shape)
            else:
                U = randn(S, *z.shape, seed=seed, dtype=dtype, device=device)
            out = ops.logsumexp_hvp(z, U, backend=backend)
            ref = R.logsumexp_hvp(z.cpu().double(), U.cpu().double())
            for part, o, r in zip(("softmax", "energy", "hvp"), out, ref):
                assert o.dtype == dtype and o.shape == r.shape
                torch.testing.assert_close(
                    o.cpu().double(),
                    r,
                    rtol=0,
                    atol=tol * (1 + _max_abs(r)),
                    msg=lambda m: f"{name} S={S} {layout} {part}: {m}",
                )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # inf/NaN arithmetic in Triton's interpreter
def test_logsumexp_hvp_special_values(backend):
    device = device_of(backend)
    z = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [0.0, 0.0]], device=device)
    U = torch.ones(2, 3, 2, device=device)
    s, e, h = ops.logsumexp_hvp(z, U, backend=backend)
    ref = R.logsumexp_hvp(z.cpu(), U.cpu())
    for o, r in zip((s, e, h), ref):
        torch.testing.assert_close(o.cpu(), r, equal_nan=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ops.PROBE_KINDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_probes_match_reference(backend, kind, dtype):
    device = backend_device(backend)
    tol = 0.0 if kind == "rademacher" else (1e-13 if dtype == torch.float64 else 3e-6)
    for shape, seed, offset in [((3, 5, 7), 0, 0), ((2, 1, 33), -9, 2**32 - 40), ((1000,), 2**62 + 5, 123)]:
        out = torch.full(shape, float("nan"), dtype=dtype, device=device)  # poisoned: unwritten shows
        ops.fill_probes_(out, seed, offset=offset, kind=kind, backend=backend)
        ref = R.probes(shape, seed, kind, offset=offset)
        torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=tol * 6)
    # A non-contiguous out is filled in its logical (row-major) order.
    buf = torch.zeros(7, 4, dtype=dtype, device=device)
    view = buf.t()
    ops.fill_probes_(view, 5, kind=kind, backend=backend)
    torch.testing.assert_close(view.cpu().double(), R.probes((4, 7), 5, kind), rtol=0, atol=tol * 6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float32_gaussian_probes_are_the_same_numbers_on_every_backend(backend):
    # Computed in float64 and rounded on every backend: float32 log / cos differ per library by
    # a few ulps (up to 1e-5 apart before), float64 ones by at most one, which rounding absorbs.
    device = device_of(backend)
    for seed, offset in ((3, 0), (-7, 2**32 - 20_000)):
        out = torch.full((2**16,), float("nan"), dtype=torch.float32, device=device)
        ops.fill_probes_(out, seed, offset=offset, kind="gaussian", backend=backend)
        expect = R.probes((2**16,), seed, "gaussian", offset=offset).float()
        assert torch.equal(out.cpu(), expect), (out.cpu() - expect).abs().max()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_probe_dots_match_reference(backend, dtype):
    device = backend_device(backend)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    cases = [
        (randn(3, 4, 37, seed=1, dtype=dtype, device=device), randn(3, 4, 37, seed=2, dtype=dtype, device=device)),
        (
            randn(4, 3, 2, 5, 5, seed=3, dtype=dtype, device=device).transpose(0, 1),  # [S, B, ...] views
            randn(3, 4, 2, 5, 5, seed=4, dtype=dtype, device=device),
        ),
        (
            randn(2, 2, 5000, seed=5, dtype=dtype, device=device)[:, :, ::2],  # strided last dim
            randn(2, 2, 2500, seed=6, dtype=dtype, device=device),
        ),
    ]
    for v, w in cases:
        out = ops.probe_dots(v, w, backend=backend)
        ref = R.probe_dots(v.cpu().double(), w.cpu().double())
        scale = (v.abs() * w.abs()).flatten(2).sum(-1).max().item()
        torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=tol * scale)


def curvature_cases(dtype, device):
    """(tangents, d1, c2): odd widths, a multi-dim row shape, P < R, P = R, P = 1, empty, and
    strided tangents (written back from a copy)."""
    for rows, period, shape, seed in ((12, 4, (5, 7), 1), (8, 8, (300,), 4), (3, 1, (5001,), 7), (0, 0, (4,), 10)):
        yield (
            randn(rows, *shape, seed=seed, dtype=dtype, device=device),
            randn(period, *shape, seed=seed + 1, dtype=dtype, device=device),
            randn(period, *shape, seed=seed + 2, dtype=dtype, device=device),
        )
    strided = randn(9, 2, 6, seed=13, dtype=dtype, device=device).transpose(1, 2)
    yield (
        strided,
        randn(3, 6, 2, seed=14, dtype=dtype, device=device),
        randn(3, 6, 2, seed=15, dtype=dtype, device=device),
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_curvature_step_matches_reference(backend, dtype):
    device = backend_device(backend)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    for t, d1, c2 in curvature_cases(dtype, device):
        expect_t = t.cpu().double().clone()
        scale = R.curvature_step_(expect_t.abs(), d1.cpu().double(), c2.cpu().double().abs())  # sum |c2| t^2
        expect_q = R.curvature_step_(expect_t, d1.cpu().double(), c2.cpu().double())
        q = ops.curvature_step_(t, d1, c2, backend=backend)
        assert q.shape == (t.shape[0],) and q.dtype == dtype
        assert ((q.cpu().double() - expect_q).abs() <= tol * scale).all(), (q, expect_q)
        torch.testing.assert_close(t.cpu().double(), expect_t, rtol=tol, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_curvature_step_under_vmap(backend):
    """The layouts of the forward-adjoint pass: examples and probes vmapped with factors per
    example (nested), factors shared by every row (one level), factors batched with the
    tangents at another period (repeated), and tangents batched along a non-leading dim (copied
    back). Each writes the tangents in place as the op does without vmap."""
    device = device_of(backend)
    S, B, shape = 3, 4, (2, 5)
    step = lambda t, d, c: ops.curvature_step_(t.unsqueeze(0), d.unsqueeze(0), c.unsqueeze(0), backend=backend)[0]
    d1, c2 = randn(B, *shape, seed=1, device=device), randn(B, *shape, seed=2, device=device)

    t = randn(S, B, *shape, seed=3, device=device)
    expect_t = t.clone()
    expect_q = R.curvature_step_(expect_t.view(S * B, *shape), d1, c2).view(S, B)
    q = vmap(vmap(step), in_dims=(0, None, None))(t, d1, c2)
    torch.testing.assert_close(q, expect_q)
    torch.testing.assert_close(t, expect_t)

    t = randn(S, *shape, seed=4, device=device)
    expect_t = t.clone()
    expect_q = R.curvature_step_(expect_t, d1[:1], c2[:1])
    torch.testing.assert_close(vmap(step, in_dims=(0, None, None))(t, d1[0], c2[0]), expect_q)
    torch.testing.assert_close(t, expect_t)

    # rows of 2 per vmap entry against 1 factor row each: the factors are repeated
    t = randn(B, 2, *shape, seed=5, device=device)
    expect_t = t.clone()
    expect_q = torch.stack([R.curvature_step_(expect_t[b], d1[b : b + 1], c2[b : b + 1]) for b in range(B)])
    batched = lambda t, d, c: ops.curvature_step_(t, d.unsqueeze(0), c.unsqueeze(0), backend=backend)
    torch.testing.assert_close(vmap(batched)(t, d1, c2), expect_q)
    torch.testing.assert_close(t, expect_t)

    t = randn(*shape[:1], B, *shape[1:], seed=6, device=device)  # the vmap dim second
    expect_t = t.clone()
    expect_q = torch.stack(
        [R.curvature_step_(expect_t[:, b].unsqueeze(0), d1[b : b + 1], c2[b : b + 1])[0] for b in range(B)]
    )
    torch.testing.assert_close(vmap(step, in_dims=(1, 0, 0))(t, d1, c2), expect_q)
    torch.testing.assert_close(t, expect_t)


@pytest.mark.parametrize("backend", backend_params())
def test_curvature_step_refuses_batched_factors_for_unbatched_tangents(backend):
    device = backend_device(backend)
    t, d1 = randn(1, 3, device=device), randn(2, 1, 3, device=device)
    before = t.clone()
    with pytest.raises(RuntimeError, match="would write batched values into unbatched tangents"):
        vmap(lambda d: ops.curvature_step_(t, d, d, backend=backend))(d1)
    assert torch.equal(t, before)


# ---------------------------------------------------------------- autograd in every mode


def _energy_sum(backend):
    return lambda z: ops.energy(z, backend=backend).sum()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_energy_gradcheck_forward_reverse_and_second_order(backend):
    z = randn(3, 5, seed=30, device=device_of(backend)).requires_grad_()
    f = lambda z: ops.energy(z, backend=backend)
    assert torch.autograd.gradcheck(f, (z,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (z,))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_energy_under_torch_func_matches_reference_autograd(backend):
    device = device_of(backend)
    z = randn(4, 6, seed=31, device=device)
    U = randn(3, 4, 6, seed=32, device=device)
    f, fr = _energy_sum(backend), lambda z: R.energy(z).sum()
    torch.testing.assert_close(grad(f)(z), grad(fr)(z))
    torch.testing.assert_close(
        jvp(lambda z: ops.energy(z, backend=backend), (z,), (U[0],))[1], jvp(R.energy, (z,), (U[0],))[1]
    )
    torch.testing.assert_close(vmap(lambda z: ops.energy(z, backend=backend))(U), R.energy(U))
    # forward-over-reverse, vmapped over tangents: the Hessian-vector products
    hvp = vmap(lambda u: jvp(grad(f), (z,), (u,))[1])(U)
    torch.testing.assert_close(hvp, vmap(lambda u: jvp(grad(fr), (z,), (u,))[1])(U))
    # double backward
    zz = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(zz), zz, create_graph=True)
    (hv,) = torch.autograd.grad((g * U[0]).sum(), zz)
    torch.testing.assert_close(hv, hvp[0])
    # reverse-over-forward
    torch.testing.assert_close(grad(lambda z: jvp(f, (z,), (U[1],))[1])(z), hvp[1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logsumexp_hvp_autograd_and_vmap(backend):
    device = device_of(backend)
    z = randn(3, 4, seed=40, device=device).requires_grad_()
    U = randn(2, 3, 4, seed=41, device=device).requires_grad_()
    f = lambda z, U: ops.logsumexp_hvp(z, U, backend=backend)
    assert torch.autograd.gradcheck(f, (z, U), check_forward_ad=True)
    if backend != "triton":  # the formulas are shared; under the interpreter this one check takes ~30 s
        assert torch.autograd.gradgradcheck(f, (z, U))
    Z, UU = randn(5, 3, 4, seed=42, device=device), randn(5, 2, 3, 4, seed=43, device=device)
    for in_dims in ((0, 0), (0, None), (None, 0), (0, 1)):
        a = Z if in_dims[0] is not None else Z[0]
        b = {0: UU, 1: UU.movedim(0, 1), None: UU[0]}[in_dims[1]]
        out = vmap(f, in_dims=in_dims)(a, b)
        ref = vmap(R.logsumexp_hvp, in_dims=in_dims)(a, b)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, msg=lambda m: f"in_dims={in_dims}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_probe_dots_gradcheck(backend):
    device = device_of(backend)
    v, w = randn(2, 3, 4, seed=50, device=device).requires_grad_(), randn(2, 3, 4, seed=51, device=device)
    assert torch.autograd.gradcheck(
        lambda v, w: ops.probe_dots(v, w, backend=backend), (v, w.requires_grad_()), check_forward_ad=True
    )


# ---------------------------------------------------------------- torch integration


@pytest.mark.parametrize("backend", backend_params())
def test_torch_compile_fullgraph_calls_the_kernels(backend, monkeypatch):
    device = backend_device(backend)
    monkeypatch.setenv("PYKERNELS_BACKEND", backend)

    def step(z, U):
        s, e, h = ops.logsumexp_hvp(z, U)
        return ops.energy(z * 2).exp().sum() + h.square().sum() + ops.probe_dots(U, U).sum()

    z, U = randn(3, 5, seed=70, device=device), randn(2, 3, 5, seed=71, device=device)
    compile_and_check_ops(step, (z, U), backend, ("energy", "logsumexp_hvp", "probe_dots"))


@pytest.mark.parametrize("backend", backend_params())
def test_torch_compile_backward_through_registered_autograd(backend):
    device = backend_device(backend)
    f = lambda z: ops.energy(z, backend=backend).square().sum()
    z = randn(4, 7, seed=72, device=device).requires_grad_()
    (expect,) = torch.autograd.grad(R.energy(z).square().sum(), z)
    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(z), z)
    torch.testing.assert_close(got, expect)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: ops.energy(torch.tensor(1.0)), ValueError, "logits must have a class dim"),
        (lambda: ops.energy(torch.ones(2, 3, dtype=torch.int64)), TypeError, "logits must have dtype in"),
        (lambda: ops.energy([1.0, 2.0]), TypeError, "logits must be a torch.Tensor, got list"),
        (
            lambda: ops.logsumexp_hvp(torch.ones(2, 3), torch.ones(2, 3)),
            ValueError,
            r"tangents must have 3 dims \[S, \*logits.shape\] = \[S, 2, 3\], got shape \(2, 3\)",
        ),
        (
            lambda: ops.logsumexp_hvp(torch.ones(2, 3), torch.ones(1, 2, 4)),
            ValueError,
            r"tangents must be \[S, \*logits.shape\] with logits.shape = \(2, 3\), got \(1, 2, 4\)",
        ),
        (
            lambda: ops.logsumexp_hvp(torch.ones(2, 3), torch.ones(1, 2, 3, dtype=torch.float64)),
            TypeError,
            r"tangents must have dtype in \(float32\)",
        ),
        (
            lambda: ops.logsumexp_hvp(torch.ones(2, 3).half(), torch.ones(1, 2, 3).half()),
            TypeError,
            r"logits must have dtype in \(float32, float64\)",
        ),
        (lambda: ops.fill_probes_(torch.empty(3), 0, kind="uniform"), ValueError, "kind must be one of"),
        (lambda: ops.fill_probes_(torch.empty(3), 1.5), TypeError, "seed must be an int, got float"),
        (lambda: ops.fill_probes_(torch.empty(3), 2**64), ValueError, "seed must fit in a signed 64-bit"),
        (lambda: ops.fill_probes_(torch.empty(3), 0, offset=-1), ValueError, "offset must be >= 0, got -1"),
        (lambda: ops.fill_probes_(torch.empty(3), 0, offset=2**63), ValueError, f"offset must be <= {2**63 - 4}"),
        (lambda: ops.fill_probes_(torch.empty(3), 0, offset=2**63 - 2), ValueError, "offset must be <= "),
        (lambda: ops.fill_probes_(torch.empty(3, dtype=torch.int32), 0), TypeError, "out must have dtype in"),
        (
            lambda: ops.probe_dots(torch.ones(2, 3), torch.ones(2, 3)),
            ValueError,
            r"v must be \[S, B, ...\] with at least one trailing dim, got shape \(2, 3\)",
        ),
        (
            lambda: ops.probe_dots(torch.ones(2, 3, 4), torch.ones(2, 3, 5)),
            ValueError,
            r"w must have the shape of v \(2, 3, 4\), got \(2, 3, 5\)",
        ),
        (
            lambda: ops.curvature_step_(torch.ones(6, 4), torch.ones(4, 4), torch.ones(4, 4)),
            ValueError,
            "the 6 tangent rows are not a multiple of the 4 factor rows",
        ),
        (
            lambda: ops.curvature_step_(torch.ones(6, 4), torch.ones(2, 4), torch.ones(2, 5)),
            ValueError,
            r"d1 and c2 must be \[P, \*tangents.shape\[1:\]\] with tangents \(6, 4\), got \(2, 4\) and \(2, 5\)",
        ),
        (
            lambda: ops.curvature_step_(torch.ones(6, 4), torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4)),
            TypeError,
            r"d1 must have dtype in \(float32\)",
        ),
        (lambda: ops.energy(torch.ones(2, 3), backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
