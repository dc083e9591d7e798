"""Our hessian_trace against torch.func's on one bench family, in one process, the two timed in
alternating order every round: the ratio behind the two-process A/Bs of RESULTS.md R27 (run it
alternately in a git worktree of each revision, same machine, pinned to one core).

    taskset -c 0 python benchmarks/flatness_ratio.py [--family tanh-mlp] [--method hutchinson]
        [--chunk-size N] [--rounds 30]

--chunk-size: hessian_trace's chunk_size (the small-chunk figures of R27: gelu-cnn with 8).
Hutch++ times the same estimator code on torch.func's operator. Families:
pykernels.bench.flatness.FAMILIES.
"""

import argparse

import torch

import pykernels
from pykernels import flatness
from pykernels.bench import flatness as bench
from pykernels.bench._core import rotated_medians_ms
from pykernels.flatness import estimators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="tanh-mlp", choices=list(bench.FAMILIES))
    parser.add_argument("--method", default="hutchinson", choices=["hutchinson", "hutch++"])
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--probes", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x = bench.family(args.family, args.batch, "cpu")
    S = args.probes
    ours = lambda: flatness.hessian_trace(model, x, S, args.method, seed=0, chunk_size=args.chunk_size)  # noqa: E731
    if args.method == "hutchinson":
        V = pykernels.probe_vectors((S, *x.shape), seed=0)
        theirs = lambda: bench.torch_func_hutchinson(model, x, V)[0]  # noqa: E731
    else:
        operator = bench.TorchFuncHessian(model, x)
        theirs = lambda: estimators.hutch_plus_plus(operator, S, 0).value  # noqa: E731
    assert torch.allclose(ours().value, theirs(), rtol=1e-3, atol=1e-5), "the two estimates disagree"
    medians = rotated_medians_ms({"ours": ours, "torch.func": theirs}, args.rounds, warm_up=3)
    print(
        f"{args.family} {args.method} chunk_size={args.chunk_size}: ours {medians['ours']:.2f} ms, "
        f"torch.func {medians['torch.func']:.2f} ms, {medians['torch.func'] / medians['ours']:.2f}x "
        f"(medians of {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
