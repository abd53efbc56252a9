// grove: header-only Grove MoE layers (arXiv 2508.07785). This header brings in the public
// API of the core library, which needs only Eigen. Checkpoint I/O (safetensors, config.json)
// is in <grove/io.hpp> and needs nlohmann/json as well.
#pragma once

#include "grove/version.hpp"
#include "grove/error.hpp"
#include "grove/config/dynamic.hpp"
#include "grove/config/layer_dims.hpp"
#include "grove/config/layer_config.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/layer_parameters.hpp"
#include "grove/weights/check_finite.hpp"
#include "grove/weights/bf16_weights.hpp"
#include "grove/router/route.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/plan/saved_activations.hpp"
#include "grove/plan/pass_requests.hpp"
#include "grove/kernels/cpu/expert_forward.hpp"
#include "grove/runners/runner.hpp"
#include "grove/runners/cpu_runner.hpp"
#include "grove/runners/default_runner.hpp"
#include "grove/kernels/reference/token_forward.hpp"
#include "grove/layer/activation_stats.hpp"
#include "grove/layer/forward_result.hpp"
#include "grove/layer/layer.hpp"
