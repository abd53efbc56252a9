// grove: the optional CUDA backend (docs/cuda.md). Header-only templates for nvcc: include this
// from a .cu file compiled with -std=c++20 for sm_80 or newer. It needs the CUDA runtime and
// Eigen (the runner implements grove::runner, whose requests hold Eigen blocks), no cuBLAS; the
// CPU library (grove/grove.hpp) never includes it.
//
//   grove::cuda_runner            the runner: host requests (layer.on(runner)) and device plans
//   grove::cuda::device_router    routing on the device: device x -> device plan
#pragma once

#include "grove/cuda/backward_kernels.cuh"
#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/device_router.cuh"
#include "grove/cuda/device_weights.cuh"
#include "grove/cuda/expert_kernels.cuh"
#include "grove/cuda/plan_layout.cuh"
#include "grove/cuda/routing_kernels.cuh"
#include "grove/cuda/runner_workspace.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/cuda/tile_gemm.cuh"
#include "grove/cuda/weights_registry.cuh"
#include "grove/runners/cuda_runner.cuh"
