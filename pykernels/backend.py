"""Which implementation of an op runs.

Every op has a plain-PyTorch `reference` and any of three fast backends:
`cpu` (C++ kernel), `cuda` (CUDA C++ kernel), `triton` (Triton kernel).
The choice, in order of precedence:
  1. the op's `backend=` argument;
  2. the environment variable PYKERNELS_BACKEND;
  3. the fastest available for the tensors' device: cpu for CPU tensors,
     cuda (then triton) for CUDA tensors, else reference.
A backend asked for by name that cannot run raises an error saying why; it is
never silently replaced.

With TRITON_INTERPRET=1 set before triton is imported, the triton backend runs
on CPU tensors through Triton's interpreter (slow: for tests), and only when asked
for by name.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterable

import torch

from . import _ops

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "PYKERNELS_BACKEND"

# Every op (a schema of csrc/ops/registration.cpp) and its family: the reference is
# pykernels.reference.<family>.<op>, the Triton twin pykernels.triton.<family>.<triton_name(op)>,
# the compiled op torch.ops.pykernels.<op>; its fake / autograd rules are _ops.RULES[op].
# (cpu_isa, the one schema that is not an op on tensors, is not here.)
OP_FAMILY = {
    "probe_scores": "probe_scores",
    "probe_accumulate_": "probe_guard",
    "probe_stream_step": "probe_guard",
    "probe_stream_step_varlen": "probe_guard",
    "softmax_weighted_bce_fwd": "probe_guard",
    "energy": "flatness",
    "logsumexp_hvp": "flatness",
    "fill_probes_": "flatness",
    "probe_dots": "flatness",
    "curvature_step_": "flatness",
    "pairwise_corr_distance": "parc",
    "spearman": "parc",
    "parc_spearman": "parc",
}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or what it runs on

    def __str__(self) -> str:
        return f"{self.name:<9} {'yes' if self.available else 'no ':<3}  {self.reason}"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs
        return f"importing triton failed: {exc}"
    return None


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True, "plain PyTorch, any device")
    if name == "cpu":
        if not _ops.LOADED:
            return BackendStatus(name, False, f"compiled extension not loaded ({_ops.LOAD_ERROR})")
        return BackendStatus(name, True, f"C++ kernels, {_ops.cpu_isa()} SIMD, {torch.get_num_threads()} threads")
    if name == "cuda":
        if not _ops.LOADED:
            return BackendStatus(name, False, f"compiled extension not loaded ({_ops.LOAD_ERROR})")
        if not _ops.has_kernel("probe_scores", "CUDA"):
            return BackendStatus(name, False, "extension built without CUDA (see setup.py)")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "CUDA kernels built, but no CUDA device is visible")
        missing = _missing_kernel_image()
        if missing:
            return BackendStatus(name, False, missing)
        return BackendStatus(name, True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    if name == "triton":
        err = _triton_import_error()
        if err:
            return BackendStatus(name, False, err)
        if torch.cuda.is_available():
            return BackendStatus(name, True, "Triton kernels on the GPU")
        if triton_interpreted():
            return BackendStatus(name, True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow)")
        return BackendStatus(name, False, "no GPU, and TRITON_INTERPRET=1 is not set")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _launch_a_cuda_kernel() -> None:
    # A missing kernel image fails the launch itself (checked right after it): no sync needed.
    torch.ops.pykernels.energy(torch.zeros(1, 1, device="cuda"))


@functools.cache
def _missing_kernel_image() -> str | None:
    """Why the CUDA kernels cannot run on the current GPU (no kernel image for its architecture
    in this build), or None. Found by launching one tiny kernel, once per process (not while a
    CUDA graph is being captured, where a stray launch would join the graph)."""
    if torch.cuda.is_current_stream_capturing():
        return None
    try:
        _launch_a_cuda_kernel()
    except RuntimeError as exc:
        if "no kernel image" not in str(exc):
            raise
        major, minor = torch.cuda.get_device_capability()
        return (
            f"the extension has no kernel image for {torch.cuda.get_device_name()} (sm_{major}{minor}); "
            f'rebuild with TORCH_CUDA_ARCH_LIST="{major}.{minor}" (see setup.py)'
        )
    return None


def backends() -> dict[str, BackendStatus]:
    """Every backend, whether it can run here, and why (not)."""
    return {name: _status(name) for name in BACKENDS}


def _op_has_kernel(op: str, name: str) -> bool:
    """Compiled backends: is pykernels::<op> registered for that dispatch key?"""
    if name in ("cpu", "cuda"):
        return _ops.has_kernel(op, name.upper())
    return True


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def select(op: str, device: torch.device, implemented: Iterable[str], requested: str | None = None) -> str:
    """The backend `op` runs with for tensors on `device` (see the module docstring).

    Memoised on everything it reads that can change while a program runs (the
    request, PYKERNELS_BACKEND, TRITON_INTERPRET), so hot paths can call it per
    call. Under torch.compile the choice is made once, while tracing, and baked
    into the compiled graph.
    """
    return _select(op, device.type, tuple(implemented), _requested(requested), triton_interpreted())


def _requested(requested: str | None) -> str | None:
    """The backend asked for: the argument, else $PYKERNELS_BACKEND (checked), else None."""
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        if requested is not None and requested not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {requested!r}")
    return requested


# What torch.compiler.assume_constant_result(select) does, without importing
# torch._dynamo (and with it Triton) at `import pykernels`: seconds saved, and
# TRITON_INTERPRET can still be set after importing pykernels.
select._dynamo_marked_constant = True


@functools.cache
def _select(op: str, device_type: str, implemented: tuple[str, ...], requested: str | None, interpreted: bool) -> str:
    device = torch.device(device_type)
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
        if requested not in implemented:
            raise ValueError(f"{op} has no {requested!r} backend; it has {implemented}")
        status = _status(requested)
        if not status.available:
            raise RuntimeError(f"{op}: backend {requested!r} is not available: {status.reason}")
        if not _op_has_kernel(op, requested):
            raise RuntimeError(f"{op}: the compiled extension has no {requested} kernel for it (rebuild?)")
        if not _runs_on(requested, device):
            raise ValueError(f"{op}: backend {requested!r} cannot run on {device.type} tensors")
        return requested
    preference = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in preference:
        status = _status(name)
        if name in implemented and status.available and _runs_on(name, device) and _op_has_kernel(op, name):
            return name
        if name == "cuda" and name in implemented and _ops.has_kernel(op, "CUDA") and torch.cuda.is_available():
            _warn_once(
                f"pykernels: the cuda backend cannot run: {status.reason}; using the next available "
                f"backend (a forced backend='cuda' raises)"
            )
    return "reference"


def resolve(op: str, device: torch.device, requested: str | None = None):
    """The callable that runs `op` (a key of OP_FAMILY) for tensors on `device`, chosen as
    `select` chooses (same precedence, same errors): the reference function, the Triton
    op (its module imported now, on first use) or torch.ops.pykernels.<op>. All take the
    schema's arguments. Cheap enough to call per call: one memoised lookup. Under
    torch.compile the choice is made once, while tracing (`select` is a traced
    constant), and the op it returns is baked into the graph."""
    if torch.compiler.is_compiling():  # Dynamo traces through lru_cache wrappers only with a warning
        return op_callable(op, select(_known(op), device, BACKENDS, requested))
    return _resolve(op, device.type, _requested(requested), triton_interpreted())


@functools.cache
def _resolve(op: str, device_type: str, requested: str | None, interpreted: bool):
    return op_callable(op, _select(_known(op), device_type, BACKENDS, requested, interpreted))


def _known(op: str) -> str:
    if op not in OP_FAMILY:
        raise ValueError(f"unknown op {op!r}; the ops are {tuple(OP_FAMILY)}")
    return op


def op_callable(op: str, backend: str):
    """The callable of `op` on a backend already chosen (by `select`): no availability checks."""
    _known(op)
    # Import statements, not importlib: Dynamo traces them.
    if backend == "reference":
        from . import reference as modules
    elif backend == "triton":
        from . import triton as modules  # imports every Triton family, and Triton, on first use
    else:
        return getattr(torch.ops.pykernels, op).default
    name = _ops.triton_name(op) if backend == "triton" else op
    return getattr(getattr(modules, OP_FAMILY[op]), name)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)
