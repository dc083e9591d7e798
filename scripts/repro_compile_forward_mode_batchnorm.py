"""Minimal repro: torch.compile(fullgraph=True) of forward-over-reverse (jvp of grad) through an
eval-mode BatchNorm2d fails in PyTorch 2.13's fake-tensor tracing, though eager runs it and
reverse-over-reverse compiles. Run: python scripts/repro_compile_forward_mode_batchnorm.py
Prints the eager result, the reverse-over-reverse compile result, and the forward-mode compile
error (the PyTorch limitation pykernels works around by compiling reverse_over_reverse)."""

import torch
from torch import nn
from torch.func import grad, jvp, vmap

model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3)).eval()
for p in model.parameters():
    p.requires_grad_(False)
x, V = torch.randn(2, 1, 4, 4), torch.randn(3, 2, 1, 4, 4)


def log_p_sum(t):
    return torch.logsumexp(model(t), -1).sum()


def forward_over_reverse(x, V):
    return vmap(lambda v: jvp(grad(log_p_sum), (x,), (v,))[1])(V)


def reverse_over_reverse(x, V):
    return vmap(lambda v: grad(lambda t: (grad(log_p_sum)(t) * v).sum())(x))(V)


eager = forward_over_reverse(x, V)
print("eager forward-over-reverse: ok", tuple(eager.shape))
compiled = torch.compile(reverse_over_reverse, fullgraph=True, backend="aot_eager")(x, V)
print("compiled reverse-over-reverse: ok, max |diff| vs eager", (compiled - eager).abs().max().item())
try:
    torch.compile(forward_over_reverse, fullgraph=True, backend="aot_eager")(x, V)
    print("compiled forward-over-reverse: ok (fixed in this PyTorch)", torch.__version__)
except Exception as exc:
    print(
        f"compiled forward-over-reverse fails on torch {torch.__version__}: {type(exc).__name__}: "
        f"{' / '.join(l.strip() for l in str(exc).splitlines()[:4] if l.strip())[:400]}"
    )
