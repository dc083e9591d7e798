#!/usr/bin/env bash
# One run on a GPU machine for the model-selection ops: build the CUDA extension, run the
# selection tests with every backend required (cuda and triton must not be skipped), then the
# PARC benchmarks (256 models x N=1000 against the CPU reference, N=20,000 on one GPU).
# Usage: bash benchmarks/gpu_check_selection.sh [python]   (a Python with a CUDA build of torch)
set -euo pipefail
PY=${1:-python}
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} PYKERNELS_BUILD_CUDA=1
"$PY" setup.py build_ext --inplace > /tmp/pykernels-gpu-build.log 2>&1 || { tail -30 /tmp/pykernels-gpu-build.log; exit 1; }
"$PY" -c "import pykernels; [print(s) for s in pykernels.backends().values()]"
PYKERNELS_REQUIRE_BACKENDS="cpu cuda triton" "$PY" -m pytest tests/selection -q -x
"$PY" -m pykernels.cli bench --ops parc,spearman,pairwise_corr_distance --out bench-results-gpu
