# cmake -DMODE=find_package|fetch_content -DGROVE_SOURCE_DIR=... -DGROVE_BINARY_DIR=... -DWORK_DIR=...
#       -DGENERATOR=... -DCXX_COMPILER=... [-DMAKE_PROGRAM=...] [-DCONFIG=...] [-DWITH_IO=ON] [-DWITH_MPI=ON]
#       [-DPREFIX_PATH=a|b] [-DFETCHED=NAME=dir|...] [-D<Package>_DIR=...] -P consumer_test.cmake
#
# Builds and runs a project that uses grove the way a user would:
#   find_package   installs grove's build (GROVE_BINARY_DIR) to WORK_DIR/prefix with
#                  `cmake --install`, then builds tests/consumer/find_package against it;
#   fetch_content  builds tests/consumer/fetch_content, which pulls grove in with FetchContent.
# Either way the consumer must not get grove's tests, examples or benchmarks.

cmake_minimum_required(VERSION 3.22)

foreach(var IN ITEMS MODE GROVE_SOURCE_DIR GROVE_BINARY_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "consumer_test: -D${var}=... is required")
  endif()
endforeach()
if(NOT MODE MATCHES "^(find_package|fetch_content)$")
  message(FATAL_ERROR "consumer_test: MODE must be find_package or fetch_content, not '${MODE}'")
endif()
if(NOT DEFINED WITH_IO)
  set(WITH_IO OFF)
endif()
if(NOT DEFINED WITH_MPI)
  set(WITH_MPI OFF)
endif()

function(run)
  string(REPLACE ";" " " shown "${ARGN}")
  message(STATUS "consumer_test: ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "consumer_test (${MODE}): failed (${result}): ${shown}")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(build_dir "${WORK_DIR}/build")

# What the consumer is configured with: this build's compiler and generator, and where grove
# found its dependencies.
set(configure_args
  -G "${GENERATOR}"
  "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
  "-DGROVE_CONSUMER_WITH_IO=${WITH_IO}"
  "-DGROVE_CONSUMER_WITH_MPI=${WITH_MPI}")
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
foreach(package IN ITEMS Eigen3 xsimd nlohmann_json)
  if(${package}_DIR)
    list(APPEND configure_args "-D${package}_DIR=${${package}_DIR}")
  endif()
endforeach()
string(REPLACE "|" ";" prefix_path "${PREFIX_PATH}")

if(MODE STREQUAL "find_package")
  set(prefix "${WORK_DIR}/prefix")
  set(install_args --install "${GROVE_BINARY_DIR}" --prefix "${prefix}")
  if(CONFIG)
    list(APPEND install_args --config "${CONFIG}")
  endif()
  run("${CMAKE_COMMAND}" ${install_args})

  # The package: headers and CMake files, nothing else (no binaries).
  foreach(file IN ITEMS include/grove/grove.hpp include/grove/version.hpp
                        share/cmake/grove/groveConfig.cmake share/cmake/grove/groveConfigVersion.cmake
                        share/cmake/grove/groveTargets.cmake)
    if(NOT EXISTS "${prefix}/${file}")
      message(FATAL_ERROR "consumer_test: the installed package lacks ${file}")
    endif()
  endforeach()
  file(GLOB_RECURSE installed RELATIVE "${prefix}" "${prefix}/*")
  foreach(file IN LISTS installed)
    if(NOT file MATCHES "^(include/grove/.*\\.(hpp|h|cuh)|share/cmake/grove/[^/]+\\.cmake)$")
      message(FATAL_ERROR "consumer_test: the install put an unexpected file in the prefix: ${file}")
    endif()
  endforeach()
  list(LENGTH installed installed_count)
  message(STATUS "consumer_test: installed ${installed_count} files to ${prefix}")

  list(PREPEND prefix_path "${prefix}")
  set(source_dir "${GROVE_SOURCE_DIR}/tests/consumer/find_package")
else()
  set(source_dir "${GROVE_SOURCE_DIR}/tests/consumer/fetch_content")
  list(APPEND configure_args "-DGROVE_SOURCE_DIR=${GROVE_SOURCE_DIR}")
  # Dependencies this build downloaded are handed on instead of being downloaded again.
  string(REPLACE "|" ";" fetched "${FETCHED}")
  foreach(entry IN LISTS fetched)
    if(entry MATCHES "^([A-Z0-9_]+)=(.*)$")
      list(APPEND configure_args "-DFETCHCONTENT_SOURCE_DIR_${CMAKE_MATCH_1}=${CMAKE_MATCH_2}")
    endif()
  endforeach()
endif()

if(prefix_path)
  # Through the environment, which find_package reads too: no list quoting on the way.
  if(NOT CMAKE_HOST_WIN32)
    string(REPLACE ";" ":" prefix_path "${prefix_path}")
  endif()
  set(ENV{CMAKE_PREFIX_PATH} "${prefix_path}")
  message(STATUS "consumer_test: CMAKE_PREFIX_PATH=${prefix_path}")
endif()

run("${CMAKE_COMMAND}" -S "${source_dir}" -B "${build_dir}" ${configure_args})
run("${CMAKE_COMMAND}" --build "${build_dir}")

# Belt and braces beside the consumer's own check: no grove test, example or benchmark was built.
file(GLOB_RECURSE built LIST_DIRECTORIES false RELATIVE "${build_dir}" "${build_dir}/*")
foreach(file IN LISTS built)
  get_filename_component(name "${file}" NAME)
  if(name MATCHES "^(test_[a-z_]+|grove_demo|grove_readme_example|grove|bench_[a-z_]+)(\\.exe)?$")
    message(FATAL_ERROR "consumer_test: the consumer's build contains grove's ${file}")
  endif()
endforeach()

find_program(consumer grove_consumer PATHS "${build_dir}" "${build_dir}/Debug" "${build_dir}/Release"
             NO_DEFAULT_PATH NO_CACHE)
if(NOT consumer)
  message(FATAL_ERROR "consumer_test: grove_consumer was not built in ${build_dir}")
endif()
execute_process(COMMAND "${consumer}" RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
message(STATUS "consumer_test: ${consumer}: ${output}")
if(NOT result EQUAL 0 OR NOT output MATCHES "grove consumer: ok")
  message(FATAL_ERROR "consumer_test (${MODE}): grove_consumer failed (${result})")
endif()
message(STATUS "consumer_test (${MODE}): passed")
