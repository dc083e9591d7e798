"""Flatness estimators and kernels against what a user would run without pykernels.

Network families (float32, eval mode, frozen weights; `families()`): the digits-sized ReLU
CNN of examples/digits_flatness.py (piecewise linear) and smooth ones: GELU / tanh /
softplus MLPs, a GELU CNN, a small SiLU ResNet with BatchNorm in eval mode, a pre-norm
attention block (nn.MultiheadAttention, LayerNorm, GELU MLP).

flatness_trace  Hutchinson tr H of log p, B = 64 examples, S = 32 Rademacher probes.
    Baselines: the torch.func version a careful user writes (vmap over probes and examples
    of jvp(grad(log p)) per example, then the mean of v . Hv) and the PyHessian-style loop
    (the gradient once with create_graph, one double backward per probe). Same probes,
    estimates checked equal before timing. Ours: hessian_trace, hvp="auto".
flatness_hutchpp / flatness_top_eig  Hutch++ (S = 32) and the top eigenvalue (Lanczos,
    30 steps): the same estimator code on the torch.func operator (baseline) and on ours.
flatness_hvp  one HVP per example against one plain input gradient (a repeated product on an
    operator built once, whose double backward keeps its gradient graph, and the one-shot call),
    torch.autograd.grad(torch.logsumexp(model(x), -1).sum(), x) (the baseline): "x vs
    gradient" = gradient time / HVP time, so an HVP costs 1 / x gradients. Ours: the
    operator built once (InputHessian(model, x).matvec, each method), and the one-shot
    flatness.hvp(...) call (validation and the piecewise-linear check included).
flatness_parameter_trace  tr of the parameter Hessian of the cross-entropy (S = 32):
    parameter_hessian_trace against PyHessian's hessian(...).trace() and curvlinops'
    HessianLinearOperator + hutchinson_trace, when those are installed (bench extras, never
    a dependency: `pip install pyhessian curvlinops-for-pytorch`; skipped with a note
    otherwise). Their probes are their own: agreement is printed against our standard error,
    and curvlinops is also checked on our probes exactly. PyHessian runs with tol=-inf so that
    it does all S probes (its stopping rule ends early once the running mean is negative).
    The implementation's name shows the method "auto" kept for the quadratic forms.
flatness_first_call  the same traces on a model seen for the first time (a deep copy per call,
    so nothing is cached: the piecewise check, the graph capture and the checks of "auto"
    are paid every call), against the torch.func version and PyHessian on a copy too; the
    process is warm (torch._dynamo imported: its first import costs about 1.5 s, once).
flatness_hvp_compiled  one HVP and one gradient, each under torch.compile (the energy in
    its reference form, which Inductor fuses; our ops have no forward-mode rule there).
energy / logsumexp_hvp / fill_probes / probe_dots / curvature_step
                      the kernels against plain PyTorch.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad, jvp, vmap

import pykernels
from pykernels import flatness
from pykernels.bench._core import BenchContext, Case
from pykernels.flatness import estimators as est
from pykernels.flatness.hvp import InputHessian, parameter_quad_choice, prepared, twice_differentiable


def digits_cnn(act=nn.ReLU) -> nn.Module:
    """The small CNN of the digits example (1 x 8 x 8 inputs, 10 classes)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        act(),
        nn.Conv2d(16, 32, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        act(),
        nn.Linear(64, 10),
    )


def mlp(act) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), act(), nn.Linear(256, 256), act(), nn.Linear(256, 10))


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


