// The CUDA backend's tests (tests/test_cuda.cu) compiled by the host compiler against a CPU
// emulation of the CUDA subset grove uses (tests/cuda_emulation.hpp): the very kernels of
// include/grove/cuda run on the CPU, a block's threads as fibers, so their logic is tested on
// machines without a GPU and without the CUDA toolkit. This is no substitute for running
// test_cuda on a GPU (docs/cuda.md, "Status").

// clang-format off
#include "cuda_emulation.hpp"  // first: it stands in for the CUDA headers

#include "test_cuda.cu"
// clang-format on
