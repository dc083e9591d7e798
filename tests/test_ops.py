"""The op inventory. For every schema of the loaded library (torch.ops.pykernels, so a new op
in csrc/ops/registration.cpp fails here until it has all of these): its entries in the two
tables (pykernels._ops.RULES, pykernels.backend.OP_FAMILY), its fake kernel on the op and on
its Triton twin, a kernel per built backend, its reference with the schema's name and
signature, its autograd rule where the table has one; then torch.library.opcheck over
SAMPLES on every runnable backend. The per-op tests (tests/<domain>/) test what a table
cannot say: values against the reference, autograd values, errors, compile graphs."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch._library.simple_registry import singleton as _python_registrations

import pykernels
from pykernels import _ops, backend
from tests.helpers import backend_device, backend_params

ROOT = Path(__file__).resolve().parents[1]
UTILITY_SCHEMAS = ("cpu_isa",)  # no tensors: no reference, fake, twin or opcheck


def library_schemas() -> list[str]:
    """The schemas csrc/ops/registration.cpp defines, read from the loaded library (the Triton
    twins, registered from Python, are left out)."""
    if not _ops.LOADED:
        return []
    qualified = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pykernels::")]
    names = {n.split("::")[1].split(".")[0] for n in qualified}
    return sorted(n for n in names if _maybe_get_opdef(f"pykernels::{n}") is None)


SCHEMAS = library_schemas()
OPS = [op for op in SCHEMAS if op not in UTILITY_SCHEMAS]
pytestmark = pytest.mark.skipif(not _ops.LOADED, reason=f"compiled extension not loaded ({_ops.LOAD_ERROR})")


def _triton_available() -> bool:
    return pykernels.backends()["triton"].available


def _twin(op: str) -> str:
    importlib.import_module(f"pykernels.triton.{backend.OP_FAMILY[op]}")
    return f"pykernels::{_ops.triton_name(op)}"


def _arguments(qualified: str) -> list[tuple[str, str]]:
    namespace, name = qualified.split("::")
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    return [(a.name, str(a.type)) for a in schema.arguments]


def test_the_tables_cover_exactly_the_library():
    assert SCHEMAS, "no pykernels schema found in the loaded library"
    assert sorted(_ops.RULES) == SCHEMAS
    assert sorted(backend.OP_FAMILY) == OPS


def test_triton_names_follow_one_rule():
    assert _ops.triton_name("energy") == "energy_triton"
    assert _ops.triton_name("probe_accumulate_") == "probe_accumulate_triton_"
    assert _ops.triton_name("fill_probes_") == "fill_probes_triton_"


@pytest.mark.parametrize("op", OPS)
def test_reference_has_the_schema_name_and_signature(op):
    reference = backend.op_callable(op, "reference")
    assert reference.__name__ == op
    assert reference.__module__ == f"pykernels.reference.{backend.OP_FAMILY[op]}"
    params = inspect.signature(reference).parameters.values()
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == [name for name, _ in _arguments(f"pykernels::{op}")]
    assert all(p.default is not inspect.Parameter.empty for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def test_wings_dispatch_through_resolve():
    # Only pykernels.backend.resolve steps from a backend name to a kernel.
    banned = ("torch.ops.pykernels", "pykernels.triton", "from ..triton")
    for folder in ("probes", "selection", "flatness", "bench"):
        for path in (ROOT / "pykernels" / folder).glob("*.py"):
            text = path.read_text()
            for word in banned:
                assert word not in text, f"{path.relative_to(ROOT)} reaches a kernel without resolve: {word!r}"


def test_reference_registers_nothing():
    # The references are plain PyTorch: registrations belong to pykernels/_ops.py.
    for path in (ROOT / "pykernels" / "reference").glob("*.py"):
        assert "torch.library" not in path.read_text(), f"{path} calls torch.library"


def _registered_fake(qualified: str):
    opdef = _maybe_get_opdef(qualified)
    if opdef is not None:  # a Triton twin (custom_op)
        return opdef._abstract_fn
    kernel = _python_registrations.find(qualified).fake_impl.kernel
    if kernel is None:
        return None
    # torch.library wraps a C++ op's fake kernel in a closure over it (its pystub check).
    return inspect.getclosurevars(kernel.func).nonlocals.get("func", kernel.func)


@pytest.mark.parametrize("op", OPS)
def test_fake_kernel_registered_on_the_op_and_its_twin(op):
    fake = _ops.RULES[op].fake
    assert fake is not None, f"_ops.RULES[{op!r}] has no fake kernel"
    assert _registered_fake(f"pykernels::{op}") is fake
    if _triton_available():
        assert _registered_fake(_twin(op)) is fake


@pytest.mark.parametrize("op", OPS)
def test_triton_twin_has_the_schema(op):
    if not _triton_available():
        pytest.skip(f"triton backend unavailable: {pykernels.backends()['triton'].reason}")
    assert _arguments(_twin(op)) == _arguments(f"pykernels::{op}")
    assert backend.op_callable(op, "triton") is _maybe_get_opdef(_twin(op))


@pytest.mark.parametrize("op", OPS)
def test_kernel_registered_per_built_backend(op):
    built = ["CPU"] + (["CUDA"] if _ops.has_kernel("probe_scores", "CUDA") else [])
    for key in built:
        assert _ops.has_kernel(op, key), f"pykernels::{op} has no {key} kernel"


def test_utility_schemas_run():
    assert set(UTILITY_SCHEMAS) <= set(SCHEMAS)
    assert torch.ops.pykernels.cpu_isa() in ("avx512", "avx2", "scalar")


@pytest.mark.parametrize("op", OPS)
def test_autograd_registered_where_the_table_has_it(op):
    rules = _ops.RULES[op]
    names = [f"pykernels::{op}"] + ([_twin(op)] if _triton_available() else [])
    for name in names:
        opdef = _maybe_get_opdef(name)
        if opdef is not None:  # a Triton twin: custom_op keeps the registered backward
            assert (opdef._backward_fn is not None) == (rules.autograd is not None), name
            assert (opdef._vmap_fn is not None) == (rules.vmap is not None), name
        else:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
            assert has == (rules.autograd is not None), name


# ---------------------------------------------------------------- opcheck


def _randn(*shape, seed, device, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def _stream_state(device, slots, ring, K):
    meta = torch.zeros(slots, 3, dtype=torch.int64, device=device)
    meta[:, 1] = -1
    return (torch.zeros(slots, ring, K, device=device), meta, torch.zeros(2, dtype=torch.int64, device=device))


def _probe_scores_samples(device):
    layers = [_randn(2, 6, 16, seed=l, device=device) for l in range(2)]
    w, b = _randn(2, 16, 3, seed=10, device=device), _randn(3, seed=11, device=device)
    lengths = torch.tensor([6, 3], device=device)
    samples = [(layers, w, b, lengths, smoothing, 4, 0.3) for smoothing in ("none", "swim", "ema")]
    samples.append((layers, w, None, None, "swim", 4, 0.3))
    # Inputs that require grad: opcheck also checks the autograd registration.
    samples.append(
        (
            [h.clone().requires_grad_() for h in layers],
            w.clone().requires_grad_(),
            b.clone().requires_grad_(),
            lengths,
            "ema",
            4,
            0.3,
        )
    )
    return samples


def _stream_step_samples(device):
    # Rows out of order, one inactive (swim keeps a ring of 2 * window per slot).
    return [
        (
            *_stream_state(device, 5, 6, 2),
            torch.tensor([3, 1], device=device),
            _randn(2, 2, seed=20, device=device),
            torch.tensor([True, False], device=device),
            torch.zeros(2, device=device),
            3,
            1.0,
        )
    ]


def _stream_step_varlen_samples(device):
    samples = []
    for window, ring in ((3, 6), (0, 1)):  # swim and ema; a segment with count 0, a gap of rows
        samples.append(
            (
                *_stream_state(device, 5, ring, 2),
                torch.tensor([3, 1, 4], device=device),
                torch.tensor([0, 2, 7], device=device),
                torch.tensor([2, 5, 0], device=device),
                _randn(8, 2, seed=21, device=device),
                torch.zeros(2, device=device),
                window,
                0.5,
            )
        )
    return samples


def _softmax_weighted_bce_fwd_samples(device):
    z = _randn(3, 10, seed=30, device=device)
    y = torch.tensor([1.0, 0.0, 0.25], device=device)
    lengths = torch.tensor([10, 6, 3], device=device)  # one sequence shorter than the window
    return [(z.clone().requires_grad_(), y, lengths, 4, 1.0, False, True), (z, y, lengths, 4, 0.5, True, False)]


def _flatness_samples(device):
    z = _randn(3, 5, seed=60, device=device, dtype=torch.float64).requires_grad_()
    U = _randn(2, 3, 5, seed=61, device=device, dtype=torch.float64).requires_grad_()
    return {
        "energy": [(z,), (_randn(2, 3, 5, seed=62, device=device),)],
        "logsumexp_hvp": [(z, U)],
        "fill_probes_": [
            (torch.empty(4, 6, device=device), 3, 7, "gaussian"),
            (torch.empty(5, 3, device=device, dtype=torch.float64), -2, 0, "rademacher"),
        ],
        "probe_dots": [(U, _randn(2, 3, 5, seed=63, device=device, dtype=torch.float64))],
        "curvature_step_": [  # [R, ...] tangents, factor rows with period P = 3, then P = 1
            (_randn(6, 2, 3, seed=64, device=device), *(_randn(3, 2, 3, seed=s, device=device) for s in (65, 66))),
            tuple(_randn(n, 7, seed=67 + n, device=device, dtype=torch.float64) for n in (4, 1, 1)),
        ],
    }


def _selection_samples(device):
    x = _randn(2, 9, 4, seed=15, device=device)
    a, b = (_randn(3, 20, seed=s, device=device, dtype=torch.float64) for s in (16, 17))
    return {
        "pairwise_corr_distance": [
            (x.to(dtype), triu) for dtype in (torch.float32, torch.float64) for triu in (False, True)
        ],
        "spearman": [(a, b)],
        "parc_spearman": [(x, torch.arange(9, device=device) % 3)],
    }


def samples(op: str, device) -> list[tuple]:
    """Small argument lists that exercise the op's cases (each backend's values are compared
    with the reference in tests/<domain>/; opcheck checks schema, fake, autograd, dispatch)."""
    table = {
        "probe_scores": _probe_scores_samples,
        "probe_accumulate_": lambda d: [
            (_randn(4, 2, seed=1, device=d), _randn(4, 16, seed=2, device=d), _randn(16, 2, seed=3, device=d))
        ],
        "probe_stream_step": _stream_step_samples,
        "probe_stream_step_varlen": _stream_step_varlen_samples,
        "softmax_weighted_bce_fwd": _softmax_weighted_bce_fwd_samples,
    }
    if op in table:
        return table[op](device)
    return {**_flatness_samples(device), **_selection_samples(device)}[op]


# Ranking ops: outputs that are piecewise constant in the inputs; opcheck's dynamic-shape AOT test
# would retrace the data-dependent loops, so the static one stands for it.
OPCHECK_UTILS = {
    "spearman": ("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    "parc_spearman": ("test_schema", "test_faketensor", "test_aot_dispatch_static"),
}


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, name):
    device = backend_device(name)
    cases = samples(op, device)
    assert cases, f"no opcheck sample for {op}"
    kernel = backend.op_callable(op, name)
    for args in cases:
        kwargs = {"test_utils": OPCHECK_UTILS[op]} if op in OPCHECK_UTILS else {}
        torch.library.opcheck(kernel, args, **kwargs)


# ---------------------------------------------------------------- CONTRIBUTING.md


def test_contributing_table_names_real_paths():
    """Every path CONTRIBUTING.md's "to add an op" table names, with <family> / <op> filled in
    for each op, exists (so the table cannot go stale)."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    table = text[text.index("| step |") :]
    table = table[: table.index("\n\n")]
    paths = re.findall(r"`((?:pykernels|csrc|tests|scripts)/[^`* ]+)`", table)
    assert len(paths) >= 8, paths
    for op, family in backend.OP_FAMILY.items():
        for path in paths:
            filled = path.replace("<family>", family).replace("<op>", op)
            if "<" in filled:  # a pattern over names the table does not fix (e.g. tests/<domain>/)
                parent = ROOT / filled.split("<")[0]
                assert parent.exists(), f"CONTRIBUTING.md names {path}: {parent} does not exist"
            else:
                assert (ROOT / filled).exists(), f"CONTRIBUTING.md names {path}: {filled} does not exist for {op}"
