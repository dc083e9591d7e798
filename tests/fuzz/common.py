"""Shared pieces of the property-based suite: which backends run here, how many
examples each gets under the active profile, tensor layouts (contiguous,
transposed, sliced, expanded) holding the same values, per-dtype tolerances,
and the per-op, per-backend count of examples run (printed by conftest.py)."""

from __future__ import annotations

import collections
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pykernels
from tests.helpers import backend_device

PROFILE = os.environ.get("PYKERNELS_FUZZ_PROFILE", "ci")
# Examples per test and backend. Triton runs through its interpreter here (each
# launch costs ~100x a compiled kernel), so it gets fewer in the bounded profile.
_BUDGET = {
    "ci": {"reference": 25, "cpu": 40, "triton": 12, "cuda": 40},
    "long": {"reference": 400, "cpu": 1500, "triton": 200, "cuda": 1500},
}
EXAMPLES: collections.Counter = collections.Counter()  # (op, backend) -> examples run


def record(op: str, backend: str) -> None:
    EXAMPLES[(op, backend)] += 1


def runnable_backends(*, xfail: dict[str, int | str] | None = None):
    """pytest params: the reference and every fast backend, unavailable ones skipped with the reason.
    xfail: {backend: issue 11 defect number, or a description} where a known defect fails the test today."""
    status = pykernels.backends()
    params = []
    for name in ("reference", "cpu", "triton", "cuda"):
        marks = [pytest.mark.triton] if name == "triton" else [pytest.mark.cuda] if name == "cuda" else []
        if not status[name].available:
            marks.append(pytest.mark.skip(reason=f"{name} backend unavailable: {status[name].reason}"))
        if xfail and name in xfail:
            marks.append(known_defect(xfail[name]))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def known_defect(defect: int | str):
    """Fails today because of issue 11 defect `defect` (or the defect described); strict, so the fix
    turns it into a failure that says to remove the mark."""
    return pytest.mark.xfail(strict=True, reason=f"issue 11 defect {defect}" if isinstance(defect, int) else defect)


def device_of(backend: str) -> str:
    return "cpu" if backend == "reference" else backend_device(backend)


def examples(backend: str, scale: float = 1.0) -> int:
    return max(1, int(_BUDGET[PROFILE][backend] * scale))


def fuzz(backend: str, strategy, body, scale: float = 1.0) -> None:
    """Runs body(case) on examples drawn from `strategy`, as many as the profile gives `backend`."""

    @settings(max_examples=examples(backend, scale))
    @given(strategy)
    def run(case):
        body(case)

    run()


# ---------------------------------------------------------------- tensors

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
WRITABLE_LAYOUTS = ("contiguous", "transposed", "sliced")  # no overlapping (expanded) outputs

EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def laid_out(values: torch.Tensor, layout: str, device: str) -> torch.Tensor:
    """A tensor equal to `values` (on `device`) in the given memory layout. "expanded" makes dim 0
    a stride-0 broadcast of its first entry, so it changes the values: callers draw values with
    that in mind, or use the result as both input and expectation."""
    values = values.to(device)
    if layout == "contiguous" or values.dim() == 0:
        return values.contiguous()
    if layout == "transposed":
        if values.dim() < 2:
            return laid_out(values, "sliced", device)
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other element of a buffer twice as long, at an offset
        buf = torch.zeros(*values.shape[:-1], 2 * values.shape[-1] + 1, dtype=values.dtype, device=device)
        view = buf[..., 1::2]
        view.copy_(values)
        return view
    if layout == "expanded":
        return values[:1].expand(values.shape)
    raise ValueError(layout)


def random_values(shape, dtype: torch.dtype, seed: int, *, ties: bool = False) -> torch.Tensor:
    """Standard normal values (or small integers, for ties) rounded to dtype, on the CPU."""
    g = generator(seed)
    if ties:
        return torch.randint(-3, 4, tuple(shape), generator=g).to(dtype)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)


def assert_close(got: torch.Tensor, expect: torch.Tensor, atol: float, what: str) -> None:
    """got (any dtype, any device) against a float64 CPU expectation: same shape, same NaN
    positions, same infinities, finite values within atol."""
    got = got.detach().cpu().double()
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    torch.testing.assert_close(got, expect, rtol=0, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- strategies

seeds = st.integers(0, 2**31 - 1)
