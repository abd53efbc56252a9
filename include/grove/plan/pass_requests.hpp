#pragma once

// What a runner is asked to do for one batch: the experts' forward (optionally keeping what
// backward needs) and their backward, each on a routing plan. One struct per call, so the
// argument lists are written once, here, and not again at every layer of the call chain.

#include <type_traits>

#include "grove/formats/format_traits.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/saved_activations.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

/// What a forward writes: y, or the per-group partials that a combine (plan/combine.hpp) sums
/// into y later, elsewhere (in another process, for expert parallelism).
enum class forward_output {
  combined,        ///< y [T, H]
  group_partials,  ///< p [plan.group_row_count(), H]: row r is p(t, g) of the plan's group row r
};

/// The experts' forward of one batch: y = Σ_s w_s E_{e_s}(x) + λ Σ_j c_j A_j(x) over `plan`
/// (docs/math.md, step 6), summed in the canonical order (plan/combine.hpp), y written, not
/// accumulated. With `saved` set it is a training forward: the SwiGLU pre-activations are kept
/// there for backward (resized by the runner).
template <class Weight>
struct expert_forward {
  using scalar = activation_t<Weight>;
  const weights_view<Weight>& weights;
  const routing_plan<scalar>& plan;
  const_rows_ref<scalar> x;  ///< [T, H]
  rows_ref<scalar> y;        ///< [T, H], or the partials (see output)
  saved_activations<scalar>* saved = nullptr;
  forward_output output = forward_output::combined;
};

/// The experts' backward of one batch (docs/math.md, "Backward"): the routed experts' and the
/// adjugates' weight gradients are ADDED to `grads`, their share of ∂L/∂x is ADDED to `dx`, and
/// `dw` [T, k] receives ∂L/∂w_s = ⟨dy, E_{e_s}(x)⟩ + λ ⟨dy, A_{e_s / group_size}(x)⟩. With
/// `saved` (from a training forward of this plan) g and u are read from it, otherwise they are
/// recomputed; both give the same bits. dx must not share memory with x or dy.
template <class Scalar>
struct expert_backward {
  const weights_view<Scalar>& weights;
  const routing_plan<Scalar>& plan;
  const_rows_ref<Scalar> x;   ///< [T, H]
  const_rows_ref<Scalar> dy;  ///< ∂L/∂y, [T, H]
  const saved_activations<Scalar>* saved;
  const weights_span<Scalar>& grads;
  rows_ref<Scalar> dx;      ///< [T, H], accumulated into
  row_matrix<Scalar>& dw;   ///< [T, k], resized and written
};

GROVE_END_NAMESPACE
