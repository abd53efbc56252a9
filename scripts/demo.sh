#!/usr/bin/env bash
# Builds grove's demo (Release) and runs it: scripts/demo.sh [DEMO ARGS...]
#
# Installs the Debian packages the build needs when they are missing (as root or with sudo; else
# it prints the apt-get command to run). Runs from any directory.
#
# Environment: CXX (g++ or clang++, default g++), GROVE_DEMO_BUILD_DIR (default <grove>/build-demo),
# GROVE_JOBS (default 2), CMAKE_GENERATOR, GROVE_SKIP_PACKAGES=1.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export CXX="${CXX:-g++}"
# shellcheck disable=SC2046
grove_require_packages $(grove_packages core)

build_dir="${GROVE_DEMO_BUILD_DIR:-$GROVE_ROOT/build-demo}"
grove_configure "$build_dir" \
  -DCMAKE_BUILD_TYPE=Release \
  -DGROVE_BUILD_EXAMPLES=ON \
  -DGROVE_BUILD_TOOLS=OFF \
  -DGROVE_BUILD_TESTS=OFF \
  -DGROVE_BUILD_BENCHMARKS=OFF \
  -DGROVE_CUDA=OFF
cmake --build "$build_dir" --target grove_demo --parallel "$GROVE_JOBS"
exec "$build_dir/examples/grove_demo" "$@"
