# Finding grove's dependencies.
#
# Each dependency is looked up with find_package first (the Debian packages, a vcpkg or conda
# prefix, a CMAKE_PREFIX_PATH). When that fails and GROVE_FETCH_DEPENDENCIES is ON, the missing
# header-only library is downloaded at a fixed release with FetchContent and exposed under the
# same target name its own package would give (Eigen3::Eigen, nlohmann_json::nlohmann_json, ...), so the rest of the
# build cannot tell the difference. Only the sources are fetched: none of the upstream CMake runs
# (Eigen's alone configures hundreds of tests), which keeps a fetched build quick and quiet.
#
# Fetched dependencies are for building; an installed grove still expects its consumers to find
# Eigen3 (and nlohmann_json for grove::io) with find_package, as its groveConfig.cmake
# asks for them. docs/install.md explains.

include_guard(GLOBAL)
include(FetchContent)

# Where missing dependencies are fetched from, and which release: the versions of Debian 12.
# Cache variables, so a mirror or another release can be given on the command line.
set(GROVE_EIGEN_GIT_REPOSITORY "https://gitlab.com/libeigen/eigen.git" CACHE STRING "Eigen repository fetched when find_package(Eigen3) fails")
set(GROVE_EIGEN_GIT_TAG "3.4.0" CACHE STRING "Eigen release fetched when find_package(Eigen3) fails")
set(GROVE_JSON_GIT_REPOSITORY "https://github.com/nlohmann/json.git" CACHE STRING "nlohmann/json repository fetched when find_package(nlohmann_json) fails")
set(GROVE_JSON_GIT_TAG "v3.11.2" CACHE STRING "nlohmann/json release fetched when find_package(nlohmann_json) fails")
set(GROVE_DOCTEST_GIT_REPOSITORY "https://github.com/doctest/doctest.git" CACHE STRING "doctest repository fetched when find_package(doctest) fails")
set(GROVE_DOCTEST_GIT_TAG "v2.4.9" CACHE STRING "doctest release fetched when find_package(doctest) fails")
set(GROVE_CLI11_GIT_REPOSITORY "https://github.com/CLIUtils/CLI11.git" CACHE STRING "CLI11 repository fetched when find_package(CLI11) fails")
set(GROVE_CLI11_GIT_TAG "v2.1.2" CACHE STRING "CLI11 release fetched when find_package(CLI11) fails")
set(GROVE_BENCHMARK_GIT_REPOSITORY "${GROVE_BENCHMARK_GIT_REPOSITORY}" CACHE STRING "Google Benchmark repository fetched when find_package(benchmark) fails")
set(GROVE_BENCHMARK_GIT_TAG "v1.7.1" CACHE STRING "Google Benchmark release fetched when find_package(benchmark) fails")
mark_as_advanced(GROVE_EIGEN_GIT_REPOSITORY GROVE_EIGEN_GIT_TAG
                 GROVE_JSON_GIT_REPOSITORY GROVE_JSON_GIT_TAG GROVE_DOCTEST_GIT_REPOSITORY GROVE_DOCTEST_GIT_TAG
                 GROVE_CLI11_GIT_REPOSITORY GROVE_CLI11_GIT_TAG GROVE_BENCHMARK_GIT_REPOSITORY GROVE_BENCHMARK_GIT_TAG)

