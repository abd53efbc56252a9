# cmake -DBINARY_DIR=... -DWORK_DIR=... -DINSTALL_DIR=lib/python3/dist-packages -DPYTHON=...
#       -DTESTS_DIR=... [-DCONFIG=...] -P installed_package.cmake
#
# Installs the grove_torch component of grove's build to WORK_DIR/prefix, checks that it holds the
# package and nothing else, and runs part of the pytest suite against that copy alone (no build
# directory on PYTHONPATH): what a user gets from `cmake --install <build> --component grove_torch`.

cmake_minimum_required(VERSION 3.22)
foreach(var IN ITEMS BINARY_DIR WORK_DIR INSTALL_DIR PYTHON TESTS_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "installed_package: -D${var}=... is required")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
file(REMOVE_RECURSE "${WORK_DIR}")
set(install_args --install "${BINARY_DIR}" --prefix "${prefix}" --component grove_torch)
if(CONFIG)
  list(APPEND install_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" ${install_args} RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "installed_package: cmake --install --component grove_torch failed (${result})")
endif()

file(GLOB_RECURSE installed RELATIVE "${prefix}" "${prefix}/*")
set(package "${INSTALL_DIR}/grove_torch")
foreach(file IN ITEMS __init__.py _ops.py functional.py module.py libgrove_torch_ops.so)
  if(NOT "${package}/${file}" IN_LIST installed)
    message(FATAL_ERROR "installed_package: the component lacks ${package}/${file} (it has: ${installed})")
  endif()
endforeach()
foreach(file IN LISTS installed)
  if(NOT file MATCHES "^${package}/[a-z_]+\\.(py|so)$")
    message(FATAL_ERROR "installed_package: the component installed an unexpected file: ${file}")
  endif()
endforeach()

# Only the installed copy on the path, and the test that checks it was the one imported.
set(ENV{PYTHONPATH} "${prefix}/${INSTALL_DIR}")
set(ENV{GROVE_TORCH_PACKAGE_ROOT} "${prefix}/${INSTALL_DIR}")
set(ENV{PYTHONDONTWRITEBYTECODE} 1)
execute_process(
  COMMAND "${PYTHON}" "${TESTS_DIR}/run_pytest.py" "${TESTS_DIR}"
          -k "imported_is_the_one_under_test or forward_matches or every_gradient"
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "installed_package: the tests failed against the installed package (${result})")
endif()
message(STATUS "installed_package: passed (${prefix}/${package})")
