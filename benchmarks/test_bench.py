"""Every `pykernels bench` case (quick sizes) through pytest-benchmark:

    python -m pytest benchmarks --benchmark-only

One test per implementation and baseline of every case, so pytest-benchmark's
statistics, comparisons and histograms apply to the same workloads.
"""

import pytest
import torch

from pykernels.bench._core import BenchContext
from pykernels.bench._runner import collect_cases

_CTX = BenchContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=True)
_PARAMS = [
    pytest.param(fn, id=f"{case.op}[{case.shape} {case.dtype}]-{name}")
    for case in collect_cases(_CTX)
    for name, fn in {**case.baselines, **case.implementations}.items()
]


@pytest.mark.parametrize("fn", _PARAMS)
def test_bench(benchmark, fn):
    if _CTX.is_cuda:
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark(fn)
