#pragma once

#include <string>

#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// The check every expert pass (CPU and CUDA runners) makes before touching memory: the plan belongs to a layer of
/// these dims, and the [rows, cols] block called `what` ("input x", "output y", ...) is [T, H].
/// One place for the message, so every kernel reports a bad shape the same way.
template <class Scalar>
void require_batch_shapes(const layer_dims& d, const routing_plan<Scalar>& plan, index rows, index cols,
                          const char* what) {
  require(plan.experts == d.experts && plan.groups == d.groups && plan.group_size == d.group_size(),
          "grove: the routing plan was made for another layer (E or G differ)");
  require(rows == plan.tokens && cols == d.hidden,
          "grove: ", what, " is [", rows, ", ", cols, "] but the plan and layer expect [", plan.tokens, ", ",
          d.hidden, "]");
}

}  // namespace detail
GROVE_END_NAMESPACE
