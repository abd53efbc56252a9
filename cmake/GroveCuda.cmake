# The optional CUDA backend's build: defines the option GROVE_CUDA and, when it is ON, enables
# the CUDA language.
#
# GROVE_CUDA defaults to ON when grove is the top-level project and a CUDA compiler works, OFF
# otherwise (a consumer that wants grove's CUDA tests asks for them). nvcc is often installed
# outside PATH (/usr/local/cuda/bin); it is looked for there and under $CUDA_PATH / $CUDA_HOME
# when neither CMAKE_CUDA_COMPILER nor $CUDACXX names one.

include_guard(GLOBAL)

# (Only when grove may enable CUDA: a parent project's environment is left alone otherwise.)
if((PROJECT_IS_TOP_LEVEL OR GROVE_CUDA) AND NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
  find_program(_grove_nvcc nvcc
    HINTS "$ENV{CUDA_PATH}/bin" "$ENV{CUDA_HOME}/bin" /usr/local/cuda/bin
    NO_CACHE)
  if(_grove_nvcc)
    # CheckLanguage's test project and enable_language(CUDA) both read $CUDACXX.
    set(ENV{CUDACXX} "${_grove_nvcc}")
  endif()
  unset(_grove_nvcc)
endif()

if(NOT DEFINED GROVE_CUDA)
  set(_grove_cuda_default OFF)
  if(PROJECT_IS_TOP_LEVEL)
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(_grove_cuda_default ON)
    endif()
  endif()
endif()
option(GROVE_CUDA "Build the CUDA tests and benchmarks (needs a CUDA compiler)" ${_grove_cuda_default})
unset(_grove_cuda_default)

if(GROVE_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    # Hopper and Ampere, the GPUs grove's CUDA kernels are tuned for.
    set(CMAKE_CUDA_ARCHITECTURES "90;80" CACHE STRING "CUDA architectures grove's CUDA targets are built for")
  endif()
  enable_language(CUDA)
  # CUDAToolkit's targets (CUDA::cublas, ...) for whoever needs them; targets with CUDA sources
  # get the CUDA runtime from nvcc already (CMAKE_CUDA_RUNTIME_LIBRARY).
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "grove: CUDA ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}), architectures ${CMAKE_CUDA_ARCHITECTURES}")

  # grove_cuda_target_settings(<target>): C++20 for the CUDA sources and what Eigen's headers
  # need under nvcc (constexpr std functions called from device code; its many host/device
  # annotations warnings are noise).
  function(grove_cuda_target_settings target)
    if(CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
      set_target_properties(${target} PROPERTIES CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON CUDA_EXTENSIONS OFF)
    else()
      # CMake before 3.26 does not know nvcc's C++20 flag.
      target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>")
    endif()
    target_compile_options(${target} PRIVATE
      "$<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr;--diag-suppress=20012>")
  endfunction()
endif()
