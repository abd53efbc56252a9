#pragma once

// What a forward keeps for its backward: the routing plan (so backward never re-routes) and,
// for a training forward, the SwiGLU pre-activations. Held by Python's autograd context as a
// TorchScript object, `torch.classes.grove.LayerContext`.

#include <torch/custom_class.h>

#include <grove/plan/routing_plan.hpp>
#include <grove/plan/saved_activations.hpp>

namespace grove_torch {

struct layer_context : torch::CustomClassHolder {
  /// The weights' dtype at forward time: backward checks it is called with the same.
  at::ScalarType weight_dtype = at::kFloat;
  grove::routing_plan<float> plan_f32;
  grove::routing_plan<double> plan_f64;
  grove::saved_activations<float> saved_f32;
  grove::saved_activations<double> saved_f64;
  bool has_saved = false;

  template <class S>
  grove::routing_plan<S>& plan() {
    if constexpr (std::is_same_v<S, double>) return plan_f64;
    else return plan_f32;
  }
  template <class S>
  grove::saved_activations<S>& saved() {
    if constexpr (std::is_same_v<S, double>) return saved_f64;
    else return saved_f32;
  }
};

}  // namespace grove_torch