def resnet(channels: int = 16) -> nn.Module:
    """Stem + two SiLU basic blocks with BatchNorm (eval, non-trivial running statistics) on 3 x 16 x 16."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.SiLU(),
        _Block(channels),
        _Block(channels),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


class AttentionBlock(nn.Module):
    """A pre-norm transformer block on 16 tokens of width 32, mean-pooled, linear head."""

    def __init__(self, tokens: int = 16, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.tokens, self.width = tokens, width
        self.embed = nn.Linear(width, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], self.tokens, self.width))
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


# name -> (model factory, input shape per example)
FAMILIES = {
    "relu-cnn (piecewise linear)": (digits_cnn, (1, 8, 8)),
    "gelu-mlp": (lambda: mlp(nn.GELU), (1, 8, 8)),
    "tanh-mlp": (lambda: mlp(nn.Tanh), (1, 8, 8)),
    "softplus-mlp": (lambda: mlp(nn.Softplus), (1, 8, 8)),
    "gelu-cnn": (lambda: digits_cnn(nn.GELU), (1, 8, 8)),
    "silu-resnet-batchnorm": (resnet, (3, 16, 16)),
    "attention": (AttentionBlock, (16 * 32,)),
}
QUICK_FAMILIES = ("relu-cnn (piecewise linear)", "gelu-mlp")


def family(name: str, B: int, device):
    factory, shape = FAMILIES[name]
    model = factory().to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(B, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    return model, x


def plain_gradient(model, x):
    """The input gradient of log p as a user writes it."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(torch.logsumexp(model(x), -1).sum(), x)[0]


class TorchFuncHessian:
    """The input Hessians as a careful torch.func user writes them: jvp(grad(log p)) of one
    example, vmapped over examples and vectors (the operator interface of estimators.py)."""

    def __init__(self, model, x):
        self.x, self.batch, self.shape = x, x.shape[0], tuple(x.shape[1:])
        self.dim, self.dtype, self.device = math.prod(self.shape), x.dtype, x.device
        log_p = lambda xb: torch.logsumexp(model(xb.unsqueeze(0)), -1)[0]
        hvp_one = lambda xb, vb: jvp(grad(log_p), (xb,), (vb,))[1]
        self._hvp = vmap(vmap(hvp_one), in_dims=(None, 0))

    def matvec(self, V):
        with twice_differentiable():
            return self._hvp(self.x, V.reshape(V.shape[0], *self.x.shape)).reshape(V.shape)

    def quad(self, V):
        return (V * self.matvec(V)).sum(-1)


def torch_func_hutchinson(model, x, V):
    """The five lines: H v for every probe and example, then the mean of v . Hv (and its stderr)."""
    q = TorchFuncHessian(model, x).quad(V.flatten(2))
    return q.mean(0), q.std(0) / math.sqrt(q.shape[0])


def pyhessian_loop(model: nn.Module, x: torch.Tensor, probes: torch.Tensor):
    """Hutchinson as PyHessian computes it: one double backward per probe."""
    x = x.detach().requires_grad_()
    with torch.enable_grad(), twice_differentiable():
        (g,) = torch.autograd.grad(torch.logsumexp(model(x), -1).sum(), x, create_graph=True)
        quads = []
        for v in probes:
            (hv,) = torch.autograd.grad(g, x, v, retain_graph=True)
            quads.append((hv * v).flatten(1).sum(1))
    q = torch.stack(quads)
    return q.mean(0), q.std(0) / q.shape[0] ** 0.5


