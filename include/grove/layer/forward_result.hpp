#pragma once

#include <optional>

#include "grove/weights/tensor_types.hpp"
#include "grove/layer/activation_stats.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

/// What a forward call should return besides y.
struct forward_request {
  bool routing = false;     ///< the plan: router logits, picked ids and weights, dispatch
  bool statistics = false;  ///< activation_stats of the batch
};

template <class Scalar>
struct forward_result {
  row_matrix<Scalar> y;                          ///< [T, H]
  std::optional<routing_plan<Scalar>> routing;   ///< when requested
  std::optional<activation_stats> statistics;    ///< when requested
};

GROVE_END_NAMESPACE
