"""Backend selection: defaults, PYKERNELS_BACKEND, explicit choices and the
errors for choices that cannot run."""

import pytest
import torch

import pykernels
from pykernels import backend as B


def _small():
    return [torch.randn(1, 3, 8) for _ in range(2)], torch.randn(2, 8, 1)


def test_backends_reports_every_backend_with_a_reason():
    status = pykernels.backends()
    assert tuple(status) == B.BACKENDS
    assert status["reference"].available
    for s in status.values():
        assert s.reason, f"{s.name} has no explanation"


def test_default_for_cpu_tensors_is_the_cpu_kernel_when_built():
    expected = "cpu" if pykernels.backends()["cpu"].available else "reference"
    assert B.select("probe_scores", torch.device("cpu"), ("reference", "cpu", "triton")) == expected


def test_default_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.select("probe_scores", torch.device("cpu"), ("reference", "triton")) == "reference"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(B.ENV_VAR, "reference")
    assert B.select("probe_scores", torch.device("cpu"), ("reference", "cpu")) == "reference"


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(B.ENV_VAR, "cpu")
    assert B.select("probe_scores", torch.device("cpu"), ("reference", "cpu"), "reference") == "reference"


def test_unknown_backend_name():
    hs, w = _small()
    with pytest.raises(ValueError, match=r"backend must be one of .*'gpu'"):
        pykernels.probe_scores(hs, w, backend="gpu")


def test_unimplemented_backend_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="has no 'triton' backend"):
        B.select("some_op", torch.device("cpu"), ("reference", "cpu"), "triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_forced_cuda_without_gpu_says_why():
    hs, w = _small()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*"):
        pykernels.probe_scores(hs, w, backend="cuda")


def test_cpu_backend_refuses_tensors_of_another_device():
    if not pykernels.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    with pytest.raises(ValueError, match="cannot run on meta tensors"):
        B.select("probe_scores", torch.device("meta"), ("reference", "cpu"), "cpu")


def test_extension_state_is_reported():
    from pykernels import _ops

    if _ops.LOADED:
        assert _ops.has_kernel("probe_scores", "CPU")
        assert _ops.cpu_isa() in ("avx512", "avx2", "scalar")
    else:
        assert "not loaded" in pykernels.backends()["cpu"].reason


def test_import_pulls_in_neither_dynamo_nor_triton():
    # Importing pykernels stays cheap, and TRITON_INTERPRET may still be set after it.
    import subprocess
    import sys

    code = "import sys, pykernels; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(B.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"PYKERNELS_BACKEND must be one of .*got 'gpu'"):
        B.select("probe_scores", torch.device("cpu"), ("reference", "cpu"))
