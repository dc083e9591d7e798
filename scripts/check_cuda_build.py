"""Checks a CUDA build of pykernels._C without a GPU: it imports against the
CUDA torch it was built with, and every op bound in csrc/ops/cuda has its CUDA
kernel registered (checked in the dispatcher, not assumed from the build).

usage: python check_cuda_build.py <path to csrc/ops/cuda>
"""

import pathlib
import re
import sys

import torch

import pykernels
from pykernels import _ops

bindings = sorted(pathlib.Path(sys.argv[1]).glob("*.cpp"))
cuda_ops = sorted({m for f in bindings for m in re.findall(r'm\.impl\("(\w+)"', f.read_text())})
if not cuda_ops:
    sys.exit(f"FAIL: no m.impl(...) found under {sys.argv[1]}")

print(f"pykernels from {pykernels.__file__}; torch {torch.__version__} (CUDA {torch.version.cuda})")
if not _ops.LOADED:
    sys.exit(f"FAIL: the CUDA build did not load: {_ops.LOAD_ERROR}")
missing = [op for op in cuda_ops if not _ops.has_kernel(op, "CUDA")]
if missing:
    sys.exit(f"FAIL: no CUDA kernel registered for {missing}")
print(f"OK: CUDA kernels registered for {cuda_ops}")
print(pykernels.backends()["cuda"])
