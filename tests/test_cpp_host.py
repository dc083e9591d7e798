"""The operator library CMake builds for C++ hosts (-DPYKERNELS_TORCH_OPS=ON)
registers the same ops and computes the same numbers, without pykernels' Python.

./dev.sh test builds it and points PYKERNELS_CPP_HOST_LIBRARY at it."""

import os
import subprocess
import sys

import pytest

LIBRARY = os.environ.get("PYKERNELS_CPP_HOST_LIBRARY")

SCRIPT = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
g = torch.Generator().manual_seed(0)
layers = [torch.randn(2, 9, 24, generator=g) for _ in range(3)]
w, b = torch.randn(3, 24, 2, generator=g), torch.randn(2, generator=g)
out = torch.ops.pykernels.probe_scores(layers, w, b, None, "none", 1, 1.0)
expect = sum(h.double() @ w[l].double() for l, h in enumerate(layers)) + b.double()
err = (out.double() - expect).abs().max().item()
print(torch.ops.pykernels.cpu_isa(), err)
sys.exit(0 if err < 1e-4 else 1)
"""


@pytest.mark.skipif(not LIBRARY, reason="PYKERNELS_CPP_HOST_LIBRARY not set (./dev.sh test builds it)")
def test_cpp_host_library_registers_and_computes():
    assert os.path.exists(LIBRARY), LIBRARY
    # A fresh interpreter: pykernels._C must not be loaded alongside (same op names).
    run = subprocess.run([sys.executable, "-c", SCRIPT, LIBRARY], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
