#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "grove/weights/layer_weights.hpp"
#include "grove/weights/swiglu.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/plan/saved_activations.hpp"

GROVE_BEGIN_NAMESPACE
// The per-batch pieces of the plain (Eigen) expert pass, shared by the simple forward, the
// forward that saves activations, and backward: one expert or adjugate over its dispatched rows.
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

/// One item of the plain expert pass: a routed expert or an adjugate over its rows of a plan.
template <class Scalar>
struct plain_item {
  bool adjugate;  ///< an adjugate: its weights and gradients are group `id`'s; else routed expert `id`'s
  index id;
  std::span<const dispatch_row<Scalar>> rows;
  std::size_t saved_start;  ///< where its rows' g and u start in the saved activations (0 without)

  /// The item's MLP in `weights` (the layer's weights or its gradient buffers).
  template <class T>
  [[nodiscard]] swiglu_weights<T> of(const layer_weights<T>& weights) const {
    return adjugate ? weights.adjugate(id) : weights.expert(id);
  }
};

/// Calls fn(plain_item) for every item of the plain expert pass of `plan`, in its fixed order:
/// the routed experts by index, then the adjugates as the plan's mode says: once per token each
/// activated adjugate over its group rows (weight λ·c_j); once per pick, for each routed expert
/// by index, its group's adjugate over the expert's picks (weight λ·w_s, rows formed in
/// `pick_rows`, reused from item to item); none, no adjugate. The plain forward, the saving
/// forward and backward all walk the plan through this, so they see the same items in the same
/// order. `saved` (or nullptr) locates each item's block of saved activations.
template <class Scalar, class Fn>
void for_each_plain_item(const routing_plan<Scalar>& plan, const saved_activations<Scalar>* saved,
                         std::vector<dispatch_row<Scalar>>& pick_rows, Fn&& fn) {
  for (index e = 0; e < plan.experts; ++e)
    fn(plain_item<Scalar>{false, e, plan.rows_of_expert(e), saved ? saved->expert_start(e) : 0});
  if (plan.adjugates == adjugate_mode::once_per_token) {
    for (index j = 0; j < plan.groups; ++j)
      fn(plain_item<Scalar>{true, j, plan.rows_of_adjugate(j), saved ? saved->adjugate_start(j) : 0});
  } else if (plan.adjugates == adjugate_mode::once_per_pick) {
    for (index e = 0; e < plan.experts; ++e) {
      per_pick_adjugate_rows<Scalar>(plan.rows_of_expert(e), static_cast<Scalar>(plan.scale), pick_rows);
      fn(plain_item<Scalar>{true, e / plan.group_size, pick_rows, saved ? saved->pick_start(e) : 0});
    }
  }
}

}  // namespace detail
GROVE_END_NAMESPACE
