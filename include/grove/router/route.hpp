#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/build_dispatch.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/router/logits.hpp"
#include "grove/router/routing_options.hpp"
#include "grove/router/top_k.hpp"

GROVE_BEGIN_NAMESPACE

/// Routing sizes known at compile time: k and the group size E / G, each `dynamic` where not.
/// A layer whose configuration fixes them routes with them (layer::route_into): the per-token
/// top-k scores live in a fixed-size array on the stack and the group of an expert is a shift
/// when the group size is a power of two. The plan is the same, bit for bit (docs/config.md,
/// "Compile-time sizes", says what it buys).
template <int TopK = dynamic, int GroupSize = dynamic>
struct routing_sizes {
  static_assert(TopK == dynamic || TopK >= 1, "GROVE_TOP_K_MUST_BE_AT_LEAST_ONE");
  static_assert(GroupSize == dynamic || GroupSize >= 1, "GROVE_GROUP_SIZE_MUST_BE_POSITIVE");
  static constexpr int top_k = TopK;
  static constexpr int group_size = GroupSize;
};

namespace detail {

/// True when the selection bias is absent or all zero, so selection may compare logits directly.
template <class Scalar>
bool bias_is_zero(const Scalar* bias, index experts) {
  return bias == nullptr || std::all_of(bias, bias + experts, [](Scalar b) { return b == Scalar(0); });
}

}  // namespace detail

/// Routes a batch into `plan`, reusing its storage: router logits (batch-invariant: a token's
/// logits and picks are the same bits in any batch, router/logits.hpp), top-k selection,
/// renormalised weights, distinct groups and the per-expert dispatch (docs/math.md, steps 1–5;
/// docs/routing.md). `x` is [T, H]. Routing a batch no larger than the plan has held before
/// allocates nothing. `Sizes` (routing_sizes) gives k and the group size when they are fixed at
/// compile time; they must then agree with `options` and the weights.
template <class Sizes = routing_sizes<>, class Scalar>
void route_into(routing_plan<Scalar>& plan, const weights_view<Scalar>& weights, const routing_options& options,
                std::type_identity_t<const_rows_ref<Scalar>> x) {
  const layer_dims& d = weights.dims();
  detail::require(x.cols() == d.hidden, "grove: input x has ", x.cols(), " columns but the layer's hidden size H is ",
                  d.hidden, " (expected x of shape [T, ", d.hidden, "])");
  detail::require(options.top_k >= 1 && options.top_k <= d.experts, "grove: top-k k = ", options.top_k,
                  " must lie in [1, E = ", d.experts, "]");
  detail::require(weights.router().data() != nullptr, "grove: missing tensor 'gate.weight' (router)");
  detail::require(Sizes::top_k == dynamic || Sizes::top_k == options.top_k, "grove: routing_sizes fixes k = ",
                  Sizes::top_k, " but k = ", options.top_k, " was given");
  detail::require(Sizes::group_size == dynamic || Sizes::group_size == d.group_size(),
                  "grove: routing_sizes fixes the group size E / G = ", Sizes::group_size, " but the weights have ",
                  d.group_size());

  plan.tokens = x.rows();
  plan.experts = d.experts;
  plan.groups = d.groups;
  plan.group_size = d.group_size();
  plan.top_k = options.top_k;
  plan.scale = options.scale;
  plan.adjugates = options.adjugates;

  // Batch-invariant logits (router/logits.hpp): a token's picks do not depend on its batch.
  plan.logits.resize(plan.tokens, d.experts);
  detail::router_logits(detail::routing_isa(), x.data(), x.outerStride(), plan.tokens, weights.router().data(),
                        d.experts, d.hidden, plan.logits.data(), d.experts);

  const Scalar* bias = detail::bias_is_zero(weights.bias(), d.experts) ? nullptr : weights.bias();
  plan.topk_ids.resize(plan.tokens, plan.top_k);
  plan.topk_weights.resize(plan.tokens, plan.top_k);
  // k is an std::integral_constant when fixed (constant loop bounds, scores on the stack).
  auto select = [&](auto k, Scalar* scores) {
    for (index t = 0; t < plan.tokens; ++t) {
      detail::select_top_k(&plan.logits(t, 0), bias, d.experts, k, &plan.topk_ids(t, 0), scores, t);
      detail::picked_softmax(&plan.logits(t, 0), &plan.topk_ids(t, 0), k, &plan.topk_weights(t, 0));
    }
  };
  if constexpr (Sizes::top_k != dynamic) {
    std::array<Scalar, Sizes::top_k> scores;
    select(std::integral_constant<index, Sizes::top_k>{}, scores.data());
  } else {
    plan.scratch.scores.resize(static_cast<std::size_t>(plan.top_k));
    select(plan.top_k, plan.scratch.scores.data());
  }

  detail::collect_token_groups<Sizes::group_size>(plan);

  detail::counting_sort<Scalar>(
      plan.tokens, plan.top_k, plan.experts, nullptr, [&](index t, index s) { return plan.topk_ids(t, s); },
      [&](index t, index s) { return plan.topk_weights(t, s); }, plan.expert_offsets, plan.expert_rows,
      plan.scratch.cursor);
  detail::sort_group_rows(plan);
}

/// Routes a batch into a new plan (route_into on an empty one).
template <class Scalar>
routing_plan<Scalar> route(const weights_view<Scalar>& weights, const routing_options& options,
                           std::type_identity_t<const_rows_ref<Scalar>> x) {
  routing_plan<Scalar> plan;
  route_into(plan, weights, options, x);
  return plan;
}

GROVE_END_NAMESPACE
