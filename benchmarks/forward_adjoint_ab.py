"""The forward-adjoint tangent pass of a git revision against the working tree's, in one process,
the two versions' order alternating every round: the A/B behind RESULTS.md R28.

    taskset -c 0 python benchmarks/forward_adjoint_ab.py [--family attention]
        [--measure hutchinson|hutch++|parameter] [--against HEAD] [--rounds 12]

The revision's pykernels/flatness/_forward_adjoint.py is loaded as a second module and swapped
into pykernels.flatness.hvp between calls (each version captures and caches its own graphs);
the rest of the library is the working tree's. "parameter" times parameter_hessian_trace of
the cross-entropy, the others hessian_trace (B = 64, S = 32). Families:
pykernels.bench.flatness.FAMILIES. Run it on an otherwise idle machine.
"""

import argparse
import importlib
import subprocess
import types
from pathlib import Path

import torch
from torch import nn

from pykernels import flatness
from pykernels.bench import flatness as bench
from pykernels.bench._core import rotated_medians_ms
from pykernels.flatness import _forward_adjoint

hvp = importlib.import_module("pykernels.flatness.hvp")  # the module (flatness.hvp is a function)
SWAPPED = ("CaptureFailed", "ForwardAdjointQuad", "ParameterForwardAdjointQuad", "describe", "is_captured")


def revision_module(revision: str) -> types.ModuleType:
    path = "pykernels/flatness/_forward_adjoint.py"
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"pykernels.flatness._forward_adjoint_at_{revision}")
    module.__package__ = "pykernels.flatness"  # its relative imports resolve to the working tree's
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="attention", choices=list(bench.FAMILIES))
    parser.add_argument("--measure", default="hutchinson", choices=["hutchinson", "hutch++", "parameter"])
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x = bench.family(args.family, 64, "cpu")
    if args.measure == "parameter":
        for p in model.parameters():
            p.requires_grad_(True)
        y, loss = torch.arange(64) % 10, nn.CrossEntropyLoss()
        measure = lambda: flatness.parameter_hessian_trace(model, loss, x, y, 32, seed=0).value  # noqa: E731
    else:
        measure = lambda: flatness.hessian_trace(model, x, 32, args.measure, seed=0).value  # noqa: E731
    versions = {args.against: revision_module(args.against), "working tree": _forward_adjoint}

    def run(name: str) -> torch.Tensor:
        for attr in SWAPPED:
            setattr(hvp, attr, getattr(versions[name], attr))
        return measure()

    old, new = (run(name) for name in versions)
    assert torch.allclose(old, new, rtol=1e-4, atol=1e-6), f"the two versions disagree: {old} against {new}"
    ms = rotated_medians_ms({name: lambda name=name: run(name) for name in versions}, args.rounds)
    print(
        f"{args.family} {args.measure}: working tree {ms['working tree']:.1f} ms, {args.against} "
        f"{ms[args.against]:.1f} ms, {ms[args.against] / ms['working tree']:.3f}x (medians of {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
