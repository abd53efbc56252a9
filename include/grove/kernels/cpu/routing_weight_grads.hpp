#pragma once

#include <cstdint>

#include "grove/weights/tensor_types.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// The adjugates' share of the routing-weight gradient (docs/math.md, "Backward"): c_j is the
/// sum of group j's picked weights, so every pick s of group j receives λ ⟨dy, A_j(x)⟩.
/// `group_dots(t, at)` holds ⟨dy_t, A_j(x_t)⟩ for the token's at-th distinct group
/// (plan.token_groups); dw [T, k] already holds the routed experts' ⟨dy, E_{e_s}(x)⟩.
template <class Scalar>
void add_adjugate_dots(const routing_plan<Scalar>& plan, const row_matrix<Scalar>& group_dots, row_matrix<Scalar>& dw) {
  const auto lambda = static_cast<Scalar>(plan.scale);
  for (index t = 0; t < plan.tokens; ++t) {
    const index groups_of_token = plan.groups_per_token[static_cast<std::size_t>(t)];
    for (index slot = 0; slot < plan.top_k; ++slot) {
      const auto group = static_cast<std::int32_t>(plan.topk_ids(t, slot) / plan.group_size);
      for (index at = 0; at < groups_of_token; ++at)
        if (plan.token_groups(t, at) == group) {
          dw(t, slot) += lambda * group_dots(t, at);
          break;
        }
    }
  }
}

}  // namespace detail
GROVE_END_NAMESPACE
