"""Checks on the test suite itself: a missing optional package skips only the tests that use it,
and on a GPU machine (PYKERNELS_NO_GPU_SKIPS=1, benchmarks/gpu_check.sh) a skipped GPU test fails."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest(args, env=None, block=()):
    """pytest in a fresh interpreter, with the modules in `block` made unimportable."""
    code = (
        "import sys\n"
        f"for name in {list(block)!r}: sys.modules[name] = None\n"
        "import pytest\n"
        f"raise SystemExit(pytest.main({list(args)!r} + ['-q', '-p', 'no:cacheprovider']))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_kernel_tests_run_without_scipy():
    out = _pytest(
        ["tests/selection/test_correlation_ops.py", "-k", "cpu and distances_match_reference or by_hand"],
        block=("scipy", "scipy.stats"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " skipped" not in out.stdout, out.stdout[-3000:]


def test_a_skipped_gpu_test_fails_where_gpu_skips_are_refused():
    args = [
        "tests/selection/test_correlation_ops.py",
        "-k",
        "cuda and test_distances_match_reference and full and float64",
    ]
    plain = _pytest(args, env={"PYKERNELS_NO_GPU_SKIPS": "0"})
    if "1 skipped" not in plain.stdout:  # a machine with a GPU runs the test: nothing to check here
        assert plain.returncode == 0, plain.stdout[-3000:]
        return
    refused = _pytest(args, env={"PYKERNELS_NO_GPU_SKIPS": "1"})
    assert refused.returncode == 1, refused.stdout[-3000:]
    assert "a GPU test was skipped on a GPU machine" in refused.stdout, refused.stdout[-3000:]
