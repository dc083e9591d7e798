#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, PyTorch and Triton installed and no
# network, build the CUDA extension for this card, run the tests of the GPU paths (the
# cuda and triton backends; CI runs the CPU ones), run the CUDA kernels' tests under
# compute-sanitizer, and benchmark the kernels. Sized for a short lease (about 8 minutes
# on an H200 with 16 cores): each phase has a time limit, a failing phase does not stop
# the next, the exit status reports any failure. Logs and results.json go to $OUT
# (default bench-results/gpu). Record its figures in benchmarks/RESULTS.md with the
# card's name and the date.
#
#   bash benchmarks/gpu_check.sh            (uses python3; PYTHON=... to override)
#   FULL=1 bash benchmarks/gpu_check.sh     every test, racecheck and synccheck too,
#                                           and every bench suite (longer)
#   SANITIZE=0 bash benchmarks/gpu_check.sh no compute-sanitizer runs
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=$(mkdir -p "${OUT:-bench-results/gpu}" && cd "${OUT:-bench-results/gpu}" && pwd)
FULL=${FULL:-0}
status=0
summary=()
step() { printf '\n==> %s (%ss)\n' "$*" "$SECONDS"; }
# check NAME LIMIT_S CMD...: runs CMD with a time limit, records pass / FAILED in the summary.
check() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@"
  rc=$?
  if [ $rc = 0 ]; then summary+=("pass    $name ($((SECONDS - start)) s)"); else
    summary+=("FAILED  $name (exit $rc$([ $rc = 124 ] && echo ', time limit'), $((SECONDS - start)) s)")
    status=1
  fi
}
export PYTHONUNBUFFERED=1

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build pykernels._C with CUDA for this card (no network: --no-build-isolation)"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# pip only registers the package; the extension is built once, in place.
PYKERNELS_NO_EXTENSION=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || {
  tail -30 "$OUT/build.log"; exit 1; }
PYKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
"$PY" -m pykernels.cli backends

# pytest-xdist, when installed, spreads the tests over the cores (Triton compiles are CPU-bound).
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${PYTEST_WORKERS:-12}" --dist loadfile)
select=(-m "cuda or triton")
[ "$FULL" = 1 ] && select=()
step "tests of the GPU paths (cpu, cuda and triton must load; a skipped GPU test fails)"
# Each failure is written to failures.txt as it happens, in case a limit or a crash ends the run.
check "pytest ${select[*]:-all}" 170 env PYKERNELS_REQUIRE_BACKENDS="cpu cuda triton" PYKERNELS_NO_GPU_SKIPS=1 \
  PYKERNELS_FAILURE_LOG="$OUT/failures.txt" \
  "$PY" -m pytest tests -q -p no:cacheprovider "${select[@]}" "${xdist[@]}" --junitxml="$OUT/pytest.xml"
[ -s "$OUT/failures.txt" ] && { echo "failures:"; sort "$OUT/failures.txt" | head -60; }

step "benchmarks: the kernels against plain PyTorch, quick sizes"
kernels=energy,logsumexp_hvp,fill_probes,probe_dots,pairwise_corr_distance,spearman,probe_accumulate_
kernels=$kernels,probe_stream_step,probe_stream_step_varlen,softmax_weighted_bce
if [ "$FULL" = 1 ]; then ops=(); else ops=(--ops "$kernels"); fi
check "bench --quick" 60 "$PY" -m pykernels.cli bench --device cuda --quick --no-plot "${ops[@]}" --out "$OUT/quick"
step "benchmarks: probe_scores"
check "bench probe_scores" 60 "$PY" -m pykernels.cli bench --device cuda --ops probe_scores --no-plot \
  $([ "$FULL" = 1 ] || echo --quick) --out "$OUT/probe_scores"

if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  sanitize() { local tool=$1; shift; check "compute-sanitizer $tool" 110 compute-sanitizer --tool "$tool" \
    --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider "$@"; }
  step "compute-sanitizer: memcheck on the CUDA kernels' tests"
  sanitize memcheck tests/probes/test_scoring.py tests/selection/test_correlation_ops.py tests/probes/test_stream.py \
    tests/probes/test_training.py tests/flatness/test_ops.py -k "cuda and not fuzz"
  if [ "$FULL" = 1 ]; then
    step "compute-sanitizer: racecheck and synccheck on the kernels with shared memory / block reductions"
    for tool in racecheck synccheck; do
      sanitize "$tool" tests/probes/test_stream.py tests/probes/test_training.py tests/flatness/test_ops.py -k cuda
    done
  fi
fi

step "summary (status $status)"
printf '%s\n' "${summary[@]}"
exit $status
