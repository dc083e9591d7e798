"""Peak memory of the CPU parc_spearman kernel at large N, one fresh process per case.

The kernel needs 16 M bytes of scratch per model (M = N(N-1)/2 float64 distances and their
bucketed copy; 3.2 GB at N = 20,000). Models run in parallel on the intra-op threads only while
their scratch fits PYKERNELS_CPU_SCRATCH_BYTES (default 2 GiB), so the peak stays at about one
model's scratch however many threads there are.

    python benchmarks/parc_cpu_memory.py [N ...]        (default 20000; 2 models, 2 threads)
"""

import subprocess
import sys

CASE = """
import resource, sys, time, torch, pykernels
torch.set_num_threads(2)
n, models = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
x = torch.randn(models, n, 32, generator=g, dtype=torch.float64)
classes = torch.randint(0, 50, (n,), generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
rho = pykernels.parc_spearman(x, classes, backend="cpu")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{base / 2**20:.2f} {peak / 2**20:.2f} {seconds:.1f} {rho.tolist()}")
"""


def main(ns):
    print("| N | models | threads | scratch per model (16 M bytes) | peak RSS | before the call | time |")
    print("|---|---|---|---|---|---|---|")
    for n in ns:
        models = 2
        out = subprocess.run(
            [sys.executable, "-c", CASE, str(n), str(models)], capture_output=True, text=True, check=True
        )
        base, peak, seconds, _ = out.stdout.split(" ", 3)
        m = n * (n - 1) // 2
        print(
            f"| {n:,} | {models} | 2 | {16 * m / 2**30:.2f} GiB | {float(peak):.2f} GiB | {float(base):.2f} GiB "
            f"| {seconds} s |"
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [20000])
