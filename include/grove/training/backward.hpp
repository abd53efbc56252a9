#pragma once

#include <type_traits>
#include <utility>

#include "grove/config/layer_config.hpp"
#include "grove/error.hpp"
#include "grove/experts/layer_parameters.hpp"
#include "grove/experts/layer_weights.hpp"
#include "grove/experts/tensor_types.hpp"
#include "grove/kernels/cpu/expert_backward.hpp"
#include "grove/layer/layer.hpp"
#include "grove/router/routing_plan.hpp"
#include "grove/training/router_backward.hpp"

GROVE_BEGIN_NAMESPACE

/// The SwiGLU pre-activations a training forward keeps for backward (see cpu::saved_activations).
template <class Scalar>
using saved_activations = cpu::saved_activations<Scalar>;

/// Forward of the experts of `plan` (y written, as cpu::forward_experts) that also fills `saved`
/// for backward. Use it instead of the plain forward when memory allows; backward then skips
/// the gate/up products.
template <class Scalar>
void forward_saving(const std::type_identity_t<weights_view<Scalar>>& weights, const routing_plan<Scalar>& plan,
                    std::type_identity_t<const_rows_ref<Scalar>> x, std::type_identity_t<rows_ref<Scalar>> y,
                    saved_activations<Scalar>& saved) {
  cpu::forward_experts_saving<Scalar>(weights, plan, x, y, saved);
}

/// Backward of a whole Grove layer on the CPU from the routing plan its forward made
/// (docs/math.md, "Backward"; docs/training.md). Given the batch x [T, H] and dy = ∂L/∂y [T, H]:
///   - the gradients of the router, of every routed expert and of every adjugate (gate, up,
///     down) are ADDED to `grads` (same dims as the layer; e.g. layer_parameters::span()), so
///     micro-batches sum; the selection bias gets no gradient and grads' bias is left alone;
///   - ∂L/∂x is ADDED to `dx` [T, H] (zero it first for a fresh gradient; a residual
///     connection can pass its own gradient buffer).
/// With `saved` from forward_saving for the same plan, the gate/up products are taken from
/// it; with nullptr they are recomputed. Both give bit-identical results.
template <class Scalar>
void backward(const std::type_identity_t<weights_view<Scalar>>& weights, const routing_plan<Scalar>& plan,
              std::type_identity_t<const_rows_ref<Scalar>> x, std::type_identity_t<const_rows_ref<Scalar>> dy,
              const std::type_identity_t<weights_span<Scalar>>& grads, std::type_identity_t<rows_ref<Scalar>> dx,
              const saved_activations<Scalar>* saved = nullptr) {
  weights.require_complete();
  grads.require_complete();
  row_matrix<Scalar> dw, dl;
  cpu::backward_experts<Scalar>(weights, plan, x, dy, saved, grads, dx, dw);
  routing_logit_gradient(plan, dw, dl);
  router_backward<Scalar>(weights, x, dl, grads, dx);
}

/// Fresh gradients of one batch: the weights' in the layer's flat layout (walk them with
/// `weights.view().for_each_tensor` for checkpoint names) and the input's.
template <class Scalar>
struct layer_gradients {
  layer_parameters<Scalar> weights;  ///< ∂L/∂W, same dims and order as the layer; bias zero
  row_matrix<Scalar> input;          ///< ∂L/∂x, [T, H]
};

/// backward() into zero-initialised buffers.
template <class Scalar>
[[nodiscard]] layer_gradients<Scalar> gradients(const std::type_identity_t<weights_view<Scalar>>& weights,
                                                const routing_plan<Scalar>& plan,
                                                std::type_identity_t<const_rows_ref<Scalar>> x,
                                                std::type_identity_t<const_rows_ref<Scalar>> dy,
                                                const saved_activations<Scalar>* saved = nullptr) {
  layer_gradients<Scalar> g{layer_parameters<Scalar>(weights.dims()),
                            row_matrix<Scalar>::Zero(x.rows(), weights.dims().hidden)};
  backward<Scalar>(weights, plan, x, dy, g.weights.span(), g.input, saved);
  return g;
}

/// Everything a training forward of a layer produces: the plan (backward needs it), y and,
/// when asked for, the saved activations.
template <class Scalar>
struct training_forward {
  routing_plan<Scalar> plan;
  row_matrix<Scalar> y;
  saved_activations<Scalar> saved;  ///< empty when activations were not kept
};

/// Routes x and runs the experts of `layer`, keeping the pre-activations when
/// `keep_activations` (otherwise backward recomputes them).
template <layer_configuration Config>
[[nodiscard]] training_forward<typename Config::scalar> forward_for_training(const layer<Config>& layer,
                                                                             const_rows_ref<typename Config::scalar> x,
                                                                             bool keep_activations = true) {
  using Scalar = typename Config::scalar;
  training_forward<Scalar> f;
  f.plan = layer.route(x);
  f.y.resize(x.rows(), layer.dims().hidden);
  if (keep_activations)
    forward_saving<Scalar>(layer.weights(), f.plan, x, f.y, f.saved);
  else
    layer.forward(f.plan, x, f.y);
  return f;
}

/// backward() for a layer and what forward_for_training returned.
template <layer_configuration Config>
void backward(const layer<Config>& layer, const training_forward<typename Config::scalar>& forward,
              const_rows_ref<typename Config::scalar> x, const_rows_ref<typename Config::scalar> dy,
              const weights_span<typename Config::scalar>& grads, rows_ref<typename Config::scalar> dx) {
  using Scalar = typename Config::scalar;
  detail::require(forward.plan.top_k == layer.config().top_k() && forward.plan.scale == layer.config().scale(),
                  "grove: the routing plan was made with another top-k or scale than this layer's");
  backward<Scalar>(layer.weights(), forward.plan, x, dy, grads, dx, forward.saved.empty() ? nullptr : &forward.saved);
}

GROVE_END_NAMESPACE