# grove_fetch_headers(<name> <target> <repository> <tag> <include-subdir>)
#
# Downloads <repository> at <tag> and defines the imported interface target <target> whose include
# directory is <include-subdir> of the download. The download's location is recorded in the
# global property GROVE_FETCHED_DEPENDENCIES as "<fetch name>=<source dir>", so the consumer tests
# can hand it on (FETCHCONTENT_SOURCE_DIR_<NAME>) instead of downloading it again.
function(grove_fetch_headers name target repository tag include_subdir)
  if(NOT GROVE_FETCH_DEPENDENCIES)
    message(FATAL_ERROR
      "grove: ${name} was not found by find_package. Install it (Debian: see scripts/lib.sh), "
      "point CMAKE_PREFIX_PATH at it, or configure with -DGROVE_FETCH_DEPENDENCIES=ON to download "
      "${repository} at ${tag}.")
  endif()
  set(fetch_name "grove_dep_${name}")
  string(TOLOWER "${fetch_name}" fetch_lower)
  string(TOUPPER "${fetch_name}" fetch_upper)
  message(STATUS "grove: ${name} not found by find_package; fetching ${repository} at ${tag}")
  FetchContent_Declare(${fetch_name}
    GIT_REPOSITORY "${repository}"
    GIT_TAG "${tag}"
    GIT_SHALLOW TRUE
    # A sub-directory without a CMakeLists.txt: MakeAvailable downloads but adds nothing.
    SOURCE_SUBDIR "grove-download-only")
  FetchContent_MakeAvailable(${fetch_name})
  set(source_dir "${${fetch_lower}_SOURCE_DIR}")
  set(include_dir "${source_dir}")
  if(NOT include_subdir STREQUAL ".")
    string(APPEND include_dir "/${include_subdir}")
  endif()
  if(NOT IS_DIRECTORY "${include_dir}")
    message(FATAL_ERROR "grove: the download of ${name} has no '${include_subdir}' folder (${source_dir})")
  endif()
  add_library(${target} INTERFACE IMPORTED)
  set_target_properties(${target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${include_dir}")
  set_property(GLOBAL APPEND PROPERTY GROVE_FETCHED_DEPENDENCIES "${fetch_upper}=${source_dir}")
  set_property(GLOBAL APPEND PROPERTY GROVE_FETCHED_PACKAGES "${name}")
endfunction()

# The core: Eigen 3.4. A target that already exists (a parent project provided it) is used.
# (grove's SIMD layer, include/grove/simd/, follows xsimd's design without using xsimd: see
# docs/install.md, "Why not xsimd".)
macro(grove_find_core_dependencies)
  if(NOT TARGET Eigen3::Eigen)
    find_package(Eigen3 3.4 CONFIG QUIET)
    if(NOT Eigen3_FOUND)
      grove_fetch_headers(Eigen3 Eigen3::Eigen "${GROVE_EIGEN_GIT_REPOSITORY}" "${GROVE_EIGEN_GIT_TAG}" ".")
    endif()
  endif()
endmacro()

# grove::io's nlohmann/json. Without it (not found, fetching off) grove::io is not defined.
macro(grove_find_io_dependencies)
  if(NOT TARGET nlohmann_json::nlohmann_json)
    find_package(nlohmann_json 3.10 CONFIG QUIET)
    if(NOT nlohmann_json_FOUND AND GROVE_FETCH_DEPENDENCIES)
      grove_fetch_headers(nlohmann_json nlohmann_json::nlohmann_json "${GROVE_JSON_GIT_REPOSITORY}"
                          "${GROVE_JSON_GIT_TAG}" "include")
    endif()
  endif()
endmacro()

# Tools of grove's own tests, examples and benchmarks.
macro(grove_find_doctest)
  if(NOT TARGET doctest::doctest)
    find_package(doctest 2.4 CONFIG QUIET)
    if(NOT doctest_FOUND)
      grove_fetch_headers(doctest doctest::doctest "${GROVE_DOCTEST_GIT_REPOSITORY}" "${GROVE_DOCTEST_GIT_TAG}" ".")
    endif()
  endif()
endmacro()

macro(grove_find_cli11)
  if(NOT TARGET CLI11::CLI11)
    find_package(CLI11 2 CONFIG QUIET)
    if(NOT CLI11_FOUND AND GROVE_FETCH_DEPENDENCIES)
      grove_fetch_headers(CLI11 CLI11::CLI11 "${GROVE_CLI11_GIT_REPOSITORY}" "${GROVE_CLI11_GIT_TAG}" "include")
    endif()
  endif()
endmacro()

# Google Benchmark is a compiled library: when it is fetched its own CMake builds it (tests off).
macro(grove_find_benchmark)
  if(NOT TARGET benchmark::benchmark)
    find_package(benchmark CONFIG QUIET)
    if(NOT benchmark_FOUND AND GROVE_FETCH_DEPENDENCIES)
      message(STATUS "grove: Google Benchmark not found by find_package; fetching ${GROVE_BENCHMARK_GIT_TAG}")
      set(BENCHMARK_ENABLE_TESTING OFF CACHE BOOL "" FORCE)
      set(BENCHMARK_ENABLE_GTEST_TESTS OFF CACHE BOOL "" FORCE)
      set(BENCHMARK_ENABLE_INSTALL OFF CACHE BOOL "" FORCE)
      set(BENCHMARK_ENABLE_WERROR OFF CACHE BOOL "" FORCE)
      FetchContent_Declare(grove_dep_benchmark
        GIT_REPOSITORY "${GROVE_BENCHMARK_GIT_REPOSITORY}"
        GIT_TAG "${GROVE_BENCHMARK_GIT_TAG}"
        GIT_SHALLOW TRUE)
      FetchContent_MakeAvailable(grove_dep_benchmark)
    endif()
  endif()
endmacro()
