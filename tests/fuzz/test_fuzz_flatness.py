"""Property-based tests of the flatness ops on every runnable backend against the float64
reference: energy, logsumexp_hvp, fill_probes_ / probe_vectors and probe_dots."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import pykernels
from pykernels.reference import flatness as ref

from .common import (
    EPS,
    LAYOUTS,
    WRITABLE_LAYOUTS,
    assert_close,
    device_of,
    fuzz,
    laid_out,
    random_values,
    record,
    runnable_backends,
    seeds,
)

LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REAL_DTYPES = (torch.float32, torch.float64)
SPECIALS = (float("nan"), float("inf"), float("-inf"))

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # inf/NaN in the interpreter

lead_shapes = st.lists(st.sampled_from([1, 2, 3, 5, 8]), min_size=0, max_size=2)
class_dims = st.sampled_from([1, 2, 3, 7, 10, 31, 128, 257])


def _logits(case, dtype, device):
    """Logits with a few special values (IEEE rules documented in pykernels.flatness.ops) at random places."""
    shape = tuple(case["lead"]) + (case["K"],)
    values = (random_values(shape, torch.float64, case["seed"]) * case["magnitude"]).to(dtype)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    flat = values.view(-1)
    for special in case["specials"]:
        if flat.numel():
            flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = special
    return laid_out(values, case["layout"], device)


@st.composite
def logit_cases(draw, dtypes):
    return dict(
        lead=draw(lead_shapes),
        K=draw(class_dims),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(LAYOUTS)),
        magnitude=draw(st.sampled_from([1.0, 30.0, 1e4])),
        specials=draw(st.lists(st.sampled_from(SPECIALS), max_size=2)),
        seed=draw(seeds),
    )


def _tol(dtype, expect):
    # Inputs widen exactly; one rounding to dtype plus float32 (or float64) arithmetic.
    finite = expect[torch.isfinite(expect)]
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    return 8 * max(EPS[dtype], EPS[torch.float32] if dtype != torch.float64 else 0.0) * (1 + magnitude)


@pytest.mark.parametrize("backend", runnable_backends())
def test_energy_matches_reference(backend):
    device = device_of(backend)

    def body(case):
        z = _logits(case, case["dtype"], device)
        record("energy", backend)
        out = pykernels.energy(z, backend=backend)
        expect = ref.energy(z.double().cpu())
        assert out.dtype == case["dtype"]
        assert_close(
            out, expect, _tol(case["dtype"], expect) + EPS[case["dtype"]] * case["magnitude"], f"energy {case}"
        )

    fuzz(backend, logit_cases(LOGIT_DTYPES), body)


@st.composite
def hvp_cases(draw):
    case = draw(logit_cases(REAL_DTYPES))
    case.update(S=draw(st.sampled_from([0, 1, 2, 5])), tangent_layout=draw(st.sampled_from(LAYOUTS)))
    return case


@pytest.mark.parametrize("backend", runnable_backends())
def test_logsumexp_hvp_matches_reference(backend):
    device = device_of(backend)

    def body(case):
        dtype = case["dtype"]
        z = _logits(case, dtype, device)
        tangents = laid_out(
            random_values((case["S"],) + tuple(z.shape), dtype, case["seed"] + 2), case["tangent_layout"], device
        )
        record("logsumexp_hvp", backend)
        out = pykernels.logsumexp_hvp(z, tangents, backend=backend)
        expect = ref.logsumexp_hvp(z.double().cpu(), tangents.double().cpu())
        u_max = float(tangents.abs().max()) if tangents.numel() else 0.0
        for name, o, e in zip(("softmax", "energy", "hvp"), out, expect):
            assert o.dtype == dtype
            # hvp = s * (u - s.u): rounding of the tangents' size, not only of the result's
            extra = EPS[dtype] * (case["magnitude"] if name == "energy" else 16 * u_max if name == "hvp" else 0.0)
            assert_close(o, e, 4 * _tol(dtype, e) + extra, f"logsumexp_hvp {name} {case}")

    fuzz(backend, hvp_cases(), body)


@st.composite
def probe_cases(draw):
    return dict(
        shape=draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 16, 33]), min_size=1, max_size=3)),
        seed=draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 2**63 - 1, -(2**63)]))),
        offset=draw(st.one_of(st.integers(0, 2**40), st.sampled_from([0, 2**32 - 5, 2**62]))),
        kind=draw(st.sampled_from(("rademacher", "gaussian"))),
        dtype=draw(st.sampled_from(REAL_DTYPES)),
        layout=draw(st.sampled_from(WRITABLE_LAYOUTS)),
        new=draw(st.booleans()),
    )


def _probes(backend, case, device):
    shape, dtype = tuple(case["shape"]), case["dtype"]
    if case["new"]:
        record("probe_vectors", backend)
        return pykernels.probe_vectors(
            shape, case["seed"], kind=case["kind"], offset=case["offset"], dtype=dtype, device=device, backend=backend
        )
    out = laid_out(torch.full(shape, float("nan"), dtype=dtype), case["layout"], device)  # unwritten shows as NaN
    record("fill_probes_", backend)
    assert pykernels.fill_probes_(out, case["seed"], offset=case["offset"], kind=case["kind"], backend=backend) is out
    return out


@pytest.mark.parametrize("backend", runnable_backends())
def test_probes_match_reference(backend):
    device = device_of(backend)

    def body(case):
        out = _probes(backend, case, device)
        expect = ref.probes(tuple(case["shape"]), case["seed"], case["kind"], offset=case["offset"])
        assert out.dtype == case["dtype"]
        # Rademacher draws are exact; Gaussian ones close to the float64 Box-Muller (|x| < 6 for
        # 24-bit uniforms): float64 within a few ulps, float32 within 1.8e-5 (the kernels' float32
        # arithmetic, issue 11 defect 16). Exact equality is tested below.
        atol = (
            0.0
            if case["kind"] == "rademacher"
            else 6 * (8 * EPS[torch.float64] if case["dtype"] == torch.float64 else 3e-6)
        )
        assert_close(out, expect, atol, f"probes {case}")

    fuzz(backend, probe_cases(), body)


# The docs promise the same numbers on every backend (issue 11 defect 16). Still open on the CPU:
# float64 Gaussian probes at offsets near 2**62 differ from the reference's (found after the fix).
@pytest.mark.parametrize(
    "backend",
    runnable_backends(xfail={"cpu": "CPU float64 Gaussian probes at offsets near 2**62 differ from the reference's"}),
)
def test_probes_are_bit_equal_on_every_backend(backend):
    device = device_of(backend)

    def body(case):
        out = _probes(backend, case, device)
        expect = pykernels.probe_vectors(
            tuple(case["shape"]),
            case["seed"],
            kind=case["kind"],
            offset=case["offset"],
            dtype=case["dtype"],
            backend="reference",
        )
        if device == "cuda" and case["kind"] == "gaussian":
            # The GPU's log / cos are not the CPU's (the first H200 run): a few ulp, as documented.
            eps = torch.finfo(expect.dtype).eps
            torch.testing.assert_close(out.cpu(), expect, rtol=8 * eps, atol=8 * eps, msg=lambda m: f"{case}: {m}")
            return
        assert torch.equal(out.cpu(), expect), f"probes differ from the reference's: {case}"

    fuzz(backend, probe_cases(), body)


@st.composite
def dot_cases(draw):
    return dict(
        S=draw(st.sampled_from([0, 1, 2, 3])),
        B=draw(st.sampled_from([0, 1, 2, 5])),
        trailing=draw(st.lists(st.sampled_from([1, 2, 3, 17, 100]), min_size=1, max_size=3)),
        dtype=draw(st.sampled_from(REAL_DTYPES)),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=2, max_size=2)),
        special=draw(st.sampled_from((None,) + SPECIALS)),
        seed=draw(seeds),
    )


@pytest.mark.parametrize("backend", runnable_backends())
def test_probe_dots_matches_reference(backend):
    device = device_of(backend)

    def body(case):
        shape = (case["S"], case["B"], *case["trailing"])
        dtype = case["dtype"]
        v_values = random_values(shape, dtype, case["seed"])
        if case["special"] is not None and v_values.numel():
            v_values.view(-1)[v_values.numel() // 2] = case["special"]
        v = laid_out(v_values, case["layouts"][0], device)
        w = laid_out(random_values(shape, dtype, case["seed"] + 1), case["layouts"][1], device)
        record("probe_dots", backend)
        out = pykernels.probe_dots(v, w, backend=backend)
        expect = ref.probe_dots(v.double().cpu(), w.double().cpu())
        assert out.dtype == dtype and out.shape == (case["S"], case["B"])
        scale = (v.double().abs().nan_to_num(0, 0, 0) * w.double().abs()).flatten(2).sum(-1)
        atol = 4 * EPS[dtype] * (1 + (float(scale.max()) if scale.numel() else 0.0))
        assert_close(out, expect, atol, f"probe_dots {case}")

    fuzz(backend, dot_cases(), body)


# Found by the long profile: the kernels form float32 softmax as exp(z - lse) with lse rounded to
# float32, so its relative error grows like |lse| * eps (2e-4 at |z| = 1e4); torch.softmax (the
# reference) subtracts the row max instead. Not in issue 11's list.
_SOFTMAX_FROM_LSE = "found by tests/fuzz: float32 softmax = exp(z - lse) loses |lse| * eps (not in issue 11's list)"
_SOFTMAX_XFAIL = dict.fromkeys(("cpu", "triton", "cuda"), _SOFTMAX_FROM_LSE)  # cuda: seen on the first H200 run


@pytest.mark.parametrize("backend", runnable_backends(xfail=_SOFTMAX_XFAIL))
def test_float32_softmax_of_large_logits_is_accurate(backend):
    device = device_of(backend)

    @st.composite
    def cases(draw):
        return dict(
            K=draw(st.integers(2, 8)), offset=draw(st.floats(1e3, 1e5) | st.floats(-1e5, -1e3)), seed=draw(seeds)
        )

    def body(case):
        z = (random_values((3, case["K"]), torch.float64, case["seed"]) * 3 + case["offset"]).float()
        record("logsumexp_hvp (large float32 logits)", backend)
        softmax = pykernels.logsumexp_hvp(z.to(device), torch.zeros(0, 3, case["K"], device=device), backend=backend)[0]
        assert_close(softmax, torch.softmax(z.double(), -1), 16 * EPS[torch.float32], f"softmax {case}")

    fuzz(backend, cases(), body, scale=0.5)
