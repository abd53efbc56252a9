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

namespace detail {

/// Copies the rows a dispatch list names (tokens, in the list's order) into `out`, [n, cols].
template <class Scalar>
void gather_rows(const_rows_ref<Scalar> source, std::span<const dispatch_row<Scalar>> rows, row_matrix<Scalar>& out) {
  out.resize(static_cast<index>(rows.size()), source.cols());
  for (std::size_t i = 0; i < rows.size(); ++i) out.row(static_cast<index>(i)) = source.row(rows[i].token);
}

/// The SwiGLU pre-activations of a gathered batch: g = X Gᵀ, u = X Uᵀ (docs/math.md, step 4).
/// Forward-with-save and backward's recomputation both call this, so they agree bit for bit.
template <class Scalar>
void swiglu_pre_activations(const swiglu_weights<const Scalar>& mlp, const row_matrix<Scalar>& x,
                            row_matrix<Scalar>& gate, row_matrix<Scalar>& up) {
  gate.noalias() = x * mlp.gate.transpose();
  up.noalias() = x * mlp.up.transpose();
}

/// silu(g), elementwise.
template <class Scalar>
void silu_of(const row_matrix<Scalar>& gate, row_matrix<Scalar>& out) {
  out = gate.unaryExpr([](Scalar z) { return silu(z); });
}

/// Scratch buffers of one SwiGLU batch, reused across experts to avoid reallocating.
template <class Scalar>
struct swiglu_batch_scratch {
  row_matrix<Scalar> x, dy, gate, up, act, hidden, back, dgate, dup, dx;
};

/// Forward of one expert (or adjugate) over its dispatched rows: gathers them into `s.x`, forms
/// the pre-activations `s.gate`, `s.up` and `s.hidden` = silu(g) ⊙ u, and adds
/// weight · D h to each row's token of y (docs/math.md, steps 4 and 6).
template <class Scalar>
void swiglu_batch_forward(const swiglu_weights<const Scalar>& mlp, std::span<const dispatch_row<Scalar>> rows,
                          const_rows_ref<Scalar> x, swiglu_batch_scratch<Scalar>& s, rows_ref<Scalar> y) {
  gather_rows<Scalar>(x, rows, s.x);
  swiglu_pre_activations(mlp, s.x, s.gate, s.up);
  silu_of(s.gate, s.act);
  s.hidden = s.act.cwiseProduct(s.up);
  s.back.noalias() = s.hidden * mlp.down.transpose();  // [n, H]: the expert's outputs
  for (std::size_t i = 0; i < rows.size(); ++i)
    y.row(rows[i].token) += rows[i].weight * s.back.row(static_cast<index>(i));
}

/// Backward of one expert (or adjugate) over its dispatched rows (docs/math.md, "Backward"),
/// given the gathered inputs `s.x`, upstream gradients `s.dy` and pre-activations `s.gate`,
/// `s.up`. With w the row's routing weight (w_s, or λ·c_j):
///   r = D_eᵀ dy  (per row),  ⟨dy, E_e(x)⟩ = ⟨r, h⟩  → `dots`,
///   dh = w·r;  ∂D_e += (w·dy)ᵀ h;  dg = dh ⊙ u ⊙ silu'(g);  du = dh ⊙ silu(g);
///   ∂G_e += dgᵀ X;  ∂U_e += duᵀ X;  dx[token] += dg G_e + du U_e.
/// Getting ⟨dy, E_e(x)⟩ from r avoids keeping or recomputing the expert's [n, H] output.
template <class Scalar>
void swiglu_batch_backward(const swiglu_weights<const Scalar>& mlp, swiglu_weights<Scalar> grad,
                           std::span<const dispatch_row<Scalar>> rows, swiglu_batch_scratch<Scalar>& s,
                           rows_ref<Scalar> dx, std::vector<Scalar>& dots) {
  const auto n = static_cast<index>(rows.size());
  silu_of(s.gate, s.act);
  s.hidden = s.act.cwiseProduct(s.up);
  s.back.noalias() = s.dy * mlp.down;  // [n, inter]: row i is D_eᵀ dy_i
  dots.resize(rows.size());
  for (index i = 0; i < n; ++i) {
    const Scalar w = rows[static_cast<std::size_t>(i)].weight;
    dots[static_cast<std::size_t>(i)] = s.back.row(i).dot(s.hidden.row(i));
    s.back.row(i) *= w;  // now dh
    s.dy.row(i) *= w;    // now do = w·dy
  }
  grad.down.noalias() += s.dy.transpose() * s.hidden;
  s.dgate = s.back.cwiseProduct(s.up).cwiseProduct(s.gate.unaryExpr([](Scalar z) { return silu_derivative(z); }));
  s.dup = s.back.cwiseProduct(s.act);
  grad.gate.noalias() += s.dgate.transpose() * s.x;
  grad.up.noalias() += s.dup.transpose() * s.x;
  s.dx.noalias() = s.dgate * mlp.gate;
  s.dx.noalias() += s.dup * mlp.up;
  for (index i = 0; i < n; ++i) dx.row(rows[static_cast<std::size_t>(i)].token) += s.dx.row(i);
}

template <class Scalar>
void require_batch_shapes(const layer_dims& d, const routing_plan<Scalar>& plan, index rows, index cols,
                          const char* what) {
  require(plan.experts == d.experts && plan.groups == d.groups && plan.group_size == d.group_size(),
          "grove: the routing plan was made for another layer (E or G differ)");
  require(rows == plan.tokens && cols == d.hidden,
          std::string("grove: ") + what + " is [" + std::to_string(rows) + ", " + std::to_string(cols) +
              "] but the plan and layer expect [" + std::to_string(plan.tokens) + ", " + std::to_string(d.hidden) +
              "]");
}

}  // namespace detail

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
