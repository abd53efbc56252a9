#pragma once

#include <cstddef>
#include <cstdint>

#include "grove/weights/tensor_types.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// Columns of the adjugate dots add_adjugate_dots takes: once per pick one per pick slot (k),
/// otherwise one per distinct group of a token (min(k, G)).
template <class Scalar>
index adjugate_dot_columns(const routing_plan<Scalar>& plan) {
  return plan.adjugates == adjugate_mode::once_per_pick ? plan.top_k : plan.max_groups();
}

/// The adjugates' share of the routing-weight gradient (docs/math.md, "Backward"): every pick s
/// receives λ ⟨dy, A_{g(s)}(x)⟩ on top of the routed expert's ⟨dy, E_{e_s}(x)⟩ that dw [T, k]
/// already holds. `adjugate_dots` [T, adjugate_dot_columns(plan)] holds the ⟨dy_t, A(x_t)⟩ of
/// the adjugate rows, at the rows' (token, slot):
///   - once per token, (t, at) for the token's at-th distinct group (plan.token_groups); c_j is
///     the sum of group j's picked weights, so every pick of group j receives its group's dot;
///   - once per pick, (t, s): pick s's own evaluation of its group's adjugate;
///   - none: all zero.
template <class Scalar>
void add_adjugate_dots(const routing_plan<Scalar>& plan, const row_matrix<Scalar>& adjugate_dots,
                       row_matrix<Scalar>& dw) {
  const auto lambda = static_cast<Scalar>(plan.scale);
  if (plan.adjugates == adjugate_mode::once_per_pick) {
    for (index t = 0; t < plan.tokens; ++t)
      for (index slot = 0; slot < plan.top_k; ++slot) dw(t, slot) += lambda * adjugate_dots(t, slot);
    return;
  }
  for (index t = 0; t < plan.tokens; ++t) {
    const index groups_of_token = plan.groups_per_token[static_cast<std::size_t>(t)];
    for (index slot = 0; slot < plan.top_k; ++slot) {
      // A hole (a pick received without its expert, id -1) has no group: -1 / group_size would
      // read as group 0.
      if (plan.topk_ids(t, slot) < 0) continue;
      const auto group = static_cast<std::int32_t>(plan.topk_ids(t, slot) / plan.group_size);
      for (index at = 0; at < groups_of_token; ++at)
        if (plan.token_groups(t, at) == group) {
          dw(t, slot) += lambda * adjugate_dots(t, at);
          break;
        }
    }
  }
}

}  // namespace detail
GROVE_END_NAMESPACE
