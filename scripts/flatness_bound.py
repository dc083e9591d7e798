"""The cost an exact input-space HVP must pay, per network family of the flatness bench:
matmul / convolution FLOPs of one forward of the S*B tangents (FlopCounterMode; an exact
method does a tangent forward and a tangent backward, >= 2F), the rate this machine reaches on
those same ops (profiler time of the linear ops of that forward, fastest of 5), and the
Hutchinson times of torch.func and ours against the bound 2F / rate.
Run: taskset -c 0 python scripts/flatness_bound.py [family ...]"""

import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import pykernels
from pykernels import flatness
from pykernels.bench.flatness import FAMILIES, family, torch_func_hutchinson
from pykernels.flatness.hvp import twice_differentiable

torch.set_num_threads(1)


def fastest(fn, n=7):
    """The fastest of n timed calls (after one warm-up): on a shared machine the closest to its capability."""
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


LINEAR_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mkldnn_convolution",
    "aten::convolution_overrideable",
    "aten::thnn_conv2d",
    "aten::_slow_conv2d_forward",
)
B, S = 64, 32
for name in sys.argv[1:] or list(FAMILIES)[1:]:
    model, x = family(name, B, "cpu")
    V = pykernels.probe_vectors((S, *x.shape), seed=0)
    tangents = V.reshape(S * B, *x.shape[1:])
    with twice_differentiable(), torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(tangents)
        flops = counter.get_total_flops()  # matmuls and convolutions of one forward of the S*B tangents
        linear_times = []  # seconds in those ops (their profiler self time), fastest of 5
        for _ in range(5):
            with torch.profiler.profile() as prof:
                model(tangents)
            linear_times.append(sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in LINEAR_OPS) / 1e6)
        linear = min(linear_times)
    with twice_differentiable():
        t_func = fastest(lambda model=model, x=x, V=V: torch_func_hutchinson(model, x, V))
        t_ours = fastest(lambda model=model, x=x: flatness.hessian_trace(model, x, S, seed=0))
    bound = 2 * linear  # tangent forward + tangent backward: at least 2F FLOPs at this rate
    print(
        f"{name}: F = {flops / 1e9:.3f} GFLOP per forward of S*B = {S * B} tangents, its linear ops "
        f"{linear * 1e3:.1f} ms ({flops / linear / 1e9:.1f} GFLOP/s); bound 2F / rate {bound * 1e3:.1f} ms; "
        f"torch.func {t_func * 1e3:.1f} ms = {t_func / bound:.2f}x bound; ours {t_ours * 1e3:.1f} ms = "
        f"{t_ours / bound:.2f}x bound",
        flush=True,
    )