def _check_close(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().clamp(min=1e-6)
    if (ours - theirs).abs().max() > 1e-3 * scale:  # float32: same probes, same estimate
        raise AssertionError(f"{what}: estimates differ: {ours[:4].tolist()} vs {theirs[:4].tolist()}")


def _rounds(ctx: BenchContext, name: str) -> int:
    """Interleaved rounds for a flatness case: ours and the baselines alternate, so that the
    shared machine's slow phases (which moved ratios by 20-30 % between callables timed one
    after the other) hit all of them alike. Fewer on the ResNet, whose baselines take 1-3 s."""
    if ctx.quick:
        return 3
    return 5 if name.startswith("silu-resnet") else 11


def _trace_cases(ctx: BenchContext, name: str, B: int, S: int) -> list[Case]:
    model, x = family(name, B, ctx.device)
    V = pykernels.probe_vectors((S, *x.shape), seed=0, device=ctx.device)
    base = TorchFuncHessian(model, x)
    shape = f"{name} B={B} S={S}"
    ours = flatness.hessian_trace(model, x, S, seed=0)
    _check_close(f"hutchinson {name}", ours.value, torch_func_hutchinson(model, x, V)[0])
    _check_close(f"hutchinson {name} (loop)", ours.value, pyhessian_loop(model, x, V)[0])
    trace = Case(
        op="flatness_trace",
        shape=shape,
        dtype="float32",
        implementations={"hessian_trace auto": lambda: flatness.hessian_trace(model, x, S, seed=0)},
        baselines={
            "torch.func vmap(jvp(grad))": lambda: torch_func_hutchinson(model, x, V),
            "pyhessian loop": lambda: pyhessian_loop(model, x, V),
        },
        notes="same probes, estimates checked equal before timing; x = baseline time / our time",
        interleaved_rounds=_rounds(ctx, name),
    )
    _check_close(
        f"hutch++ {name}",
        flatness.hessian_trace(model, x, S, "hutch++", seed=0).value,
        est.hutch_plus_plus(base, S, 0).value,
    )
    hutchpp = Case(
        op="flatness_hutchpp",
        shape=shape,
        dtype="float32",
        implementations={"hessian_trace hutch++ auto": lambda: flatness.hessian_trace(model, x, S, "hutch++", seed=0)},
        baselines={"hutch++ on torch.func HVPs": lambda: est.hutch_plus_plus(base, S, 0)},
        notes="the same Hutch++ code on both operators, same probes, estimates checked equal",
        interleaved_rounds=_rounds(ctx, name),
    )
    top = Case(
        op="flatness_top_eig",
        shape=f"{name} B={B} Lanczos 30 steps",
        dtype="float32",
        implementations={"top_eigenvalues auto": lambda: flatness.top_eigenvalues(model, x, 1)},
        baselines={"Lanczos on torch.func HVPs": lambda: est.lanczos_eigen(base, 1, 30)},
        notes="the same Lanczos code (same start vector) on both operators",
        interleaved_rounds=_rounds(ctx, name),
    )
    return [trace, hutchpp, top]


def _hvp_case(ctx: BenchContext, name: str, B: int) -> Case:
    model, x = family(name, B, ctx.device)
    v = torch.randn(1, *x.shape, generator=torch.Generator().manual_seed(3)).to(ctx.device)
    methods = ["auto", "forward-over-reverse", "double-backward"]
    if name.startswith("relu"):
        methods.append("gauss-newton")
    with prepared(model, x):
        operators = {m: InputHessian(model, x, method=m, expected_vectors=1) for m in methods}
    chosen = operators["auto"].method

    def run(method):
        return operators[method].matvec(v.flatten(2))

    return Case(
        op="flatness_hvp",
        shape=f"{name} B={B}",
        dtype="float32",
        implementations={
            f"operator {m}" + (f" ({chosen})" if m == "auto" else ""): (lambda m=m: run(m)) for m in methods
        }
        | {"hvp() one-shot, auto": lambda: flatness.hvp(model, x, v)},
        baselines={"plain gradient": lambda: plain_gradient(model, x)},
        notes="one HVP per example costs 1/x plain gradients; 'operator': a repeated product on an operator built "
        "once (double backward keeps its gradient graph: one backward per product); 'one-shot' builds "
        "everything: the validating forward, the piecewise-linear check (cached per model and shape) and the "
        "gradient graph",
    )


def _parameter_trace_case(ctx: BenchContext, name: str, B: int, S: int) -> Case:
    model, x = family(name, B, ctx.device)
    for p in model.parameters():
        p.requires_grad_(True)
    y = torch.arange(B, device=ctx.device) % 10
    loss = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    baselines, notes = {}, []
    ours = flatness.parameter_hessian_trace(model, loss, x, y, S, seed=0)
    stderr = ours.stderr.item()
    run_ours = lambda: flatness.parameter_hessian_trace(model, loss, x, y, S)  # noqa: E731
    chosen = parameter_quad_choice(model) or "products, too few probes to time"
    if importlib.util.find_spec("pyhessian") is not None:

        def run_pyhessian():
            return pyhessian_trace(model, loss, x, y, S)

        try:
            theirs = run_pyhessian()
            notes.append(
                f"{name}: PyHessian {theirs:.4g} vs ours {ours.value.item():.4g} (our stderr {stderr:.2g}; "
                f"{abs(theirs - ours.value.item()) / stderr:.1f} stderr apart, their own probes)"
            )
            baselines["PyHessian hessian.trace()"] = run_pyhessian
        except Exception as exc:  # a library's limitation is a finding, not the end of the run
            notes.append(f"{name}: PyHessian failed on this model: {type(exc).__name__}: {str(exc)[:120]}")
    else:
        notes.append("PyHessian not installed: skipped (pip install pyhessian)")
        print("note: PyHessian not installed, its comparison is skipped (pip install pyhessian)")
    if importlib.util.find_spec("curvlinops") is not None:
        from curvlinops import HessianLinearOperator, hutchinson_trace

        def curvlinops_operator():
            return HessianLinearOperator(model, loss, params, [(x, y)], check_deterministic=False)

        def run_curvlinops():
            with twice_differentiable():
                return hutchinson_trace(curvlinops_operator(), S)

        V = pykernels.probe_vectors((S, 1, sum(p.numel() for p in params)), seed=0, device=ctx.device)
        try:
            with twice_differentiable():
                same_probes = (V[:, 0] * (curvlinops_operator() @ V[:, 0].T).T).sum(1).mean()
            own_probes = run_curvlinops().item()
        except Exception as exc:
            notes.append(f"{name}: curvlinops failed on this model: {type(exc).__name__}: {str(exc)[:120]}")
        else:
            _check_close(f"curvlinops {name}", ours.value, same_probes.reshape(1))
            notes.append(
                f"{name}: curvlinops on our probes equals ours ({same_probes.item():.4g}); its own "
                f"hutchinson_trace {own_probes:.4g}"
            )
            baselines["curvlinops HessianLinearOperator + hutchinson_trace"] = run_curvlinops
    else:
        notes.append("curvlinops not installed: skipped (pip install curvlinops-for-pytorch)")
        print("note: curvlinops not installed, its comparison is skipped (pip install curvlinops-for-pytorch)")
    if not baselines:  # nothing to compare with: time ours against the plain double-backward loop
        baselines["parameter double-backward loop"] = lambda: _parameter_loop(model, loss, x, y, params, S)
    return Case(
        op="flatness_parameter_trace",
        shape=f"{name} B={B} S={S} params={sum(p.numel() for p in params)}",
        dtype="float32",
        implementations={f"parameter_hessian_trace (auto: {chosen})": run_ours},
        baselines=baselines,
        notes="; ".join(notes),
        interleaved_rounds=_rounds(ctx, name),
    )


def pyhessian_trace(model, loss, x, y, S: int) -> float:
    """PyHessian's hessian(...).trace() with exactly S probes. tol=-inf: PyHessian 0.1 stops when
    |mean change| / (mean + 1e-6) < tol, without abs() in the divisor, so any tol >= 0 ends it
    after 2-4 probes once the running mean is negative (the GELU MLP here), which would time a
    fraction of the work."""
    from pyhessian import hessian as pyhessian_hessian

    with twice_differentiable():
        quads = pyhessian_hessian(model, loss, data=(x, y), cuda=False).trace(maxIter=S, tol=-math.inf)
    if len(quads) != S:
        raise AssertionError(f"PyHessian ran {len(quads)} probes, not {S}")
    return sum(quads) / S


def _first_call_cases(ctx: BenchContext, name: str, B: int, S: int) -> list[Case]:
    """One trace on a model never seen before (a deep copy per call), ours against the baselines on
    a copy too: what a user who measures a model once waits for."""
    model, x = family(name, B, ctx.device)
    V = pykernels.probe_vectors((S, *x.shape), seed=0, device=ctx.device)
    new = lambda: copy.deepcopy(model)  # noqa: E731

    def case(space: str, ours: Callable, baseline_name: str, baseline: Callable) -> Case:
        return Case(
            op="flatness_first_call",
            shape=f"{name} {space} B={B} S={S}",
            dtype="float32",
            implementations={f"{space}, auto, new model": ours},
            baselines={f"{baseline_name}, new model": baseline},
            notes="a deep copy per call: nothing cached (x = baseline time / our time)",
        )

    func = "torch.func vmap(jvp(grad))"
    out = [
        case(
            "hessian_trace",
            lambda: flatness.hessian_trace(new(), x, S),
            func,
            lambda: torch_func_hutchinson(new(), x, V),
        ),
        case(
            "hessian_trace hutch++",
            lambda: flatness.hessian_trace(new(), x, S, "hutch++"),
            func,
            lambda: est.hutch_plus_plus(TorchFuncHessian(new(), x), S, 0),
        ),
    ]
    for p in model.parameters():
        p.requires_grad_(True)
    y = torch.arange(B, device=ctx.device) % 10
    loss = nn.CrossEntropyLoss()
    if importlib.util.find_spec("pyhessian") is not None:
        out.append(
            case(
                "parameter_hessian_trace",
                lambda: flatness.parameter_hessian_trace(new(), loss, x, y, S),
                "PyHessian hessian.trace()",
                lambda: pyhessian_trace(new(), loss, x, y, S),
            )
        )
    return out


def _parameter_loop(model, loss, x, y, params, S):
    with torch.enable_grad():
        g = torch.autograd.grad(loss(model(x), y), params, create_graph=True)
        quads = []
        for _ in range(S):
            v = [torch.randint_like(p, 2) * 2 - 1 for p in params]
            hv = torch.autograd.grad(g, params, v, retain_graph=True)
            quads.append(sum((a * b).sum() for a, b in zip(hv, v)))
    return torch.stack(quads).mean()


def _gradient_fn(model, backend=None):
    def gradient(x):
        return torch.func.grad(lambda t: (-flatness.energy(model(t), backend=backend)).sum())(x)

    return gradient


def _hvp_compiled_case(ctx: BenchContext, B: int) -> Case:
    model = digits_cnn().to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(2)).to(ctx.device)
    v = torch.randn_like(x)
    gradient = _gradient_fn(model, backend="reference")
    hvp = lambda x, v: torch.func.jvp(gradient, (x,), (v,))[1]
    compiled_gradient, compiled_hvp = torch.compile(gradient), torch.compile(hvp)
    return Case(
        op="flatness_hvp_compiled",
        shape=f"digits CNN B={B}",
        dtype="float32",
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
        cases.append(
            Case(
                op="energy",
                shape=f"B={B} K={K}",
                dtype=str(dtype).replace("torch.", ""),
                implementations={b: (lambda b=b, z=z: pykernels.energy(z, backend=b)) for b in ours},
                baselines={"torch.logsumexp": lambda z=z: -torch.logsumexp(z, -1)},
                bytes_read=z.numel() * z.element_size(),
            )
        )
    S, B, K = (32, 512, 1000) if big else (32, 128, 1000)
    z, U = torch.randn(B, K, generator=g).to(dev), torch.randn(S, B, K, generator=g).to(dev)

    def plain_lse_hvp():
        s = torch.softmax(z, -1)
        return s, -torch.logsumexp(z, -1), s * (U - (s * U).sum(-1, keepdim=True))

    cases.append(
        Case(
            op="logsumexp_hvp",
            shape=f"S={S} B={B} K={K}",
            dtype="float32",
            implementations={b: (lambda b=b: pykernels.logsumexp_hvp(z, U, backend=b)) for b in ours},
            baselines={"plain torch": plain_lse_hvp},
            bytes_read=(z.numel() + U.numel()) * 4,
            notes="bytes: logits and tangents read once (the outputs add as much again in writes)",
        )
    )
    shape = (32, 64, 3 * 32 * 32) if big else (32, 16, 3 * 32 * 32)
    out = torch.empty(shape, device=dev)
    cases.append(
        Case(
            op="fill_probes",
            shape="x".join(map(str, shape)),
            dtype="float32 rademacher",
            implementations={b: (lambda b=b: pykernels.fill_probes_(out, 1, backend=b)) for b in ours},
            baselines={
                "torch.randint*2-1": lambda: torch.randint(0, 2, shape, device=dev, dtype=torch.float32) * 2 - 1
            },
        )
    )
    v, w = torch.randn(shape, generator=g).to(dev), torch.randn(shape, generator=g).to(dev)
    cases.append(
        Case(
            op="probe_dots",
            shape="x".join(map(str, shape)),
            dtype="float32",
            implementations={b: (lambda b=b: pykernels.probe_dots(v, w, backend=b)) for b in ours},
            baselines={"(v*w).sum": lambda: (v * w).sum(-1), "einsum": lambda: torch.einsum("sbd,sbd->sb", v, w)},
            bytes_read=2 * v.numel() * 4,
        )
    )
    # An activation's tangents in the forward-adjoint pass: S * B rows, factors per example. d1 is
    # +-1 so that the repeated in-place scaling keeps the tangents' magnitude.
    S, B, width = (32, 64, 1024) if big else (32, 16, 1024)
    t = torch.randn(S * B, width, generator=g).to(dev)
    d1 = (torch.randint(0, 2, (B, width), generator=g) * 2 - 1).float().to(dev)
    c2 = torch.randn(B, width, generator=g).to(dev)

    def torch_ops():  # what the pass did before the kernel: a temporary the size of t
        rows = t.view(S, B, width)
        term = (c2 * rows).mul_(rows).sum(-1)
        rows.mul_(d1)
        return term

    cases.append(
        Case(
            op="curvature_step",
            shape=f"S={S} B={B} width={width}",
            dtype="float32",
            implementations={b: (lambda b=b: flatness.ops.curvature_step_(t, d1, c2, backend=b)) for b in ours},
            baselines={"torch ops": torch_ops},
            bytes_read=t.numel() * 4,
            notes="bytes: the tangents, read once and written once in place (factors: per example, cached)",
        )
    )
    return cases


# The tables this suite fills (the runner skips the suite when --ops names none of them).
OPS = (
    "flatness_trace",
    "flatness_hutchpp",
    "flatness_top_eig",
    "flatness_hvp",
    "flatness_parameter_trace",
    "flatness_first_call",
    "flatness_hvp_compiled",
    "energy",
    "logsumexp_hvp",
    "fill_probes",
    "probe_dots",
    "curvature_step",
)


def cases(ctx: BenchContext) -> list[Case]:
    status = pykernels.backends()
    ours = [b for b in (["cuda", "triton"] if ctx.is_cuda else ["cpu"]) if status[b].available]
    names = QUICK_FAMILIES if ctx.quick else tuple(FAMILIES)
    B, S = (16, 8) if ctx.quick else (64, 32)
    out = []
    for name in names:
        out += _trace_cases(ctx, name, B, S)
        out.append(_hvp_case(ctx, name, B))
    out += [_parameter_trace_case(ctx, name, B, S) for name in names]
    for name in names:
        out += _first_call_cases(ctx, name, B, S)
    if not ctx.quick or ctx.is_cuda:
        out += [_hvp_compiled_case(ctx, B) for B in (16, 64)]
    return out + _kernel_cases(ctx, ours)
