# Compiler settings for grove's own executables: tests, examples, benchmarks, header checks.
#
# None of this is put on the grove / grove_io INTERFACE targets: a consumer chooses their own
# warnings, sanitizers and -march. grove_target_settings(<target>) applies:
#   - standard C++20 without GNU extensions;
#   - warnings (-Wall -Wextra -Wpedantic; /W4 with MSVC), as errors when GROVE_WERROR is ON;
#   - -march=native when GROVE_NATIVE is ON and the compiler takes it;
#   - the sanitizers listed in GROVE_SANITIZE (e.g. "address;undefined" or "address,undefined").
# Only the C++ sources of a target get these: nvcc compiles CUDA sources with its own flags.

include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

if(MSVC)
  set(GROVE_WARNING_FLAGS /W4 /permissive-)
  set(GROVE_WERROR_FLAG /WX)
else()
  set(GROVE_WARNING_FLAGS -Wall -Wextra -Wpedantic)
  set(GROVE_WERROR_FLAG -Werror)
endif()

set(GROVE_NATIVE_FLAG "")
if(GROVE_NATIVE AND NOT MSVC)
  check_cxx_compiler_flag(-march=native GROVE_COMPILER_HAS_MARCH_NATIVE)
  if(GROVE_COMPILER_HAS_MARCH_NATIVE)
    set(GROVE_NATIVE_FLAG -march=native)
    # GCC before 13 warns -Wuninitialized / -Wmaybe-uninitialized inside its own AVX-512
    # intrinsics header (`__m512 __Y = __Y;` in avx512fintrin.h, GCC bug 105593) wherever Eigen's
    # AVX-512 code is inlined (a maxCoeff() is enough). That false positive would fail -Werror
    # builds, so both warnings are off there; the clang++ build still checks them.
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
      include(CheckCXXSourceCompiles)
      set(CMAKE_REQUIRED_FLAGS -march=native)
      check_cxx_source_compiles("#ifndef __AVX512F__\n#error no AVX-512\n#endif\nint main() { return 0; }"
                                GROVE_NATIVE_HAS_AVX512)
      unset(CMAKE_REQUIRED_FLAGS)
      if(GROVE_NATIVE_HAS_AVX512)
        list(APPEND GROVE_NATIVE_FLAG -Wno-uninitialized -Wno-maybe-uninitialized)
      endif()
    endif()
  else()
    message(STATUS "grove: ${CMAKE_CXX_COMPILER_ID} does not take -march=native; GROVE_NATIVE has no effect")
  endif()
endif()

# GROVE_SANITIZE accepts a CMake list or a comma-separated string.
set(GROVE_SANITIZE_FLAGS "")
if(GROVE_SANITIZE)
  if(MSVC)
    message(FATAL_ERROR "grove: GROVE_SANITIZE is supported with GCC and Clang only")
  endif()
  string(REPLACE ";" "," _grove_sanitizers "${GROVE_SANITIZE}")
  string(REPLACE " " "" _grove_sanitizers "${_grove_sanitizers}")
  set(GROVE_SANITIZE_FLAGS "-fsanitize=${_grove_sanitizers}" -fno-sanitize-recover=all -fno-omit-frame-pointer)
  message(STATUS "grove: tests, examples and benchmarks are built with -fsanitize=${_grove_sanitizers}")
  unset(_grove_sanitizers)
endif()

function(grove_target_settings target)
  set(cxx "$<COMPILE_LANGUAGE:CXX>")
  # -std=c++20, not gnu++20: grove itself must not lean on compiler extensions.
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
  target_compile_options(${target} PRIVATE "$<${cxx}:${GROVE_WARNING_FLAGS}>")
  if(GROVE_WERROR)
    target_compile_options(${target} PRIVATE "$<${cxx}:${GROVE_WERROR_FLAG}>")
  endif()
  if(GROVE_NATIVE_FLAG)
    target_compile_options(${target} PRIVATE "$<${cxx}:${GROVE_NATIVE_FLAG}>")
  endif()
  # nvcc links CUDA executables and does not take -fsanitize, so targets with CUDA sources are
  # left unsanitized (their C++ objects included, or the link would miss the runtimes).
  get_target_property(sources ${target} SOURCES)
  set(has_cuda FALSE)
  foreach(source IN LISTS sources)
    if(source MATCHES "\\.cu$")
      set(has_cuda TRUE)
    endif()
  endforeach()
  if(GROVE_SANITIZE_FLAGS AND NOT has_cuda)
    # libstdc++'s cheap bounds checks (operator[], front, back) as well, in sanitized builds only.
    target_compile_definitions(${target} PRIVATE _GLIBCXX_ASSERTIONS)
    target_compile_options(${target} PRIVATE "$<${cxx}:${GROVE_SANITIZE_FLAGS}>")
    target_link_options(${target} PRIVATE ${GROVE_SANITIZE_FLAGS})
  endif()
endfunction()

# The environment every test runs in when sanitizers are on: stop at the first error, with a stack.
set(GROVE_SANITIZER_TEST_ENVIRONMENT "")
if(GROVE_SANITIZE)
  set(GROVE_SANITIZER_TEST_ENVIRONMENT
      "ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:detect_leaks=1:strict_string_checks=1:check_initialization_order=1"
      "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1")
endif()
