#pragma once

#include <type_traits>
#include <utility>

#include "grove/config/layer_config.hpp"
#include "grove/error.hpp"
#include "grove/weights/layer_parameters.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/layer/layer.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/plan/saved_activations.hpp"
#include "grove/runners/default_runner.hpp"
#include "grove/runners/runner.hpp"
#include "grove/training/router_backward.hpp"

GROVE_BEGIN_NAMESPACE

/// Forward of the experts of `plan` on `runner` (y written) that also fills `saved` for
/// backward. Use it instead of the plain forward when memory allows; backward then skips the
/// gate/up products.
template <class Scalar>
void forward_saving(runner& runner, const std::type_identity_t<weights_view<Scalar>>& weights,
                    const routing_plan<Scalar>& plan, std::type_identity_t<const_rows_ref<Scalar>> x,
                    std::type_identity_t<rows_ref<Scalar>> y, saved_activations<Scalar>& saved) {
  runner.forward_saving<Scalar>(weights, plan, x, y, saved);
}

/// Backward of a whole Grove layer from the routing plan its forward made, on `runner`
/// (docs/math.md, "Backward"; docs/training.md). Given the batch x [T, H] and dy = ∂L/∂y [T, H]:
///   - the gradients of the router, of every routed expert and of every adjugate (gate, up,
///     down) are ADDED to `grads` (same dims as the layer; e.g. layer_parameters::span()), so
///     micro-batches sum; the selection bias gets no gradient and grads' bias is left alone;
///   - ∂L/∂x is ADDED to `dx` [T, H] (zero it first for a fresh gradient; a residual
///     connection can pass its own gradient buffer).
/// With `saved` from forward_saving for the same plan, the gate/up products are taken from
/// it; with nullptr they are recomputed. Both give bit-identical results.
template <class Scalar>
void backward(runner& runner, const std::type_identity_t<weights_view<Scalar>>& weights,
              const routing_plan<Scalar>& plan, std::type_identity_t<const_rows_ref<Scalar>> x,
              std::type_identity_t<const_rows_ref<Scalar>> dy, const std::type_identity_t<weights_span<Scalar>>& grads,
              std::type_identity_t<rows_ref<Scalar>> dx, const saved_activations<Scalar>* saved = nullptr) {
  weights.require_complete();
  grads.require_complete();
  row_matrix<Scalar> dw, dl;
  runner.backward(expert_backward<Scalar>{weights, plan, x, dy, saved, grads, dx, dw});
  routing_logit_gradient(plan, dw, dl);
  router_backward<Scalar>(weights, x, dl, grads, dx);
}

/// forward_saving on default_runner().
template <class Scalar>
void forward_saving(const std::type_identity_t<weights_view<Scalar>>& weights, const routing_plan<Scalar>& plan,
                    std::type_identity_t<const_rows_ref<Scalar>> x, std::type_identity_t<rows_ref<Scalar>> y,
                    saved_activations<Scalar>& saved) {
  forward_saving<Scalar>(*default_runner(), weights, plan, x, y, saved);
}

/// backward on default_runner().
template <class Scalar>
void backward(const std::type_identity_t<weights_view<Scalar>>& weights, const routing_plan<Scalar>& plan,
              std::type_identity_t<const_rows_ref<Scalar>> x, std::type_identity_t<const_rows_ref<Scalar>> dy,
              const std::type_identity_t<weights_span<Scalar>>& grads, std::type_identity_t<rows_ref<Scalar>> dx,
              const saved_activations<Scalar>* saved = nullptr) {
  backward<Scalar>(*default_runner(), weights, plan, x, dy, grads, dx, saved);
}

/// Fresh gradients of one batch: the weights' in the layer's flat layout (walk them with
/// `weights.view().for_each_tensor` for checkpoint names) and the input's.
template <class Scalar>
struct layer_gradients {
  layer_parameters<Scalar> weights;  ///< ∂L/∂W, same dims and order as the layer; bias zero
  row_matrix<Scalar> input;          ///< ∂L/∂x, [T, H]
};

/// backward() into zero-initialised buffers, on `runner`.
template <class Scalar>
[[nodiscard]] layer_gradients<Scalar> gradients(runner& runner, const std::type_identity_t<weights_view<Scalar>>& weights,
                                                const routing_plan<Scalar>& plan,
                                                std::type_identity_t<const_rows_ref<Scalar>> x,
                                                std::type_identity_t<const_rows_ref<Scalar>> dy,
                                                const saved_activations<Scalar>* saved = nullptr) {
  layer_gradients<Scalar> g{layer_parameters<Scalar>(weights.dims()),
                            row_matrix<Scalar>::Zero(x.rows(), weights.dims().hidden)};
  backward<Scalar>(runner, weights, plan, x, dy, g.weights.span(), g.input, saved);
  return g;
}

/// gradients() on default_runner().
template <class Scalar>
[[nodiscard]] layer_gradients<Scalar> gradients(const std::type_identity_t<weights_view<Scalar>>& weights,
                                                const routing_plan<Scalar>& plan,
                                                std::type_identity_t<const_rows_ref<Scalar>> x,
                                                std::type_identity_t<const_rows_ref<Scalar>> dy,
                                                const saved_activations<Scalar>* saved = nullptr) {
  return gradients<Scalar>(*default_runner(), weights, plan, x, dy, saved);
}

/// Everything a training forward of a layer produces: the plan (backward needs it), y and,
/// when asked for, the saved activations.
template <class Scalar>
struct training_forward {
  routing_plan<Scalar> plan;
  row_matrix<Scalar> y;
  saved_activations<Scalar> saved;  ///< empty when activations were not kept
};

/// Routes x and runs the experts of `layer` on its runner, keeping the pre-activations when
/// `keep_activations` (otherwise backward recomputes them). The layer's format must have a
/// backward (f32, f64).
template <layer_configuration Config>
  requires(info_of<typename Config::scalar>().trainable)
[[nodiscard]] training_forward<typename Config::scalar> forward_for_training(const layer<Config>& layer,
                                                                             const_rows_ref<typename Config::scalar> x,
                                                                             bool keep_activations = true) {
  using Scalar = typename Config::scalar;
  training_forward<Scalar> f;
  f.plan = layer.route(x);
  f.y.resize(x.rows(), layer.dims().hidden);
  if (keep_activations)
    layer.forward_saving(f.plan, x, f.y, f.saved);
  else
    layer.forward(f.plan, x, f.y);
  return f;
}

/// backward() for a layer and what forward_for_training returned, on the layer's runner.
template <layer_configuration Config>
  requires(info_of<typename Config::scalar>().trainable)
void backward(const layer<Config>& layer, const training_forward<typename Config::scalar>& forward,
              const_rows_ref<typename Config::scalar> x, const_rows_ref<typename Config::scalar> dy,
              const weights_span<typename Config::scalar>& grads, rows_ref<typename Config::scalar> dx) {
  using Scalar = typename Config::scalar;
  layer.require_own_plan(forward.plan);
  backward<Scalar>(layer.runner(), layer.weights(), forward.plan, x, dy, grads, dx, forward.saved.empty() ? nullptr : &forward.saved);
}

GROVE_END_NAMESPACE
