"""Shared test setup.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before triton is first imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests import sanitized_ops  # noqa: E402

sanitized_ops.load()  # ./dev.sh sanitize: the ASan/UBSan build stands in for pykernels._C

import pykernels  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    # A PYKERNELS_BACKEND from the caller's shell must not redirect the tests.
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    yield


def pytest_sessionstart(session):
    # CI names the backends that must run (PYKERNELS_REQUIRE_BACKENDS="cpu triton"),
    # so a broken build fails loudly instead of turning into skipped tests.
    required = os.environ.get("PYKERNELS_REQUIRE_BACKENDS", "").split()
    status = pykernels.backends()
    missing = [f"{n}: {status[n].reason}" for n in required if not status[n].available]
    if missing:
        raise pytest.UsageError("required backends unavailable: " + "; ".join(missing))


_XDIST_WORKER = False


def pytest_configure(config):
    global _XDIST_WORKER
    _XDIST_WORKER = hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    # benchmarks/gpu_check.sh sets PYKERNELS_FAILURE_LOG: each failure's id and last error line are
    # appended as it happens (pytest's own summary comes only at the end, lost if a time limit or a
    # crash ends the run first). Under pytest-xdist the controller writes (it sees every report).
    path = os.environ.get("PYKERNELS_FAILURE_LOG")
    if path and report.failed and not _XDIST_WORKER:
        lines = [line for line in str(report.longrepr).splitlines() if line.startswith("E ")] or [""]
        with open(path, "a") as f:
            f.write(f"{report.nodeid} ({report.when}): {lines[-1][2:].strip()[:300]}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # benchmarks/gpu_check.sh sets PYKERNELS_NO_GPU_SKIPS=1 on a GPU machine: there a skipped test
    # that needs the GPU (marked cuda) means a check silently did not run, so it fails instead.
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("PYKERNELS_NO_GPU_SKIPS") == "1" and item.get_closest_marker("cuda"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a GPU test was skipped on a GPU machine (PYKERNELS_NO_GPU_SKIPS=1): {reason}"
