#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/experts/layer_weights.hpp"
#include "grove/experts/swiglu.hpp"
#include "grove/experts/tensor_types.hpp"
#include "grove/kernels/cpu/batch_shapes.hpp"
#include "grove/kernels/cpu/swiglu_batch.hpp"
#include "grove/router/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace cpu {

/// What a training forward keeps for backward: the SwiGLU pre-activations `g = G x` and
/// `u = U x` of every row the plan dispatched, stored in the plan's own row order (row r of
/// `expert_gate` belongs to `plan.expert_rows[r]`, row r of `adjugate_gate` to
/// `plan.adjugate_rows[r]`). Everything else backward needs (`silu(g)`, `h`) is an elementwise
/// function of these, recomputed with the same expressions, so keeping and recomputing give
/// bit-identical gradients (docs/training.md, "Saved activations or recomputation").
///
/// Memory: `2·(T·k·I + Σ n_g·Ia)` scalars, against a recomputation of the gate/up products.
template <class Scalar>
struct saved_activations {
  row_matrix<Scalar> expert_gate;    ///< [T·k, I]
  row_matrix<Scalar> expert_up;      ///< [T·k, I]
  row_matrix<Scalar> adjugate_gate;  ///< [Σ n_g, Ia]
  row_matrix<Scalar> adjugate_up;    ///< [Σ n_g, Ia]
  /// The plan's dispatch offsets when these were saved: backward refuses another plan.
  std::vector<index> expert_offsets;
  std::vector<index> adjugate_offsets;

  [[nodiscard]] bool empty() const { return expert_offsets.empty(); }
  /// True when these activations were saved for a plan with this dispatch.
  [[nodiscard]] bool matches(const routing_plan<Scalar>& plan) const {
    return expert_offsets == plan.expert_offsets && adjugate_offsets == plan.adjugate_offsets;
  }
  [[nodiscard]] std::size_t bytes() const {
    return sizeof(Scalar) *
           static_cast<std::size_t>(expert_gate.size() + expert_up.size() + adjugate_gate.size() + adjugate_up.size());
  }
};

}  // namespace cpu


