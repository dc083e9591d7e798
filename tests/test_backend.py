"""Backend selection: defaults, PYKERNELS_BACKEND, explicit choices and the
errors for choices that cannot run."""

import warnings

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


def test_resolve_returns_the_chosen_backends_callable(monkeypatch):
    from pykernels.reference import flatness as reference

    cpu = torch.device("cpu")
    assert B.resolve("energy", cpu, "reference") is reference.energy
    monkeypatch.setenv(B.ENV_VAR, "reference")  # the same precedence as select
    assert B.resolve("energy", cpu) is reference.energy
    if pykernels.backends()["cpu"].available:
        assert B.resolve("energy", cpu, "cpu") is torch.ops.pykernels.energy.default
        monkeypatch.delenv(B.ENV_VAR)
        assert B.resolve("energy", cpu) is torch.ops.pykernels.energy.default
    if pykernels.backends()["triton"].available:
        from pykernels.triton import probe_guard

        assert B.resolve("probe_accumulate_", cpu, "triton") is probe_guard.probe_accumulate_triton_


def test_resolve_raises_what_select_raises(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        B.resolve("no_such_op", cpu)
    with pytest.raises(ValueError, match=r"backend must be one of .*'gpu'"):
        B.resolve("energy", cpu, "gpu")
    monkeypatch.setenv(B.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=f"{B.ENV_VAR} must be one of"):
        B.resolve("energy", cpu)
    monkeypatch.delenv(B.ENV_VAR)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="energy: backend 'cuda' is not available"):
            B.resolve("energy", cpu, "cuda")


def test_resolve_imports_no_triton_for_other_backends():
    import subprocess
    import sys

    code = (
        "import sys, torch; from pykernels import backend; "
        "[backend.resolve(op, torch.device('cpu'), name) for op in backend.OP_FAMILY "
        "for name in ('reference', 'cpu') if name == 'reference' or backend._ops.LOADED]; "
        "loaded = [m for m in sys.modules if m == 'triton' or m.startswith('pykernels.triton')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "", "TRITON_INTERPRET": "0"})


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


def _load_setup():
    """setup.py as a module, without running setup()."""
    import importlib.util
    import os
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "setup.py"
    spec = importlib.util.spec_from_file_location("pykernels_setup", path)
    module = importlib.util.module_from_spec(spec)
    os.environ["PYKERNELS_SETUP_IMPORT"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        del os.environ["PYKERNELS_SETUP_IMPORT"]
    return module


def test_cuda_arch_list_honours_the_user_and_embeds_ptx():
    arch_list = _load_setup().cuda_arch_list
    assert arch_list("7.5", []) == "7.5"  # the user's, as given
    assert arch_list(None, []) == "8.0;9.0+PTX"  # PTX: newer GPUs (Blackwell) JIT it
    assert arch_list("", [(7, 5)]) == "7.5;8.0;9.0+PTX"  # a visible T4 gets its own image
    assert arch_list(None, [(12, 0), (8, 0)]) == "8.0;9.0;12.0+PTX"


def test_a_gpu_without_a_kernel_image_is_reported_and_skipped_by_the_default(monkeypatch):
    # Compile-checked here (no GPU): a GPU whose architecture the build lacks makes the cuda
    # backend unavailable with the reason, the default moves on with one warning, a forced
    # cuda raises.
    backend = B

    def no_image():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(backend, "_launch_a_cuda_kernel", no_image)
    monkeypatch.setattr(backend._ops, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(backend, "_triton_import_error", lambda: None)
    for cached in (backend._select, backend._resolve, backend._missing_kernel_image, backend._warn_once):
        cached.cache_clear()
    try:
        status = pykernels.backends()["cuda"]
        assert not status.available
        assert "no kernel image for Tesla T4 (sm_75)" in status.reason and 'TORCH_CUDA_ARCH_LIST="7.5"' in status.reason
        cuda = torch.device("cuda")
        with pytest.warns(RuntimeWarning, match="the cuda backend cannot run: .*no kernel image"):
            assert backend.select("energy", cuda, ("reference", "cuda", "triton")) == "triton"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process
            assert backend.select("spearman", cuda, ("reference", "cuda", "triton")) == "triton"
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*no kernel image"):
            backend.select("energy", cuda, ("reference", "cuda", "triton"), "cuda")
    finally:
        for cached in (backend._select, backend._resolve, backend._missing_kernel_image, backend._warn_once):
            cached.cache_clear()
