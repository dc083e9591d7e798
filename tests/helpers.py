"""Test helpers shared across the suite: which fast backends to parametrize
over, and the device each one's tests use."""

import pytest
import torch

import pykernels
from pykernels._ops import triton_name

FAST_BACKENDS = ("cpu", "triton", "cuda")


def backend_device(name: str) -> str:
    return "cpu" if name == "cpu" or (name == "triton" and not torch.cuda.is_available()) else "cuda"


def backend_params():
    """pytest params for every fast backend, skipped (with the reason) where unavailable."""
    status = pykernels.backends()
    params = []
    for name in FAST_BACKENDS:
        marks = [pytest.mark.triton] if name == "triton" else [pytest.mark.cuda] if name == "cuda" else []
        if not status[name].available:
            marks.append(pytest.mark.skip(reason=f"{name} backend unavailable: {status[name].reason}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def compile_and_check_ops(fn, args, backend: str, ops):
    """torch.compile(fn, fullgraph=True) on args: the compiled result must equal
    eager, and every op in `ops` must appear in the captured graph (as
    pykernels::<op>, or its Triton twin pykernels::<triton_name(op)>), i.e. no fallback or break."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(fn, fullgraph=True, backend=capture)
    got, expect = compiled(*args), fn(*args)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expect if isinstance(expect, tuple) else (expect,)):
        torch.testing.assert_close(g, e)
    names = {str(n.target) for g in graphs for n in g.graph.nodes}
    for op in ops:
        target = f"pykernels.{triton_name(op) if backend == 'triton' else op}.default"
        assert target in names, f"{target} missing from the compiled graph"
