"""Flatness estimators and kernels against what a user would run without pykernels.

flatness_hutchinson  tr H of log p for a batch, S = 32 Rademacher probes, on the
    digits-sized ReLU CNN of examples/digits_flatness.py (float32). Baseline: the
    PyHessian-style loop (the gradient once with create_graph, then one double
    backward per probe), on the same probes. Ours: hessian_trace batched over probes,
    hvp="auto" (for this ReLU net: Jv by forward mode + the fused logit-space step,
    exact for piecewise-linear nets) and hvp="forward-over-reverse" (any net).
flatness_hvp  one Hessian-vector product for a batch against one input gradient
    of log p (the baseline): "x vs gradient" = gradient time / HVP time, so an HVP
    costs 1 / x gradients (the issue's target: <= 4 gradients in eager mode).
flatness_hvp_compiled  the same pair, each under torch.compile (the energy in its
    reference form, which Inductor fuses; our ops have no forward-mode rule there).
energy / logsumexp_hvp / fill_probes / probe_dots  the kernels against plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

import pykernels
from pykernels import flatness
from pykernels.bench._core import BenchContext, Case
from pykernels.flatness.hvp import InputHessian, prepared


def digits_cnn() -> nn.Module:
    """The small CNN of the digits example (1 x 8 x 8 inputs, 10 classes)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()


def pyhessian_loop(model: nn.Module, x: torch.Tensor, probes: torch.Tensor):
    """Hutchinson as PyHessian computes it: one double backward per probe."""
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(torch.logsumexp(model(x), -1).sum(), x, create_graph=True)
    quads = []
    for v in probes:
        (hv,) = torch.autograd.grad(g, x, v, retain_graph=True)
        quads.append((hv * v).flatten(1).sum(1))
    q = torch.stack(quads)
    return q.mean(0), q.std(0) / q.shape[0] ** 0.5


def _hutchinson_case(ctx: BenchContext, B: int) -> Case:
    S = 32
    model = digits_cnn().to(ctx.device)
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    V = pykernels.probe_vectors((S, *x.shape), seed=0, device=ctx.device)
    loop = pyhessian_loop(model, x, V)
    ours = flatness.hessian_trace(model, x, S, seed=0)
    if not torch.allclose(ours.value, loop[0], rtol=1e-3, atol=1e-6):  # same probes, same estimate
        raise AssertionError(f"hutchinson estimates differ: {ours.value[:4]} vs {loop[0][:4]}")
    return Case(
        op="flatness_hutchinson", shape=f"digits CNN B={B} S={S}", dtype="float32",
        implementations={
            "batched auto (Gauss-Newton)": lambda: flatness.hessian_trace(model, x, S, seed=0),
            "batched forward-over-reverse": lambda: flatness.hessian_trace(model, x, S, seed=0,
                                                                           hvp="forward-over-reverse"),
        },
        baselines={"pyhessian loop": lambda: pyhessian_loop(model, x, V)},
        notes="same probes, estimates checked equal before timing; x = loop time / our time",
    )


def _gradient_fn(model, backend=None):
    def gradient(x):
        return torch.func.grad(lambda t: (-flatness.energy(model(t), backend=backend)).sum())(x)

    return gradient


def _hvp_case(ctx: BenchContext, B: int) -> Case:
    model = digits_cnn().to(ctx.device)
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(2)).to(ctx.device)
    v = torch.randn(1, B, 64, generator=torch.Generator().manual_seed(3)).to(ctx.device)
    operators = {}
    with prepared(model, x):
        for method in ("forward-over-reverse", "double-backward", "gauss-newton"):
            operators[method] = InputHessian(model, x, method=method)

    def run(method):
        with prepared(model, x):
            return operators[method].matvec(v)

    gradient = _gradient_fn(model)

    def frozen_gradient():
        with prepared(model, x):
            return gradient(x)

    return Case(
        op="flatness_hvp", shape=f"digits CNN B={B}", dtype="float32",
        implementations={f"hvp {m}": (lambda m=m: run(m)) for m in operators}
        | {"hvp() call, auto": lambda: flatness.hvp(model, x, v.reshape(1, *x.shape))},
        baselines={"gradient": frozen_gradient},
        notes="one HVP costs 1/x gradients (x < 1 here); 'hvp() call' includes checking the model (2 forwards)",
    )


