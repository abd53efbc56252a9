#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/swiglu.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/kernels/cpu/backward_inputs.hpp"
#include "grove/kernels/cpu/batch_shapes.hpp"
#include "grove/kernels/cpu/routing_weight_grads.hpp"
#include "grove/plan/saved_activations.hpp"
#include "grove/kernels/cpu/swiglu_batch.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace cpu {

/// cpu::forward_experts_simple that also keeps the SwiGLU pre-activations for backward (the
/// baseline of the training forward and the path for fp64).
template <class Scalar>
void forward_experts_saving_simple(const std::type_identity_t<weights_view<Scalar>>& weights,
                                   const routing_plan<Scalar>& plan, std::type_identity_t<const_rows_ref<Scalar>> x,
                                   std::type_identity_t<rows_ref<Scalar>> y, saved_activations<Scalar>& saved) {
  const layer_dims& d = weights.dims();
  detail::require_batch_shapes(d, plan, x.rows(), x.cols(), "input x");
  detail::require_batch_shapes(d, plan, y.rows(), y.cols(), "output y");
  detail::require(plan.adjugates != adjugate_mode::once_per_pick,
                  "grove: a training forward needs adjugate_mode::once_per_token or none (the backward has no "
                  "once_per_pick)");
  saved.reset(d, plan);
  y.setZero();
  detail::swiglu_batch_scratch<Scalar> s;
  auto run = [&](const swiglu_weights<const Scalar>& mlp, std::span<const dispatch_row<Scalar>> rows,
                 std::size_t start) {
    const auto n = static_cast<index>(rows.size());
    if (n == 0) return;
    detail::swiglu_batch_forward<Scalar>(mlp, rows, x, s, y);
    const index inter = mlp.gate.rows();
    matrix_map<Scalar>(saved.gate.data() + start, n, inter) = s.gate;
    matrix_map<Scalar>(saved.up.data() + start, n, inter) = s.up;
  };
  for (index e = 0; e < d.experts; ++e) run(weights.expert(e), plan.rows_of_expert(e), saved.expert_start(e));
  if (plan.adjugates == adjugate_mode::once_per_token)
    for (index j = 0; j < d.groups; ++j) run(weights.adjugate(j), plan.rows_of_adjugate(j), saved.adjugate_start(j));
}

/// Backward of every routed expert and every activated adjugate of a plan (docs/math.md,
/// "Backward"). Accumulates the expert and adjugate weight gradients into `grads` and the
/// experts' share of dx into `dx`; writes `dw` [T, k], the gradient of each routing weight w_s:
///   dw_s = ⟨dy, E_{e_s}(x)⟩ + λ ⟨dy, A_{e_s / group_size}(x)⟩.
/// Each adjugate runs once per token, over the plan's deduplicated adjugate rows, as in the
/// forward. `saved` (from a training forward of this plan) skips recomputing the
/// gate/up products; nullptr recomputes them. The router is not touched here.
///
/// This is the plain version (per-item Eigen products on the calling thread): the baseline of
/// cpu_runner's fused backward and its path for fp64.
template <class Scalar>
void backward_experts_simple(const std::type_identity_t<weights_view<Scalar>>& weights,
                             const routing_plan<Scalar>& plan, std::type_identity_t<const_rows_ref<Scalar>> x,
                             std::type_identity_t<const_rows_ref<Scalar>> dy, const saved_activations<Scalar>* saved,
                             const std::type_identity_t<weights_span<Scalar>>& grads,
                             std::type_identity_t<rows_ref<Scalar>> dx, row_matrix<Scalar>& dw) {
  const layer_dims& d = weights.dims();
  detail::require_backward_inputs<Scalar>(d, plan, x, dy, dx, grads.dims(), saved);
  detail::require(plan.adjugates != adjugate_mode::once_per_pick,
                  "grove: the CPU backward runs adjugate_mode::once_per_token and none; once_per_pick is forward only");

  dw.setZero(plan.tokens, plan.top_k);
  row_matrix<Scalar> group_dots = row_matrix<Scalar>::Zero(plan.tokens, plan.max_groups());
  detail::swiglu_batch_scratch<Scalar> s;
  std::vector<Scalar> dots;
  auto run = [&](const swiglu_weights<const Scalar>& mlp, swiglu_weights<Scalar> grad,
                 std::span<const dispatch_row<Scalar>> rows, std::size_t start, row_matrix<Scalar>& dots_out) {
    const auto n = static_cast<index>(rows.size());
    if (n == 0) return;
    detail::gather_rows<Scalar>(x, rows, s.x);
    detail::gather_rows<Scalar>(dy, rows, s.dy);
    if (saved) {
      const index inter = mlp.gate.rows();
      s.gate = matrix_map<const Scalar>(saved->gate.data() + start, n, inter);
      s.up = matrix_map<const Scalar>(saved->up.data() + start, n, inter);
    } else {
      detail::swiglu_pre_activations(mlp, s.x, s.gate, s.up);
    }
    detail::swiglu_batch_backward<Scalar>(mlp, grad, rows, s, dx, dots);
    for (index i = 0; i < n; ++i) {
      const auto& row = rows[static_cast<std::size_t>(i)];
      dots_out(row.token, row.slot) = dots[static_cast<std::size_t>(i)];
    }
  };
  for (index e = 0; e < d.experts; ++e)
    run(weights.expert(e), grads.expert(e), plan.rows_of_expert(e), saved ? saved->expert_start(e) : 0, dw);
  if (plan.adjugates == adjugate_mode::once_per_token)
    for (index j = 0; j < d.groups; ++j)
      run(weights.adjugate(j), grads.adjugate(j), plan.rows_of_adjugate(j), saved ? saved->adjugate_start(j) : 0,
          group_dots);

  detail::add_adjugate_dots(plan, group_dots, dw);
}

}  // namespace cpu
GROVE_END_NAMESPACE
