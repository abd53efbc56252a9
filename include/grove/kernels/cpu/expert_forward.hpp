#pragma once

#include <span>
#include <string>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/experts/layer_weights.hpp"
#include "grove/experts/swiglu.hpp"
#include "grove/experts/tensor_types.hpp"
#include "grove/router/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace cpu {

/// Runs the routed experts and the activated adjugates of a plan on the CPU and writes
/// y = Σ_s w_s E_{e_s}(x) + λ Σ_j c_j A_j(x) (docs/math.md, step 6). Each expert and each
/// adjugate processes its rows of the plan as one batch: gather, gate/up product, SwiGLU,
/// down product, weighted scatter-add. Adjugates come from the plan's deduplicated rows, so
/// each is evaluated once per token. Summation order is fixed (experts by index, then
/// adjugates; tokens ascending), so results do not depend on anything but the inputs.
template <class Scalar>
void forward_experts(const weights_view<Scalar>& weights, const routing_plan<Scalar>& plan,
                     std::type_identity_t<const_rows_ref<Scalar>> x,
                     std::type_identity_t<rows_ref<Scalar>> y) {
  const layer_dims& d = weights.dims();
  detail::require(x.rows() == plan.tokens && x.cols() == d.hidden,
                  "grove: input x is [" + std::to_string(x.rows()) + ", " + std::to_string(x.cols()) +
                      "] but the plan and layer expect [" + std::to_string(plan.tokens) + ", " +
                      std::to_string(d.hidden) + "]");
  detail::require(y.rows() == plan.tokens && y.cols() == d.hidden,
                  "grove: output y is [" + std::to_string(y.rows()) + ", " + std::to_string(y.cols()) +
                      "] but must be [" + std::to_string(plan.tokens) + ", " + std::to_string(d.hidden) + "]");
  detail::require(plan.experts == d.experts && plan.groups == d.groups,
                  "grove: the routing plan was made for another layer (E or G differ)");

  y.setZero();
  row_matrix<Scalar> gathered, gate, up, out;
  auto run = [&](const swiglu_weights<const Scalar>& mlp, std::span<const dispatch_row<Scalar>> rows) {
    const auto n = static_cast<index>(rows.size());
    if (n == 0) return;
    gathered.resize(n, d.hidden);
    for (index i = 0; i < n; ++i) gathered.row(i) = x.row(rows[static_cast<std::size_t>(i)].token);
    gate.noalias() = gathered * mlp.gate.transpose();
    up.noalias() = gathered * mlp.up.transpose();
    gate = gate.unaryExpr([](Scalar z) { return detail::silu(z); }).cwiseProduct(up);
    out.noalias() = gate * mlp.down.transpose();
    for (index i = 0; i < n; ++i) {
      const auto& row = rows[static_cast<std::size_t>(i)];
      y.row(row.token) += row.weight * out.row(i);
    }
  };
  for (index e = 0; e < d.experts; ++e) run(weights.expert(e), plan.rows_of_expert(e));
  for (index j = 0; j < d.groups; ++j) run(weights.adjugate(j), plan.rows_of_adjugate(j));
}

}  // namespace cpu
GROVE_END_NAMESPACE