def _hvp_compiled_case(ctx: BenchContext, B: int) -> Case:
    model = digits_cnn().to(ctx.device)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(2)).to(ctx.device)
    v = torch.randn_like(x)
    gradient = _gradient_fn(model, backend="reference")
    hvp = lambda x, v: torch.func.jvp(gradient, (x,), (v,))[1]
    compiled_gradient, compiled_hvp = torch.compile(gradient), torch.compile(hvp)
    return Case(
        op="flatness_hvp_compiled", shape=f"digits CNN B={B}", dtype="float32",
        implementations={"hvp forward-over-reverse, compiled": lambda: compiled_hvp(x, v)},
        baselines={"gradient, compiled": lambda: compiled_gradient(x), "gradient, eager": lambda: gradient(x)},
        notes="torch.compile of jvp(grad(log p)) and of grad(log p); one HVP costs 1/x gradients",
    )


def _kernel_cases(ctx: BenchContext, ours: list[str]) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    dev = ctx.device
    big = not ctx.quick
    cases = []
    B, K = (4096, 1000) if big else (1024, 1000)
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(B, K, generator=g).to(dev, dtype)
        cases.append(Case(
            op="energy", shape=f"B={B} K={K}", dtype=str(dtype).replace("torch.", ""),
            implementations={b: (lambda b=b: pykernels.energy(z, backend=b)) for b in ours},
            baselines={"torch.logsumexp": lambda z=z: -torch.logsumexp(z, -1)},
            bytes_read=z.numel() * z.element_size(),
        ))
    S, B, K = (32, 512, 1000) if big else (32, 128, 1000)
    z, U = torch.randn(B, K, generator=g).to(dev), torch.randn(S, B, K, generator=g).to(dev)

    def plain_lse_hvp():
        s = torch.softmax(z, -1)
        return s, -torch.logsumexp(z, -1), s * (U - (s * U).sum(-1, keepdim=True))

    cases.append(Case(
        op="logsumexp_hvp", shape=f"S={S} B={B} K={K}", dtype="float32",
        implementations={b: (lambda b=b: pykernels.logsumexp_hvp(z, U, backend=b)) for b in ours},
        baselines={"plain torch": plain_lse_hvp},
        bytes_read=(z.numel() + U.numel()) * 4,
        notes="bytes: logits and tangents read once (the outputs add as much again in writes)",
    ))
    shape = (32, 64, 3 * 32 * 32) if big else (32, 16, 3 * 32 * 32)
    out = torch.empty(shape, device=dev)
    cases.append(Case(
        op="fill_probes", shape="x".join(map(str, shape)), dtype="float32 rademacher",
        implementations={b: (lambda b=b: pykernels.fill_probes_(out, 1, backend=b)) for b in ours},
        baselines={"torch.randint*2-1": lambda: torch.randint(0, 2, shape, device=dev, dtype=torch.float32) * 2 - 1},
    ))
    v, w = torch.randn(shape, generator=g).to(dev), torch.randn(shape, generator=g).to(dev)
    cases.append(Case(
        op="probe_dots", shape="x".join(map(str, shape)), dtype="float32",
        implementations={b: (lambda b=b: pykernels.probe_dots(v, w, backend=b)) for b in ours},
        baselines={"(v*w).sum": lambda: (v * w).sum(-1), "einsum": lambda: torch.einsum("sbd,sbd->sb", v, w)},
        bytes_read=2 * v.numel() * 4,
    ))
    return cases


# The tables this suite fills (the runner skips the suite when --ops names none of them).
OPS = ("flatness_hutchinson", "flatness_hvp", "flatness_hvp_compiled", "energy", "logsumexp_hvp", "fill_probes", "probe_dots")


def cases(ctx: BenchContext) -> list[Case]:
    status = pykernels.backends()
    ours = [b for b in (["cuda", "triton"] if ctx.is_cuda else ["cpu"]) if status[b].available]
    batches = (16,) if ctx.quick else (16, 64)
    out = [_hutchinson_case(ctx, B) for B in batches]
    out += [_hvp_case(ctx, B) for B in batches]
    if not ctx.quick or ctx.is_cuda:
        out += [_hvp_compiled_case(ctx, B) for B in batches]
    return out + _kernel_cases(ctx, ours)
