#pragma once

#include <algorithm>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

/// What one batch activated (docs/math.md, "Forward"): how many distinct groups each token
/// touched, the parameters each token read, and how many adjugate evaluations evaluating each
/// activated adjugate once per token saved over the released code's once per pick.
struct activation_stats {
  index tokens = 0;
  index min_groups = 0;  ///< fewest distinct groups n_g of any token
  index max_groups = 0;
  double mean_groups = 0.0;
  index min_activated_parameters = 0;  ///< E·H + k·3·H·I + n_g·3·H·Ia, over tokens
  index max_activated_parameters = 0;
  double mean_activated_parameters = 0.0;
  index adjugate_evaluations = 0;        ///< Σ n_g: what grove computes
  index once_per_pick_evaluations = 0;   ///< T·k: what evaluating per pick computes
  std::vector<index> expert_load;        ///< picks per expert

  [[nodiscard]] index adjugate_evaluations_saved() const { return once_per_pick_evaluations - adjugate_evaluations; }
  /// Fraction of the once-per-pick adjugate work avoided, in [0, 1).
  [[nodiscard]] double adjugate_saved_fraction() const {
    return once_per_pick_evaluations ? double(adjugate_evaluations_saved()) / double(once_per_pick_evaluations) : 0.0;
  }
};

template <class Scalar>
activation_stats compute_activation_stats(const routing_plan<Scalar>& plan, const layer_dims& dims) {
  activation_stats s;
  s.tokens = plan.tokens;
  s.adjugate_evaluations = plan.adjugate_evaluations();
  s.once_per_pick_evaluations = plan.tokens * plan.top_k;
  s.expert_load.resize(static_cast<std::size_t>(plan.experts));
  for (index e = 0; e < plan.experts; ++e) s.expert_load[static_cast<std::size_t>(e)] = plan.expert_load(e);
  if (plan.tokens == 0) return s;
  const auto [lo, hi] = std::minmax_element(plan.groups_per_token.begin(), plan.groups_per_token.end());
  s.min_groups = *lo;
  s.max_groups = *hi;
  s.mean_groups = double(s.adjugate_evaluations) / double(plan.tokens);
  s.min_activated_parameters = activated_parameters(dims, plan.top_k, s.min_groups);
  s.max_activated_parameters = activated_parameters(dims, plan.top_k, s.max_groups);
  // activated_parameters is affine in n_g, so its mean is its value at the mean n_g.
  const double per_group = 3.0 * double(dims.hidden) * double(dims.adjugate_intermediate);
  s.mean_activated_parameters = double(activated_parameters(dims, plan.top_k, 0)) + per_group * s.mean_groups;
  return s;
}

GROVE_END_NAMESPACE
