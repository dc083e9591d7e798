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

    # Model selection (docs: pykernels/selection/correlation.py).
    @torch.library.register_fake("pykernels::pairwise_corr_distance")
    def _pairwise_corr_distance_fake(features, triu):
        B, N = features.shape[0], features.shape[1]
        return features.new_empty((B, N * (N - 1) // 2) if triu else (B, N, N))

    @torch.library.register_fake("pykernels::spearman")
    def _spearman_fake(x, y):
        return x.new_empty((x.shape[0],), dtype=torch.float64)

    @torch.library.register_fake("pykernels::parc_spearman")
    def _parc_spearman_fake(features, classes):
        return features.new_empty((features.shape[0],), dtype=torch.float64)

    from .reference.parc import register_distance_autograd

    register_distance_autograd("pykernels::pairwise_corr_distance")
