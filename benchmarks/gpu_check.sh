#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, PyTorch and Triton installed
# and no network, build the CUDA extension for this card, run every test (cpu,
# cuda and triton backends), run CUDA tests under compute-sanitizer, and
# benchmark: every suite at quick sizes, then probe_scores at its full target
# shape (4,096 tokens x 32 layers x 4,096 hidden, bf16). Prints the tables last;
# a few minutes. Record its figures in benchmarks/RESULTS.md with the card's
# name and the date. A failing test does not stop the benchmarks; the exit
# status reports it at the end.
#
#   bash benchmarks/gpu_check.sh            (uses python3; PYTHON=... to override)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench-results/gpu}
status=0
step() { printf '\n==> %s (%ss)\n' "$*" "$SECONDS"; }
check() { "$@" || { echo "FAILED: $*"; status=1; }; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build pykernels._C with CUDA for this card (no network: --no-build-isolation)"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# pip only registers the package; the extension is built once, in place.
PYKERNELS_NO_EXTENSION=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
PYKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" setup.py -q build_ext --inplace || exit 1
"$PY" -m pykernels.cli backends

step "tests (cpu, cuda and triton must all run; a skipped GPU test fails)"
check env PYKERNELS_REQUIRE_BACKENDS="cpu cuda triton" PYKERNELS_NO_GPU_SKIPS=1 \
  "$PY" -m pytest tests -q -p no:cacheprovider

if command -v compute-sanitizer >/dev/null 2>&1; then
  sanitize() { local tool=$1; shift; check compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$PY" -m pytest -q -x -p no:cacheprovider "$@"; }
  step "compute-sanitizer: memcheck on the CUDA kernels' tests"
  sanitize memcheck tests/probes/test_scoring.py -k "cuda and (matches_reference or padding or nan or many_layers)"
  sanitize memcheck tests/selection/test_correlation_ops.py -k "cuda and (matches_reference or nan)"
  sanitize memcheck tests/probes/test_stream.py tests/probes/test_training.py tests/flatness/test_ops.py -k cuda
  step "compute-sanitizer: racecheck and synccheck on the kernels with shared memory / block reductions"
  for tool in racecheck synccheck; do
    sanitize "$tool" tests/probes/test_stream.py tests/probes/test_training.py tests/flatness/test_ops.py -k cuda
  done
fi

step "benchmarks: every suite, quick sizes"
check "$PY" -m pykernels.cli bench --device cuda --quick --out "$OUT/quick"
step "benchmarks: probe_scores at the target shape"
check "$PY" -m pykernels.cli bench --device cuda --ops probe_scores --out "$OUT/probe_scores"
step "done (status $status)"
exit $status
