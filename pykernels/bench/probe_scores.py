"""probe_scores against what a user would write without pykernels.

Baselines (float32 [B, T, K] scores, SWiM window 16):
  naive    torch.stack of the layers, one einsum, cumsum smoothing
  careful  one matmul per layer accumulated in float32 (no stacked copy), cumsum
           smoothing; for bfloat16 layers each layer's matmul runs (and rounds) in
           bfloat16, the fast choice a practical user makes
  compile  torch.compile of the careful version (GPU, or full CPU runs)
The op is memory-bound: % bw compares its read rate with a large tensor.sum().
"""

from __future__ import annotations

import torch

import pykernels
from pykernels.bench._core import BenchContext, Case

WINDOW = 16


def _swim_cumsum(z: torch.Tensor, window: int) -> torch.Tensor:
    # The fast plain-PyTorch smoothing (a running sum; NaN-unsafe, fine for a baseline).
    c = torch.cumsum(z, dim=1)
    shifted = torch.nn.functional.pad(c, (0, 0, window, 0))[:, : z.shape[1]]
    counts = torch.arange(1, z.shape[1] + 1, device=z.device).clamp(max=window).to(z.dtype)
    return (c - shifted) / counts[None, :, None]


def naive(layers, w):
    z = torch.einsum("lbth,lhk->btk", torch.stack(layers).float(), w)
    return _swim_cumsum(z, WINDOW)


def careful(layers, w):
    B, T, H = layers[0].shape
    acc = torch.zeros(B * T, w.shape[2], device=w.device)
    for l, h in enumerate(layers):
        h2 = h.reshape(B * T, H)
        if h.dtype == torch.float32:
            acc.addmm_(h2, w[l])
        else:  # low-precision matmul, float32 accumulation across layers
            acc += torch.mm(h2, w[l].to(h.dtype)).float()
    return _swim_cumsum(acc.reshape(B, T, -1), WINDOW)


def _shapes(ctx: BenchContext):
    tokens = 1024 if ctx.quick else 4096
    if ctx.is_cuda:
        # The GPU target shape: 4096 tokens x 32 layers x 4096 hidden, bf16.
        yield 32, 4096, 4, tokens // 4, 1, torch.bfloat16
        yield 32, 4096, 4, tokens // 4, 4, torch.bfloat16
    for K in (1, 4):
        for dtype in (torch.float32, torch.bfloat16):
            yield 32, 1024, 4, tokens // 4, K, dtype
    yield 32, 1024, 16, 1, 1, torch.bfloat16  # one decode step of 16 sequences


def _case(ctx: BenchContext, ours: list[str], L: int, H: int, B: int, T: int, K: int, dtype) -> Case:
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(B, T, H, generator=g).to(ctx.device, dtype) for _ in range(L)]
    w = (torch.randn(L, H, K, generator=g) / (L * H) ** 0.5).to(ctx.device)
    impls = {
        b: (lambda b=b: pykernels.probe_scores(layers, w, smoothing="swim", window=WINDOW, backend=b)) for b in ours
    }
    nbytes = L * B * T * H * layers[0].element_size()
    baselines = {"careful": lambda: careful(layers, w)}
    if B * T > 16:
        baselines["naive"] = lambda: naive(layers, w)
    if ctx.is_cuda or not ctx.quick:
        compiled = torch.compile(careful)
        baselines["compile"] = lambda: compiled(layers, w)
    return Case(
        op="probe_scores",
        shape=f"L={L} H={H} B={B} T={T} K={K}",
        dtype=str(dtype).replace("torch.", ""),
        implementations=impls,
        baselines=baselines,
        # GB/s and % bw only where the activations exceed the caches (a decode step does not).
        bytes_read=nbytes if nbytes >= 64 * 2**20 else None,
        notes="layers given as a list of [B, T, H] tensors; SWiM window 16; x = baseline time / our time",
    )


# The tables this suite fills (the runner skips the suite when --ops names none of them).
OPS = ("probe_scores",)


def cases(ctx: BenchContext) -> list[Case]:
    status = pykernels.backends()
    ours = [b for b in (["cuda", "triton"] if ctx.is_cuda else ["cpu"]) if status[b].available]
    return [_case(ctx, ours, *shape) for shape in _shapes(ctx)]
