"""Distribution: the torch-mismatch guard around the compiled library, the version,
and the extras as declared. The built wheel itself, and what its extras resolve to,
are checked by scripts/wheel_smoke.py (./dev.sh wheel-check)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import pykernels
from pykernels import _ops
from pykernels.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_with_fake_build(built_for: str, extra: str = "") -> dict:
    """Imports pykernels in a fresh interpreter whose _build_info claims the library was
    built for torch `built_for` (the version check is faked; torch is the real one)."""
    code = textwrap.dedent(f"""
        import json, sys, types, warnings
        import torch
        info = types.ModuleType("pykernels._build_info")
        info.TORCH_VERSION = {built_for!r}
        sys.modules["pykernels._build_info"] = info
        {extra}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the guard itself must warn only once
            import pykernels
            import pykernels.selection, pykernels.flatness
            layers, weight = [torch.randn(2, 9, 8)], torch.randn(1, 8, 2)
            scores = pykernels.probe_scores(layers, weight)
            reference = pykernels.probe_scores(layers, weight, backend="reference")
            status = pykernels.backends()["cpu"]
        from pykernels import _ops
        try:
            torch.ops.pykernels.probe_scores
            registered = True
        except (AttributeError, RuntimeError):
            registered = False
        print(json.dumps({{
            "warnings": [str(w.message) for w in caught if issubclass(w.category, pykernels.ExtensionWarning)],
            "served_reference": torch.equal(scores, reference), "loaded": _ops.LOADED, "registered": registered,
            "cpu_available": status.available, "cpu_reason": status.reason,
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_mismatched_torch_warns_once_naming_both_versions_and_serves_the_reference():
    running = torch.__version__
    result = _import_with_fake_build("2.12.0+cpu")
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert f"built for torch 2.12.0+cpu, but torch {running} is installed" in message
    assert "pip install torch==2.12.0" in message  # what to do: the torch it needs...
    assert "pip install --no-build-isolation ." in message  # ...or a build for yours
    assert not result["loaded"] and not result["registered"]  # the library is not even loaded
    assert result["served_reference"]
    assert not result["cpu_available"]
    assert (
        result["cpu_reason"] == f"compiled extension not loaded (built for torch 2.12.0+cpu, running torch {running})"
    )


def test_built_library_that_fails_to_load_warns_once():
    release = torch.__version__.split("+")[0]
    # The same release with another build tag passes the version check; the load then fails.
    result = _import_with_fake_build(f"{release}+cu999", extra='sys.modules["pykernels._C"] = None')
    assert len(result["warnings"]) == 1, result["warnings"]
    assert result["warnings"][0].startswith(
        "pykernels' compiled kernels failed to load (ModuleNotFoundError: import of pykernels._C halted"
    )
    assert not result["loaded"] and result["served_reference"] and not result["cpu_available"]


@pytest.mark.parametrize(
    "built, running, compatible",
    [
        ("2.13.0+cpu", "2.13.0+cpu", True),
        ("2.13.0+cpu", "2.13.0+cu130", True),  # the local build tag does not change the CPU ABI
        ("2.13.0", "2.13.0+cpu", True),
        (None, "2.13.0", True),  # nothing was built: nothing to check
        ("2.13.0+cpu", "2.13.1+cpu", False),
        ("2.13.0+cpu", "2.14.0", False),
        ("2.14.0.dev20260101+cpu", "2.14.0+cpu", False),
    ],
)
def test_torch_mismatch_compares_releases(built, running, compatible):
    message = _ops.torch_mismatch(built, running)
    assert (message is None) == compatible
    if message is not None:
        assert f"built for torch {built}, but torch {running} is installed" in message
        assert f"pip install torch=={built.split('+')[0]}" in message


def test_version_is_semver_and_in_the_changelog(capsys):
    assert re.fullmatch(r"\d+\.\d+\.\d+", pykernels.__version__)
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## [{pykernels.__version__}]" in f.read()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    built = f"built for torch {_ops.BUILT_FOR_TORCH}" if _ops.BUILT_FOR_TORCH else "no compiled kernels built"
    assert (
        capsys.readouterr().out == f"pykernels {pykernels.__version__} ({built}; torch {torch.__version__} installed)\n"
    )


def _gpu_packages() -> re.Pattern:
    """The GPU package names the wheel check refuses in a resolved [all] (scripts/wheel_smoke.py)."""
    spec = importlib.util.spec_from_file_location("wheel_smoke", os.path.join(ROOT, "scripts", "wheel_smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPU_PACKAGES


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _requirement_names(extras: dict[str, list[str]], extra: str) -> set[str]:
    """The distributions an extra requires, following pykernels[...] self-references."""
    names = set()
    for requirement in extras[extra]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")
        if name == "pykernels":
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                names |= _requirement_names(extras, inner.strip())
        else:
            names.add(name)
    return names


def test_cpu_extras_pull_no_gpu_packages():
    extras, gpu_packages = _extras(), _gpu_packages()
    gpu_extras = {"triton", "vllm"}
    assert gpu_extras <= extras.keys()
    for extra in extras.keys() - gpu_extras:
        gpu = {n for n in _requirement_names(extras, extra) if gpu_packages.match(n)}
        assert not gpu, f"[{extra}] pulls GPU packages {gpu}"
    assert _requirement_names(extras, "vllm") == {"vllm"}


def test_all_extra_covers_every_cpu_feature():
    extras = _extras()
    everything = _requirement_names(extras, "all")
    for feature in ("hf", "selection", "flatness", "bench"):
        assert _requirement_names(extras, feature) <= everything, feature
    assert {"pyhessian", "curvlinops-for-pytorch", "transformers", "scikit-learn"} <= everything
