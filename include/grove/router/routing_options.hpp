#pragma once

#include "grove/config/dynamic.hpp"
#include "grove/plan/dispatch.hpp"

GROVE_BEGIN_NAMESPACE

/// What routing needs beyond the weights: k and λ (a layer_config provides both), and how the
/// plan's adjugates enter the experts' pass. Eigen-free: the CPU router (grove::route) and the
/// CUDA one (cuda::device_router) take the same options.
struct routing_options {
  index top_k = 0;
  double scale = 0.0;
  adjugate_mode adjugates = adjugate_mode::once_per_token;  ///< recorded in the plan
};

GROVE_END_NAMESPACE
