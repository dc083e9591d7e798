#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, PyTorch and Triton installed
# and no network, build the CUDA extension for this card, run every CUDA and
# Triton test, run one CUDA test under compute-sanitizer, and benchmark.
# Prints a short table last; takes a few minutes. Record its figures in
# benchmarks/RESULTS.md with the card's name and the date.
#
#   bash benchmarks/gpu_check.sh            (uses python3; PYTHON=... to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench-results/gpu}
step() { printf '\n==> %s (%ss)\n' "$*" "$SECONDS"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build pykernels._C with CUDA for this card (no network: --no-build-isolation)"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
PYKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
PYKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" "$PY" setup.py -q build_ext --inplace
"$PY" -m pykernels.cli backends

step "tests (cpu, cuda and triton must all run)"
PYKERNELS_REQUIRE_BACKENDS="cpu cuda triton" "$PY" -m pytest tests -q -x -p no:cacheprovider

if command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer memcheck on a subset of the CUDA tests"
  compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/probes/test_scoring.py -k "cuda and (matches_reference or padding or nan)"
  compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/selection/test_correlation_ops.py -k "cuda and (matches_reference or nan)"
  compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/probes/test_stream.py tests/flatness/test_ops.py -k "cuda"
fi

step "benchmarks"
"$PY" -m pykernels.cli bench --device cuda --out "$OUT" ${BENCH_ARGS:---quick}
step "done"
