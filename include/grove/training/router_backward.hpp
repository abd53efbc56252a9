#pragma once

#include <string>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

/// Gradient of the router logits from the gradients `dw` [T, k] of the routing weights
/// (docs/math.md, "Backward"). The weights are the softmax of the k picked logits, so
///   dl_{e_s} = w_s (dw_s − Σ_r w_r dw_r),  dl_e = 0 for experts not picked.
/// Selection (top-k) and the selection bias get no gradient. Writes `dl` [T, E].
template <class Scalar>
void routing_logit_gradient(const routing_plan<Scalar>& plan, const row_matrix<Scalar>& dw, row_matrix<Scalar>& dl) {
  detail::require(dw.rows() == plan.tokens && dw.cols() == plan.top_k,
                  "grove: routing weight gradient dw is [" + std::to_string(dw.rows()) + ", " +
                      std::to_string(dw.cols()) + "] but must be [T, k] = [" + std::to_string(plan.tokens) + ", " +
                      std::to_string(plan.top_k) + "]");
  dl.setZero(plan.tokens, plan.experts);
  for (index t = 0; t < plan.tokens; ++t) {
    Scalar mean = 0;
    for (index s = 0; s < plan.top_k; ++s) mean += plan.topk_weights(t, s) * dw(t, s);
    for (index s = 0; s < plan.top_k; ++s) dl(t, plan.topk_ids(t, s)) = plan.topk_weights(t, s) * (dw(t, s) - mean);
  }
}

/// Backward of the router's linear map l = W_r x for a batch: accumulates ∂W_r += dlᵀ x into
/// `grads` and dx += dl W_r into `dx`. `dl` is [T, E] (from routing_logit_gradient, an
/// auxiliary loss, or both summed).
template <class Scalar>
void router_backward(const std::type_identity_t<weights_view<Scalar>>& weights,
                     std::type_identity_t<const_rows_ref<Scalar>> x, const row_matrix<Scalar>& dl,
                     const std::type_identity_t<weights_span<Scalar>>& grads,
                     std::type_identity_t<rows_ref<Scalar>> dx) {
  const layer_dims& d = weights.dims();
  detail::require(dl.rows() == x.rows() && dl.cols() == d.experts && x.cols() == d.hidden && dx.rows() == x.rows() &&
                      dx.cols() == d.hidden,
                  "grove: router backward wants x and dx [T, H] and dl [T, E] with T = " + std::to_string(x.rows()) +
                      ", H = " + std::to_string(d.hidden) + ", E = " + std::to_string(d.experts) + "; got dl [" +
                      std::to_string(dl.rows()) + ", " + std::to_string(dl.cols()) + "], dx [" +
                      std::to_string(dx.rows()) + ", " + std::to_string(dx.cols()) + "]");
  detail::require(grads.dims() == d, "grove: the gradient buffers have other dimensions than the layer");
  grads.router().noalias() += dl.transpose() * x;
  dx.noalias() += dl * weights.router();
}

GROVE_END_NAMESPACE
