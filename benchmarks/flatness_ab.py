"""A/B of one forward-adjoint fast path: hessian_trace with it and with it switched off, in one
process, with torch.func's trace, the order of the three rotated every round (an A/B that always
runs one version second flatters it: on this CPU two identical versions measured 8.6 against
7.0 ms that way).

    python benchmarks/flatness_ab.py [--family tanh-mlp] [--disable _fused_step] [--rounds 20]

--disable names a function of pykernels.flatness._forward_adjoint that returns None where its
fast path does not apply (so None switches it off): _fused_step (the curvature_step_ kernel in
the tangent pass) or _unbatched_step (the kernel called under the vmap wrappers; off, it goes
through the op's vmap rules). Families: pykernels.bench.flatness.FAMILIES. Run it pinned to one
core (taskset -c 0) on an otherwise idle machine.
"""

import argparse

import torch

import pykernels
from pykernels import flatness
from pykernels.bench import flatness as bench
from pykernels.bench._core import rotated_medians_ms
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
    fns = {"torch.func": torch_func, "with": lambda: trace(True), "without": lambda: trace(False)}
    medians = rotated_medians_ms(fns, args.rounds)
    print(
        f"{args.family}, {args.disable}: with {medians['with']:.2f} ms, without {medians['without']:.2f} ms, "
        f"torch.func {medians['torch.func']:.2f} ms (medians of {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
