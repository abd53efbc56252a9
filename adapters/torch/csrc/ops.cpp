// grove's torch operators (docs/torch.md): TORCH_LIBRARY(grove, ...) with CPU implementations.
//
//   torch.ops.grove.forward(x, router, bias, experts, adjugates, top_k, scale, keep_for_backward)
//       -> (y, router_logits, topk_ids, topk_weights, context)
//   torch.ops.grove.backward(context, x, router, experts, adjugates, dy, d_router_logits, d_topk_weights)
//       -> (dx, d_router, d_experts, d_adjugates)
//   torch.ops.grove.load_balancing_loss(router_logits, top_k) -> (loss, d_loss/d_logits)
//   torch.ops.grove.update_selection_bias(bias, counts, rate, rule) -> bool
//
// The operators take the released block's tensors one per projection (tensor_views.hpp), view
// them without copies and run grove's fused pass on a cpu_runner with torch's thread count.
// The context keeps the routing plan (and the saved activations of a training forward) for the
// backward. A CUDA registration would add TORCH_LIBRARY_IMPL(grove, CUDA, ...) with the same
// schemas on grove::cuda_runner and cuda::device_router; it is not built here.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <grove/grove.hpp>
#include <grove/training.hpp>

#include "layer_context.hpp"
#include "tensor_views.hpp"

