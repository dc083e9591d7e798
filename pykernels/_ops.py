"""Loads the compiled operator library and registers what PyTorch needs around it.

The schemas live in C++ (csrc/ops/registration.cpp). Here: fake kernels so the
ops trace under torch.compile / torch.export. Importing this module never
fails: without the extension, `LOAD_ERROR` says why and the reference
backend serves every op.
"""

from __future__ import annotations

import torch

LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.pykernels.*)
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

LOADED = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether pykernels::<op> has a kernel registered for `dispatch_key` ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::{op}", dispatch_key)


def cpu_isa() -> str | None:
    """The SIMD build the CPU kernels run ("avx512", "avx2", "scalar"), or None without _C."""
    return torch.ops.pykernels.cpu_isa() if LOADED else None


if LOADED:

    @torch.library.register_fake("pykernels::probe_scores")
    def _probe_scores_fake(hidden_states, weight, bias, lengths, smoothing, window, ema_alpha):
        h0 = hidden_states[0]
        return h0.new_empty((h0.shape[0], h0.shape[1], weight.shape[2]), dtype=torch.float32)
