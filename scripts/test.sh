#!/usr/bin/env bash
# Builds everything (library checks, tests, examples, benchmarks) and runs the tests with ctest:
#   scripts/test.sh [BUILD_DIR]
# Benchmarks are compiled, never run. Installs the Debian packages the build needs when they are
# missing (as root or with sudo; else it prints the apt-get command to run). Runs from any directory.
#
# Environment:
#   CXX                      g++ or clang++ (default g++)
#   GROVE_BUILD_DIR          build folder when no argument is given (default <grove>/build)
#   GROVE_BUILD_TYPE         CMake build type (default Release at -O2; with sanitizers Debug at -O1)
#   GROVE_SANITIZE           e.g. address,undefined
#   GROVE_WERROR             ON: warnings are errors
#   GROVE_BUILD_BENCHMARKS, GROVE_CONSUMER_TESTS, GROVE_HEADER_CHECK, GROVE_TSAN_TEST   ON (default) or OFF
#   GROVE_FUZZ               ON: also build the libFuzzer harnesses (clang++ only) and run each
#                            for GROVE_FUZZ_SECONDS (default 60) as tests; default OFF
#   GROVE_TORCH              ON (default; OFF with GROVE_SANITIZE): build the PyTorch adapter and
#                            run its pytest suite, installing libtorch-dev, python3-torch and
#                            python3-pytest when missing; AUTO: only when Torch is there; OFF: skip
#   GROVE_MPI                AUTO (default): build grove::mpi and run its tests under mpirun
#                            when MPI is found (Open MPI is installed with the test packages);
#                            ON: MPI is required; OFF: skip
#   GROVE_CUDA, GROVE_NATIVE, GROVE_FETCH_DEPENDENCIES  passed on to CMake when set
#   (the options are described in docs/install.md)
#   GROVE_JOBS               parallel build and test jobs (default 2)
#   CMAKE_GENERATOR, GROVE_SKIP_PACKAGES=1
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export CXX="${CXX:-g++}"
# A sanitized extension cannot load into an unsanitized Python: no adapter with sanitizers.
default_torch=ON
[[ -n "${GROVE_SANITIZE:-}" ]] && default_torch=OFF
torch="${GROVE_TORCH:-$default_torch}"
if [[ "$torch" == ON ]]; then
  # shellcheck disable=SC2046
  grove_require_packages $(grove_packages all) $(grove_torch_packages)
else
  # shellcheck disable=SC2046
  grove_require_packages $(grove_packages all)
fi

build_dir="${1:-${GROVE_BUILD_DIR:-$GROVE_ROOT/build}}"
sanitize="${GROVE_SANITIZE:-}"
args=(
  -DGROVE_BUILD_TESTS=ON
  -DGROVE_BUILD_EXAMPLES=ON
  -DGROVE_BUILD_TOOLS=ON
  "-DGROVE_WERROR=${GROVE_WERROR:-OFF}"
  "-DGROVE_SANITIZE=$sanitize"
  "-DGROVE_BUILD_BENCHMARKS=${GROVE_BUILD_BENCHMARKS:-ON}"
  "-DGROVE_CONSUMER_TESTS=${GROVE_CONSUMER_TESTS:-ON}"
  "-DGROVE_HEADER_CHECK=${GROVE_HEADER_CHECK:-ON}"
  "-DGROVE_TSAN_TEST=${GROVE_TSAN_TEST:-ON}"
  "-DGROVE_FUZZ=${GROVE_FUZZ:-OFF}"
  "-DGROVE_FUZZ_SECONDS=${GROVE_FUZZ_SECONDS:-60}"
  "-DGROVE_TORCH=$torch"
  "-DGROVE_MPI=${GROVE_MPI:-AUTO}"
)
if [[ -n "$sanitize" ]]; then
  # Sanitized code at -O1: fast enough to run, still close to what the optimizer does.
  args+=("-DCMAKE_BUILD_TYPE=${GROVE_BUILD_TYPE:-Debug}" "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1")
else
  # Tests at -O2 (CMake's Release is -O3): as fast to run, quicker to compile.
  args+=("-DCMAKE_BUILD_TYPE=${GROVE_BUILD_TYPE:-Release}" "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG")
fi
for option in GROVE_CUDA GROVE_NATIVE GROVE_FETCH_DEPENDENCIES; do
  if [[ -n "${!option:-}" ]]; then
    args+=("-D$option=${!option}")
  fi
done

grove_log "building in $build_dir with $CXX${sanitize:+, sanitizers $sanitize}"
grove_configure "$build_dir" "${args[@]}"
cmake --build "$build_dir" --parallel "$GROVE_JOBS"
ctest --test-dir "$build_dir" --output-on-failure --parallel "$GROVE_JOBS"
