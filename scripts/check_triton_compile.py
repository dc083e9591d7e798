"""Compiles every Triton kernel for NVIDIA GPUs on a machine without one.

The Triton interpreter (TRITON_INTERPRET=1, what the tests use without a GPU) never runs
Triton's compiler, so a kernel can pass every CPU test and still fail to compile for a GPU
(as the flatness kernels did on Triton 3.6 for sm_90: an assertion in the
OptimizeThreadLocality pass, found on the first GPU run). This script stands a fake
driver in for the GPU: each launch of each op's Triton twin, on the CPU tensors of the
op's test samples (tests/test_ops.py) in every float dtype the op takes and a few sizes
that change the kernels' block shapes, goes through Triton's own argument specialisation
and is compiled to a cubin for each target (ptxas included), but not launched.

    python scripts/check_triton_compile.py [--arch 80,90]    (run by ./dev.sh cpp-tests)

Exit status 1 lists every kernel configuration that failed to compile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CompileOnlyDriver:
    """What JITFunction.run asks the active driver for, with a fixed CUDA target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one kernel cache per target

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def install(arch: int, failures: list, compiled: set, launches: list):
    """Routes every Triton launch to compile-only, recording failures (launches[0] counts them)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(CompileOnlyDriver(arch))
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        launches[0] += 1
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
            compiled.add((arch, self.__name__, kernel.hash if kernel is not None else None))
        except Exception as exc:  # noqa: BLE001  (every compile error is a finding)
            if os.environ.get("PYKERNELS_TRITON_COMPILE_VERBOSE"):
                print(f"sm_{arch} {self.__name__} failed on {[type(a).__name__ for a in args]}: {exc}")
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            errors = [line for line in lines if "error" in line.lower()] or lines[-1:]
            failures.append((arch, self.__name__, f"{type(exc).__name__}: {errors[0] if errors else ''}"))
        return None

    JITFunction.run = compile_only
    return run


def _cast(a, dtype):
    import torch

    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype:
        return a.detach().to(dtype)
    if isinstance(a, list):
        return [_cast(x, dtype) for x in a]
    return a


def _variants(args: tuple):
    """The sample, then copies with every floating tensor in each other float dtype."""
    import torch

    yield args
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        yield tuple(_cast(a, dtype) for a in args)


def _copied(args: tuple) -> tuple:
    """The in-place ops write into their first tensors: the oracle gets copies."""
    import torch

    def copy(a):
        if isinstance(a, torch.Tensor):
            return a.clone()
        if isinstance(a, list):
            return [copy(x) for x in a]
        return a

    return tuple(copy(a) for a in args)


def _extra_samples(op: str):
    """Sizes that pick other block shapes than the small test samples."""
    import torch

    g = torch.Generator().manual_seed(0)
    if op == "energy":
        return [(torch.randn(4, K, generator=g),) for K in (1, 1000, 5000)]
    if op == "logsumexp_hvp":
        return [(torch.randn(4, K, generator=g), torch.randn(3, 4, K, generator=g)) for K in (1, 1000, 5000)]
    if op == "probe_dots":
        return [(torch.randn(2, 3, D, generator=g), torch.randn(2, 3, D, generator=g)) for D in (1, 4096)]
    if op == "probe_accumulate_":
        return [
            (torch.zeros(8, K), torch.randn(8, H, generator=g), torch.randn(H, K, generator=g))
            for H, K in ((4096, 1), (1024, 4))
        ]
    if op == "pairwise_corr_distance":
        return [(torch.randn(2, 300, D, generator=g), triu) for D in (1, 700) for triu in (False, True)]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    import torch

    import pykernels  # noqa: F401  (registers the ops)
    from pykernels import _ops
    from pykernels.backend import OP_FAMILY, resolve
    from tests.test_ops import samples

    failures: list = []
    compiled: set = set()
    launches = [0]
    start = time.perf_counter()
    from triton.runtime.jit import JITFunction

    for arch in (int(a) for a in args.arch.split(",")):
        original = install(arch, failures, compiled, launches)
        import pykernels.triton  # noqa: F401  (imports every Triton family)

        for op in sorted(OP_FAMILY):
            before = launches[0]
            twin = getattr(torch.ops.pykernels, _ops.triton_name(op))
            # The inputs the op takes are those its CPU kernel (else its reference) accepts.
            oracle = resolve(op, torch.device("cpu"), "cpu" if _ops.LOADED else "reference")
            for sample in samples(op, "cpu") + _extra_samples(op):
                for variant in _variants(sample):
                    try:
                        with torch.no_grad():
                            oracle(*_copied(variant))
                    except Exception:  # noqa: BLE001  (an input the op refuses)
                        continue
                    try:
                        with torch.no_grad():
                            twin(*variant)
                    except Exception:  # noqa: BLE001
                        # the op refusing a dtype (its public wrapper checks first), or a result
                        # read back that was never computed: not a compile failure
                        if os.environ.get("PYKERNELS_TRITON_COMPILE_VERBOSE"):
                            traceback.print_exc()
            if launches[0] == before:  # the check itself must not pass vacuously
                failures.append((arch, op, "no kernel launched: the samples never reached a Triton kernel"))
        JITFunction.run = original
    kernels = sorted({name for _, name, _ in compiled})
    print(
        f"compiled {len(compiled)} Triton kernel configurations ({len(kernels)} kernels: {', '.join(kernels)}) "
        f"for sm_{args.arch.replace(',', ', sm_')} in {time.perf_counter() - start:.0f} s"
    )
    if failures:
        print(f"{len(failures)} failed to compile:")
        for arch, name, message in sorted(set(failures)):
            print(f"  sm_{arch} {name}: {message}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
