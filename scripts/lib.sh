# shellcheck shell=bash
# Shared by scripts/demo.sh and scripts/test.sh (sourced, never run): where grove is, which
# Debian packages a build needs, and installing the missing ones.
#
# Environment understood here:
#   CXX                    the C++ compiler (g++ or clang++, optionally versioned); default g++
#   CMAKE_GENERATOR        CMake's generator; default Ninja when ninja is installed, else make
#   GROVE_JOBS             parallel build jobs; default 2
#   GROVE_SKIP_PACKAGES=1  do not check or install Debian packages (other systems, CI images)

GROVE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GROVE_JOBS="${GROVE_JOBS:-2}"

grove_log() { printf 'grove: %s\n' "$*" >&2; }
grove_die() { grove_log "$*"; exit 1; }

# The Debian packages of the compiler named by $CXX: g++[-N] -> g++[-N], clang++[-N] -> clang[-N].
grove_compiler_packages() {
  local cxx
  cxx="$(basename "${CXX:-g++}")"
  case "$cxx" in
    clang++*) echo "clang${cxx#clang++}" ;;
    g++*) echo "$cxx" ;;
    c++) echo g++ ;;
    *) grove_log "CXX=$cxx is neither g++ nor clang++; not checking its package" ;;
  esac
}

grove_is_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# The packages a build needs: `core` (the library and its examples) or `all` (tests and
# benchmarks too). Either make or ninja will do; make is what gets installed when neither is.
grove_packages() {
  local packages=(cmake libeigen3-dev nlohmann-json3-dev libcli11-dev)
  # shellcheck disable=SC2207
  packages+=($(grove_compiler_packages))
  if [[ "${1:-all}" == all ]]; then
    # Open MPI for the expert-parallel tests (tests/mpi, docs/distributed.md), run with mpirun.
    packages+=(doctest-dev libbenchmark-dev libopenmpi-dev openmpi-bin)
  fi
  if ! grove_is_installed make && ! grove_is_installed ninja-build; then
    packages+=(make)
  fi
  echo "${packages[@]}"
}

# The packages of the PyTorch adapter (adapters/torch, docs/torch.md) and its pytest suite.
# Debian's torch imports only under /usr/bin/python3, which the adapter's CMake pins.
grove_torch_packages() {
  echo libtorch-dev python3-torch python3-pytest
}

# grove_require_packages PACKAGE...: installs those that are missing, with apt-get as root or
# through `sudo -n`; without either it prints the command to run and exits 1.
grove_require_packages() {
  if [[ "${GROVE_SKIP_PACKAGES:-0}" == 1 ]]; then
    return 0
  fi
  if ! command -v dpkg-query >/dev/null 2>&1; then
    grove_log "not a Debian system (no dpkg-query): not checking packages; see docs/install.md"
    return 0
  fi
  local missing=() package
  for package in "$@"; do
    grove_is_installed "$package" || missing+=("$package")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  local as_root=()
  if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      as_root=(sudo -n)
    else
      grove_log "missing Debian packages: ${missing[*]}; install them with:"
      echo "sudo apt-get install -y ${missing[*]}"
      exit 1
    fi
  fi
  grove_log "installing missing Debian packages: ${missing[*]}"
  ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# The generator to configure with: $CMAKE_GENERATOR, else Ninja when it is there, else make.
grove_generator() {
  if [[ -n "${CMAKE_GENERATOR:-}" ]]; then
    echo "$CMAKE_GENERATOR"
  elif command -v ninja >/dev/null 2>&1; then
    echo Ninja
  else
    echo "Unix Makefiles"
  fi
}

# grove_configure BUILD_DIR [CMAKE ARGS...]: configures grove's source tree into BUILD_DIR with
# $CXX. A build dir made with another generator or compiler is started afresh.
grove_configure() {
  local build_dir="$1"
  shift
  local generator cxx_path=""
  generator="$(grove_generator)"
  if [[ -n "${CXX:-}" ]]; then
    cxx_path="$(command -v "$CXX")" || grove_die "CXX=$CXX: no such compiler"
  fi
  local cache="$build_dir/CMakeCache.txt"
  if [[ -f "$cache" ]]; then
    if ! grep -qx "CMAKE_GENERATOR:INTERNAL=$generator" "$cache" ||
      { [[ -n "$cxx_path" ]] && ! grep -qx "CMAKE_CXX_COMPILER:[A-Z]*=$cxx_path" "$cache"; }; then
      grove_log "$build_dir was configured with another generator or compiler; starting it afresh"
      rm -rf "$build_dir/CMakeCache.txt" "$build_dir/CMakeFiles"
    fi
  fi
  local args=(-S "$GROVE_ROOT" -B "$build_dir" -G "$generator")
  if [[ -n "$cxx_path" ]]; then
    args+=("-DCMAKE_CXX_COMPILER=$cxx_path")
  fi
  cmake "${args[@]}" "$@"
}