namespace grove_torch {
namespace {

using at::Tensor;
using grove::index;

/// One cpu_runner per thread count, made on first use: torch.set_num_threads(n) picks grove's
/// thread count too. A runner runs one call at a time; calls with the same count from two
/// Python threads take turns on it.
grove::runner& runner_for_torch_threads() {
  static std::mutex mutex;
  static std::map<int, std::shared_ptr<grove::cpu_runner>> runners;
  const int threads = std::max(1, at::get_num_threads());
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = runners[threads];
  if (!slot) {
    grove::cpu_runner_options options;
    options.threads = threads;
    slot = std::make_shared<grove::cpu_runner>(options);
  }
  return *slot;
}

detail::layer_tensors tensors_of(const Tensor& router, const c10::optional<Tensor>& bias, std::vector<Tensor> experts,
                                 std::vector<Tensor> adjugates) {
  detail::layer_tensors w;
  w.router = router;
  if (bias) w.bias = *bias;
  w.experts = std::move(experts);
  w.adjugates = std::move(adjugates);
  return w;
}

Tensor to_tensor(const auto& matrix, at::ScalarType dtype) {
  using T = typename std::decay_t<decltype(matrix)>::Scalar;
  Tensor out = at::empty({matrix.rows(), matrix.cols()}, at::TensorOptions().dtype(dtype));
  auto* dst = reinterpret_cast<T*>(out.data_ptr());
  std::copy(matrix.data(), matrix.data() + matrix.size(), dst);
  return out;
}

template <class W>
std::tuple<Tensor, Tensor, Tensor, Tensor, c10::intrusive_ptr<layer_context>> forward_as(
    const detail::layer_tensors& w, const grove::layer_dims& d, const Tensor& x, int64_t top_k, double scale,
    bool keep_for_backward) {
  using S = grove::activation_t<W>;
  constexpr at::ScalarType act = detail::dtype_of<S>();
  grove::detail::require(x.dim() == 2, "grove_torch: input x must be [T, H] (the module flattens [batch, seq, H]); got " +
                                           detail::shape_of(x));
  detail::require_matrix(x, "x (the input)", act, x.size(0), d.hidden);
  const grove::weights_view<W> weights = detail::view_of<W>(w, d);

  auto context = c10::make_intrusive<layer_context>();
  context->weight_dtype = detail::dtype_of<W>();
  grove::routing_plan<S>& plan = context->plan<S>();
  const auto xs = detail::const_rows_of<S>(x);
  const grove::routing_options routing{top_k, scale};
  if constexpr (std::is_same_v<W, S>) {
    grove::route_into(plan, weights, routing, xs);
  } else {
    // BF16 weights route in fp32, from an exact fp32 copy of the router and the bias.
    const Tensor router = w.router.to(at::kFloat);
    const Tensor bias = w.bias && w.bias->defined() ? w.bias->to(at::kFloat) : Tensor();
    grove::weights_view<float> routing_view(d);
    routing_view.set_router(router.data_ptr<float>());
    if (bias.defined()) routing_view.set_bias(bias.data_ptr<float>());
    grove::route_into(plan, routing_view, routing, xs);
  }

  Tensor y = at::empty({x.size(0), d.hidden}, at::TensorOptions().dtype(act));
  auto ys = detail::rows_of<S>(y);
  grove::runner& runner = runner_for_torch_threads();
  if constexpr (grove::info_of<W>().trainable) {
    if (keep_for_backward) {
      runner.forward(grove::expert_forward<W>{weights, plan, xs, ys, &context->saved<S>()});
      context->has_saved = true;
    } else {
      runner.forward(grove::expert_forward<W>{weights, plan, xs, ys});
    }
  } else {
    runner.forward(grove::expert_forward<W>{weights, plan, xs, ys});
  }
  Tensor ids = to_tensor(plan.topk_ids, at::kInt).to(at::kLong);  // torch's index dtype
  return {y, to_tensor(plan.logits, act), ids, to_tensor(plan.topk_weights, act), context};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, c10::intrusive_ptr<layer_context>> forward(
    const Tensor& x, const Tensor& router, const c10::optional<Tensor>& bias, std::vector<Tensor> experts,
    std::vector<Tensor> adjugates, int64_t top_k, double scale, bool keep_for_backward) {
  const detail::layer_tensors w = tensors_of(router, bias, std::move(experts), std::move(adjugates));
  const grove::layer_dims d = detail::dims_of(w);
  grove::detail::require(top_k >= 1 && top_k <= d.experts, "grove_torch: num_experts_per_tok k = " +
                                                              std::to_string(top_k) + " must lie in [1, E = " +
                                                              std::to_string(d.experts) + "]");
  switch (router.scalar_type()) {
    case at::kFloat: return forward_as<float>(w, d, x, top_k, scale, keep_for_backward);
    case at::kDouble: return forward_as<double>(w, d, x, top_k, scale, keep_for_backward);
    case at::kBFloat16: return forward_as<grove::bf16>(w, d, x, top_k, scale, keep_for_backward);
    default:
      throw grove::error("grove_torch: weights of dtype " + std::string(c10::toString(router.scalar_type())) +
                         " are not supported (float32 and float64 train; bfloat16 runs forward only)");
  }
}

template <class S>
std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> backward_as(
    layer_context& context, const detail::layer_tensors& w, const grove::layer_dims& d, const Tensor& x,
    const Tensor& dy, const c10::optional<Tensor>& d_logits, const c10::optional<Tensor>& d_topk_weights) {
  constexpr at::ScalarType dtype = detail::dtype_of<S>();
  const grove::routing_plan<S>& plan = context.plan<S>();
  detail::require_matrix(x, "x (the input)", dtype, plan.tokens, d.hidden);
  detail::require_matrix(dy, "the gradient of y", dtype, plan.tokens, d.hidden);
  grove::detail::require(plan.experts == d.experts && plan.groups == d.groups,
                         "grove_torch: backward got other weights than the forward it follows");
  const grove::weights_view<S> weights = detail::view_of<S>(w, d);
  std::vector<index> touched;  // groups with at least one row in this batch, ascending
  for (index j = 0; j < d.groups; ++j)
    if (!plan.rows_of_adjugate(j).empty()) touched.push_back(j);
  detail::layer_gradients<S> grads(w, d, touched);
  Tensor dx = at::zeros({plan.tokens, d.hidden}, at::TensorOptions().dtype(dtype));
  auto dxs = detail::rows_of<S>(dx);
  const auto xs = detail::const_rows_of<S>(x);

  grove::row_matrix<S> dw = grove::row_matrix<S>::Zero(plan.tokens, plan.top_k), dl;
  if (!touched.empty())
    runner_for_torch_threads().backward(grove::expert_backward<S>{
        weights, plan, xs, detail::const_rows_of<S>(dy), context.has_saved ? &context.saved<S>() : nullptr,
        grads.span, dxs, dw});
  if (d_topk_weights && d_topk_weights->defined()) {
    // topk_weights is an output too: its gradient joins dw = ∂L/∂w before the softmax backward.
    detail::require_matrix(*d_topk_weights, "the gradient of topk_weights", dtype, plan.tokens, plan.top_k);
    dw += detail::const_rows_of<S>(*d_topk_weights);
  }
  grove::routing_logit_gradient(plan, dw, dl);
  if (d_logits && d_logits->defined()) {
    // router_logits is an output (the auxiliary loss reads it): its gradient joins the router's.
    detail::require_matrix(*d_logits, "the gradient of router_logits", dtype, plan.tokens, d.experts);
    dl += detail::const_rows_of<S>(*d_logits);
  }
  grove::router_backward<S>(weights, xs, dl, grads.span, dxs);
  return {dx, grads.router, grads.experts, grads.adjugates};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> backward(
    const c10::intrusive_ptr<layer_context>& context, const Tensor& x, const Tensor& router,
    std::vector<Tensor> experts, std::vector<Tensor> adjugates, const Tensor& dy, const c10::optional<Tensor>& d_logits,
    const c10::optional<Tensor>& d_topk_weights) {
  grove::detail::require(context.defined(), "grove_torch: backward needs the context of its forward");
  const detail::layer_tensors w = tensors_of(router, c10::nullopt, std::move(experts), std::move(adjugates));
  const grove::layer_dims d = detail::dims_of(w);
  grove::detail::require(router.scalar_type() == context->weight_dtype,
                         "grove_torch: backward got weights of dtype " + std::string(c10::toString(router.scalar_type())) +
                             " after a forward with " + c10::toString(context->weight_dtype));
  switch (context->weight_dtype) {
    case at::kFloat: return backward_as<float>(*context, w, d, x, dy, d_logits, d_topk_weights);
    case at::kDouble: return backward_as<double>(*context, w, d, x, dy, d_logits, d_topk_weights);
    default:
      throw grove::error("grove_torch: no backward for " + std::string(c10::toString(context->weight_dtype)) +
                         " weights: grove trains float32 (or float64) parameters; keep fp32 masters, or run the "
                         "bf16 layer under torch.no_grad() / with requires_grad_(False)");
  }
}

template <class S>
std::tuple<double, Tensor> load_balancing_loss_as(const Tensor& logits, int64_t top_k) {
  detail::require_matrix(logits, "router_logits", detail::dtype_of<S>(), logits.size(0), logits.size(1));
  grove::row_matrix<S> dl = grove::row_matrix<S>::Zero(logits.size(0), logits.size(1));
  const double loss = grove::load_balancing_loss<S>(detail::const_rows_of<S>(logits), top_k, 1.0, &dl);
  return {loss, to_tensor(dl, detail::dtype_of<S>())};
}

/// L_aux of the released load_balancing_loss_func over router_logits [N, E], and ∂L_aux/∂logits.
std::tuple<double, Tensor> load_balancing_loss(const Tensor& logits, int64_t top_k) {
  grove::detail::require(logits.dim() == 2, "grove_torch: router_logits must be [N, E], got " + detail::shape_of(logits));
  if (logits.scalar_type() == at::kDouble) return load_balancing_loss_as<double>(logits, top_k);
  return load_balancing_loss_as<float>(logits, top_k);
}

/// The auxiliary-loss-free bias update, in place, from per-expert pick counts.
bool update_selection_bias(Tensor bias, const Tensor& counts, double rate, const std::string& rule) {
  grove::detail::require(bias.dim() == 1 && counts.dim() == 1 && bias.size(0) == counts.size(0),
                         "grove_torch: expert_bias " + detail::shape_of(bias) + " and the load counts " +
                             detail::shape_of(counts) + " must both be [E]");
  grove::detail::require(rule == "normalized" || rule == "sign",
                         "grove_torch: the bias update rule is 'normalized' or 'sign', got '" + rule + "'");
  detail::require_matrix(bias.view({1, bias.size(0)}), "expert_bias", at::kFloat, 1, bias.size(0));
  const Tensor c = counts.to(at::kLong).contiguous();
  const std::vector<index> loads(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.size(0));
  const grove::bias_update_options options{rate, rule == "sign" ? grove::bias_update_rule::sign
                                                                : grove::bias_update_rule::normalized};
  return grove::update_selection_bias(std::span<float>(bias.data_ptr<float>(), static_cast<std::size_t>(bias.size(0))),
                                      std::span<const index>(loads), options);
}

}  // namespace
}  // namespace grove_torch

TORCH_LIBRARY(grove, m) {
  m.class_<grove_torch::layer_context>("LayerContext");
  m.def(
      "forward(Tensor x, Tensor router, Tensor? bias, Tensor[] experts, Tensor[] adjugates, int top_k, float scale, "
      "bool keep_for_backward) -> (Tensor, Tensor, Tensor, Tensor, __torch__.torch.classes.grove.LayerContext)",
      &grove_torch::forward);
  m.def(
      "backward(__torch__.torch.classes.grove.LayerContext context, Tensor x, Tensor router, Tensor[] experts, "
      "Tensor[] adjugates, Tensor dy, Tensor? d_router_logits, Tensor? d_topk_weights) -> (Tensor, Tensor, Tensor[], "
      "Tensor[])",
      &grove_torch::backward);
  m.def("load_balancing_loss(Tensor router_logits, int top_k) -> (float, Tensor)", &grove_torch::load_balancing_loss);
  m.def("update_selection_bias(Tensor(a!) bias, Tensor counts, float rate, str rule) -> bool",
        &grove_torch::update_selection_bias);
}
