#pragma once

#include <algorithm>
#include <string>
#include <vector>
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

/// The router's weight gradient alone: ∂W_r[e] += Σ_t dl[t][e]·x[t] in the documented order
/// (over tokens ascending, from +0, then added). An expert-parallel run calls it on every rank's
/// dl and x rows gathered in rank order, which is the single process's batch. Shapes as in
/// router_backward (checked there).
template <class Scalar>
void router_weight_gradient(std::type_identity_t<const_rows_ref<Scalar>> x, const row_matrix<Scalar>& dl,
                            const std::type_identity_t<weights_span<Scalar>>& grads) {
  const index T = x.rows(), E = dl.cols(), H = x.cols();
  auto grad = grads.router();
  std::vector<Scalar> sum(static_cast<std::size_t>(H));
  for (index e = 0; e < E; ++e) {
    std::fill(sum.begin(), sum.end(), Scalar(0));
    for (index t = 0; t < T; ++t) {
      const Scalar g = dl(t, e);
      if (g == Scalar(0)) continue;
      const Scalar* xt = x.data() + t * x.outerStride();
      for (index c = 0; c < H; ++c) sum[static_cast<std::size_t>(c)] += g * xt[c];
    }
    Scalar* out = grad.data() + e * H;
    for (index c = 0; c < H; ++c) out[c] += sum[static_cast<std::size_t>(c)];
  }
}

/// The router's share of ∂L/∂x alone: dx[t] += Σ_e dl[t][e]·W_r[e] over experts ascending. Per
/// token, so each rank of an expert-parallel run does its own tokens.
template <class Scalar>
void router_input_gradient(const std::type_identity_t<weights_view<Scalar>>& weights, const row_matrix<Scalar>& dl,
                           std::type_identity_t<rows_ref<Scalar>> dx) {
  const index T = dl.rows(), E = dl.cols(), H = weights.dims().hidden;
  const auto router = weights.router();
  for (index t = 0; t < T; ++t) {
    Scalar* out = dx.data() + t * dx.outerStride();
    for (index e = 0; e < E; ++e) {
      const Scalar g = dl(t, e);
      if (g == Scalar(0)) continue;
      const Scalar* w = router.data() + e * H;
      for (index c = 0; c < H; ++c) out[c] += g * w[c];
    }
  }
}

/// Backward of the router's linear map l = W_r x for a batch: accumulates ∂W_r += dlᵀ x into
/// `grads` and dx += dl W_r into `dx`. `dl` is [T, E] (from routing_logit_gradient, an
/// auxiliary loss, or both summed).
///
/// The reduction order is fixed and documented (docs/routing.md, "Batch invariance"), so that an
/// expert-parallel run reproduces it by gathering the rows it needs in token order:
///   ∂W_r[e] += (…((+0 + dl[t1][e]·x[t1]) + dl[t2][e]·x[t2]) + …)  over tokens ascending,
///   dx[t]    = (…((dx[t] + dl[t][e1]·W_r[e1]) + dl[t][e2]·W_r[e2]) + …)  over experts ascending,
/// terms with dl = 0 skipped (they add ±0: no bit changes for finite x). Whether a product and
/// its add fuse into one fma is the compiler's choice (-ffp-contract), fixed for a build.
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
  router_weight_gradient<Scalar>(x, dl, grads);
  router_input_gradient<Scalar>(weights, dl, dx);
}

GROVE_END_NAMESPACE
