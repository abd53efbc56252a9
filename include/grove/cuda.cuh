// grove: the optional CUDA backend (docs/cuda.md). Header-only templates for nvcc: include this
// from a .cu file compiled with -std=c++20 for sm_80 or newer. It needs the CUDA runtime only
// (no Eigen, no cuBLAS); the CPU library (grove/grove.hpp) never includes it.
#pragma once

#include "grove/cuda/backward_kernels.cuh"
#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/device_weights.cuh"
#include "grove/cuda/expert_kernels.cuh"
#include "grove/cuda/layer.cuh"
#include "grove/cuda/routing_kernels.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/cuda/tile_gemm.cuh"