namespace cpu {

/// The forward of cpu::forward_experts that also keeps the SwiGLU pre-activations for backward.
/// y is written (not accumulated): y = Σ_s w_s E_{e_s}(x) + λ Σ_j c_j A_j(x).
template <class Scalar>
void forward_experts_saving(const std::type_identity_t<weights_view<Scalar>>& weights, const routing_plan<Scalar>& plan,
                            std::type_identity_t<const_rows_ref<Scalar>> x, std::type_identity_t<rows_ref<Scalar>> y,
                            saved_activations<Scalar>& saved) {
  const layer_dims& d = weights.dims();
  detail::require_batch_shapes(d, plan, x.rows(), x.cols(), "input x");
  detail::require_batch_shapes(d, plan, y.rows(), y.cols(), "output y");

  saved.expert_gate.resize(static_cast<index>(plan.expert_rows.size()), d.expert_intermediate);
  saved.expert_up.resize(saved.expert_gate.rows(), d.expert_intermediate);
  saved.adjugate_gate.resize(static_cast<index>(plan.adjugate_rows.size()), d.adjugate_intermediate);
  saved.adjugate_up.resize(saved.adjugate_gate.rows(), d.adjugate_intermediate);
  saved.expert_offsets = plan.expert_offsets;
  saved.adjugate_offsets = plan.adjugate_offsets;

  y.setZero();
  detail::swiglu_batch_scratch<Scalar> s;
  auto run = [&](const swiglu_weights<const Scalar>& mlp, std::span<const dispatch_row<Scalar>> rows, index first,
                 row_matrix<Scalar>& keep_gate, row_matrix<Scalar>& keep_up) {
    const auto n = static_cast<index>(rows.size());
    if (n == 0) return;
    detail::swiglu_batch_forward<Scalar>(mlp, rows, x, s, y);
    keep_gate.middleRows(first, n) = s.gate;
    keep_up.middleRows(first, n) = s.up;
  };
  for (index e = 0; e < d.experts; ++e)
    run(weights.expert(e), plan.rows_of_expert(e), plan.expert_offsets[static_cast<std::size_t>(e)], saved.expert_gate,
        saved.expert_up);
  for (index j = 0; j < d.groups; ++j)
    run(weights.adjugate(j), plan.rows_of_adjugate(j), plan.adjugate_offsets[static_cast<std::size_t>(j)],
        saved.adjugate_gate, saved.adjugate_up);
}

/// Backward of every routed expert and every activated adjugate of a plan (docs/math.md,
/// "Backward"). Accumulates the expert and adjugate weight gradients into `grads` and the
/// experts' share of dx into `dx`; writes `dw` [T, k], the gradient of each routing weight w_s:
///   dw_s = ⟨dy, E_{e_s}(x)⟩ + λ ⟨dy, A_{e_s / group_size}(x)⟩.
/// Each adjugate runs once per token, over the plan's deduplicated adjugate rows, as in the
/// forward. `saved` (from forward_experts_saving with this plan) skips recomputing the
/// gate/up products; nullptr recomputes them. The router is not touched here.
template <class Scalar>
void backward_experts(const std::type_identity_t<weights_view<Scalar>>& weights, const routing_plan<Scalar>& plan,
                      std::type_identity_t<const_rows_ref<Scalar>> x, std::type_identity_t<const_rows_ref<Scalar>> dy,
                      const saved_activations<Scalar>* saved, const std::type_identity_t<weights_span<Scalar>>& grads,
                      std::type_identity_t<rows_ref<Scalar>> dx, row_matrix<Scalar>& dw) {
  const layer_dims& d = weights.dims();
  detail::require_batch_shapes(d, plan, x.rows(), x.cols(), "input x");
  detail::require_batch_shapes(d, plan, dy.rows(), dy.cols(), "output gradient dy");
  detail::require_batch_shapes(d, plan, dx.rows(), dx.cols(), "input gradient dx");
  detail::require(grads.dims() == d, "grove: the gradient buffers have other dimensions than the layer");
  detail::require(saved == nullptr || saved->matches(plan),
                  "grove: the saved activations were kept for another routing plan than the one given to backward");

  dw.setZero(plan.tokens, plan.top_k);
  row_matrix<Scalar> group_dots = row_matrix<Scalar>::Zero(plan.tokens, plan.max_groups());
  detail::swiglu_batch_scratch<Scalar> s;
  std::vector<Scalar> dots;
  auto run = [&](const swiglu_weights<const Scalar>& mlp, swiglu_weights<Scalar> grad,
                 std::span<const dispatch_row<Scalar>> rows, index first, const row_matrix<Scalar>* keep_gate,
                 const row_matrix<Scalar>* keep_up, row_matrix<Scalar>& dots_out) {
    const auto n = static_cast<index>(rows.size());
    if (n == 0) return;
    detail::gather_rows<Scalar>(x, rows, s.x);
    detail::gather_rows<Scalar>(dy, rows, s.dy);
    if (keep_gate) {
      s.gate = keep_gate->middleRows(first, n);
      s.up = keep_up->middleRows(first, n);
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
    run(weights.expert(e), grads.expert(e), plan.rows_of_expert(e), plan.expert_offsets[static_cast<std::size_t>(e)],
        saved ? &saved->expert_gate : nullptr, saved ? &saved->expert_up : nullptr, dw);
  for (index j = 0; j < d.groups; ++j)
    run(weights.adjugate(j), grads.adjugate(j), plan.rows_of_adjugate(j),
        plan.adjugate_offsets[static_cast<std::size_t>(j)], saved ? &saved->adjugate_gate : nullptr,
        saved ? &saved->adjugate_up : nullptr, group_dots);

  // c_j = Σ of the group's picked weights, so each pick of group j receives λ ⟨dy, A_j(x)⟩.
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

}  // namespace cpu
GROVE_END_NAMESPACE
