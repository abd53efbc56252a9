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
#include "grove/plan/backward_inputs.hpp"
#include "grove/plan/batch_shapes.hpp"
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
  saved.reset(d, plan);
  y.setZero();
  detail::swiglu_batch_scratch<Scalar> s;
  std::vector<dispatch_row<Scalar>> pick_rows;
  detail::for_each_plain_item<Scalar>(plan, &saved, pick_rows, [&](const detail::plain_item<Scalar>& item) {
    const auto n = static_cast<index>(item.rows.size());
    if (n == 0) return;
    const swiglu_weights<const Scalar> mlp = item.of(weights);
    detail::swiglu_batch_forward<Scalar>(mlp, item.rows, x, s, y);
    const index inter = mlp.gate.rows();
    matrix_map<Scalar>(saved.gate.data() + item.saved_start, n, inter) = s.gate;
    matrix_map<Scalar>(saved.up.data() + item.saved_start, n, inter) = s.up;
  });
}

/// Backward of every routed expert and every activated adjugate of a plan (docs/math.md,
/// "Backward"). Accumulates the expert and adjugate weight gradients into `grads` and the
/// experts' share of dx into `dx`; writes `dw` [T, k], the gradient of each routing weight w_s:
///   dw_s = ⟨dy, E_{e_s}(x)⟩ + λ ⟨dy, A_{e_s / group_size}(x)⟩.
/// The adjugates run as in the forward (the plan's adjugate_mode): once per token over the
/// plan's deduplicated adjugate rows (weight λ·c_j), or once per pick (weight λ·w_s; each pick
/// adds its share to the adjugate's gradients and receives its own λ ⟨dy, A(x)⟩), or not at all.
/// `saved` (from a training forward of this plan) skips recomputing the gate/up products;
/// nullptr recomputes them. The router is not touched here.
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

  dw.setZero(plan.tokens, plan.top_k);
  row_matrix<Scalar> adjugate_dots = row_matrix<Scalar>::Zero(plan.tokens, detail::adjugate_dot_columns(plan));
  detail::swiglu_batch_scratch<Scalar> s;
  std::vector<Scalar> dots;
  std::vector<dispatch_row<Scalar>> pick_rows;
  detail::for_each_plain_item<Scalar>(plan, saved, pick_rows, [&](const detail::plain_item<Scalar>& item) {
    const auto n = static_cast<index>(item.rows.size());
    if (n == 0) return;
    const swiglu_weights<const Scalar> mlp = item.of(weights);
    detail::gather_rows<Scalar>(x, item.rows, s.x);
    detail::gather_rows<Scalar>(dy, item.rows, s.dy);
    if (saved) {
      const index inter = mlp.gate.rows();
      s.gate = matrix_map<const Scalar>(saved->gate.data() + item.saved_start, n, inter);
      s.up = matrix_map<const Scalar>(saved->up.data() + item.saved_start, n, inter);
    } else {
      detail::swiglu_pre_activations(mlp, s.x, s.gate, s.up);
    }
    detail::swiglu_batch_backward<Scalar>(mlp, item.of(grads), item.rows, s, dx, dots);
    // A row's slot is its pick slot (routed experts, per-pick adjugates) or its group slot.
    row_matrix<Scalar>& dots_out = item.adjugate ? adjugate_dots : dw;
    for (index i = 0; i < n; ++i) {
      const auto& row = item.rows[static_cast<std::size_t>(i)];
      dots_out(row.token, row.slot) = dots[static_cast<std::size_t>(i)];
    }
  });
  detail::add_adjugate_dots(plan, adjugate_dots, dw);
}

}  // namespace cpu
GROVE_END_NAMESPACE
