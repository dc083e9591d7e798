"""The CPU PARC kernel's scratch is bounded across its worker threads: 16 M bytes per model
(M = N(N-1)/2), so models run in parallel only while their scratch fits the budget
(PYKERNELS_CPU_SCRATCH_BYTES, default 2 GiB). Measured as the peak RSS of a fresh process."""

import os
import subprocess
import sys

import pytest

import pykernels

SCRIPT = """
import resource, sys, torch, pykernels
torch.set_num_threads(2)
x = torch.randn(int(sys.argv[1]), 3000, 8, dtype=torch.float64)
classes = torch.arange(3000) % 5
pykernels.parc_spearman(x[:1], torch.arange(3000) % 5, backend="cpu")  # warm-up: allocator, pool
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pykernels.parc_spearman(x, classes, backend="cpu")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def _peak_bytes(models, budget):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(models)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYKERNELS_CPU_SCRATCH_BYTES": str(budget)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not pykernels.backends()["cpu"].available, reason="cpu backend unavailable")
def test_parc_scratch_of_all_threads_stays_within_the_budget():
    per_model = 16 * (3000 * 2999 // 2)  # 72 MB
    # The warm-up already peaked at one model's scratch; with a budget of one model, two models
    # on two threads must not add a second model's worth (they did: one scratch per thread).
    grown = _peak_bytes(models=4, budget=per_model + 2**20)
    assert grown < per_model / 2, f"peak grew by {grown / 1e6:.0f} MB over one model's {per_model / 1e6:.0f} MB"
