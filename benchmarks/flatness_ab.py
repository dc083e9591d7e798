"""A/B of one forward-adjoint fast path: hessian_trace with it and with it switched off, in one
process, the two versions' order alternating every round (an A/B that always runs one version
second flatters it: on this CPU two identical versions measured 8.6 against 7.0 ms that way).
torch.func's trace runs first in every round.

    python benchmarks/flatness_ab.py [--family tanh-mlp] [--disable _fused_step] [--rounds 20]

--disable names a function of pykernels.flatness._forward_adjoint that returns None where its
fast path does not apply (so None switches it off): _fused_step (the curvature_step_ kernel in
the tangent pass) or _unbatched_step (the kernel called under the vmap wrappers; off, it goes
through the op's vmap rules). Families: pykernels.bench.flatness.FAMILIES. Run it pinned to one
core (taskset -c 0) on an otherwise idle machine.
"""

import argparse
import statistics
import time

import torch

import pykernels
from pykernels import flatness
from pykernels.bench import flatness as bench
from pykernels.flatness import _forward_adjoint

SWITCHES = ("_fused_step", "_unbatched_step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="tanh-mlp", choices=list(bench.FAMILIES))
    parser.add_argument("--disable", default="_fused_step", choices=SWITCHES)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--probes", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x = bench.family(args.family, args.batch, "cpu")
    V = pykernels.probe_vectors((args.probes, *x.shape), seed=0)
    on = getattr(_forward_adjoint, args.disable)

    def trace(enabled: bool):
        setattr(_forward_adjoint, args.disable, on if enabled else (lambda *a, **k: None))
        return flatness.hessian_trace(model, x, args.probes, seed=0)

    torch_func = lambda: bench.torch_func_hutchinson(model, x, V)  # noqa: E731
    with_it, without = trace(True).value, trace(False).value
    assert torch.allclose(with_it, without, rtol=1e-4, atol=1e-6), "the two versions disagree"
    times = {"torch.func": [], "with": [], "without": []}
    for _ in range(2):  # warm-up
        torch_func(), trace(True), trace(False)
    for r in range(args.rounds):
        start = time.perf_counter()
        torch_func()
        times["torch.func"].append(time.perf_counter() - start)
        for enabled in (True, False) if r % 2 == 0 else (False, True):
            start = time.perf_counter()
            trace(enabled)
            times["with" if enabled else "without"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"{args.family}, {args.disable}: with {medians['with']:.2f} ms, without {medians['without']:.2f} ms, "
        f"torch.func {medians['torch.func']:.2f} ms (medians of {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
