#pragma once

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "grove/config/layer_config.hpp"
#include "grove/error.hpp"
#include "grove/formats/format_traits.hpp"
#include "grove/weights/layer_parameters.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/layer/activation_stats.hpp"
#include "grove/layer/forward_result.hpp"
#include "grove/router/route.hpp"
#include "grove/runners/default_runner.hpp"
#include "grove/runners/runner.hpp"

GROVE_BEGIN_NAMESPACE

/// A Grove MoE layer (docs/layer.md): a configuration plus weights it either owns or views.
///
///   grove::layer layer(grove::dynamic_config<>(dims, 8, 0.05), std::move(parameters));
///   grove::row_matrix<float> y = layer.forward(x);            // x: [T, H]
///
/// Forward is two steps that can also be called separately: route (one routing_plan per batch)
/// and run the experts of that plan on the layer's runner (docs/runners.md). A layer holds the
/// runner it was given, or default_runner(); `layer.on(runner)` is the same layer on another
/// runner, as Eigen's `.device(d)`. Copies of a layer share its weights and its runner.
///
/// The weights are in any format of the format table (formats/weight_format.hpp), the
/// configuration's scalar: `layer<dynamic_config<grove::bf16>>` holds BF16 tensors, runs on fp32
/// activations and routes in fp32 (an exact fp32 copy of the router). Training needs a format
/// with a backward (f32, f64).
template <layer_configuration Config>
class layer {
 public:
  using config_type = Config;
  /// The format the weights are held in: float, double or grove::bf16.
  using weight_type = typename Config::scalar;
  /// The type of x, y and the plan: the format's activation type (fp32 for BF16).
  using scalar = activation_t<weight_type>;

  /// A layer that owns its weights, run by `runner`.
  layer(Config config, layer_parameters<weight_type> parameters,
        std::shared_ptr<grove::runner> runner = default_runner())
      : config_(std::move(config)),
        owned_(std::make_shared<const layer_parameters<weight_type>>(std::move(parameters))),
        weights_(owned_->view()),
        routing_(owned_->routing_view()),
        runner_(std::move(runner)) {
    check_weights();
  }

  /// A layer over caller-owned buffers (row-major, PyTorch layout); nothing is copied and the
  /// buffers must outlive the layer. For a format that routes from a copy (BF16), the layer
  /// keeps an fp32 copy of the router and the bias (E·(H + 1) floats).
  layer(Config config, weights_view<weight_type> weights, std::shared_ptr<grove::runner> runner = default_runner())
      : config_(std::move(config)), weights_(std::move(weights)), runner_(std::move(runner)) {
    routing_ = routing_weights_of(weights_);
    check_weights();
  }

  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] const layer_dims& dims() const { return config_.dims(); }
  [[nodiscard]] const weights_view<weight_type>& weights() const { return weights_; }
  /// What routing reads: the router and the bias in `scalar` (weights() itself for f32 and f64).
  [[nodiscard]] const weights_view<scalar>& routing_weights() const { return routing_; }

  /// The runner that executes this layer's plans.
  [[nodiscard]] grove::runner& runner() const { return *runner_; }
  [[nodiscard]] const std::shared_ptr<grove::runner>& shared_runner() const { return runner_; }
  /// Runs this layer on `runner` from now on.
  void set_runner(std::shared_ptr<grove::runner> runner) {
    require_runner(runner);
    runner_ = std::move(runner);
  }
  /// This layer (same weights, shared) on another runner.
  [[nodiscard]] layer on(std::shared_ptr<grove::runner> runner) const {
    layer copy(*this);
    copy.set_runner(std::move(runner));
    return copy;
  }

  /// k and the group size E / G where the configuration fixes them at compile time.
  using sizes_at_compile_time =
      routing_sizes<Config::top_k_at_compile_time,
                    (Config::experts_at_compile_time != dynamic && Config::groups_at_compile_time != dynamic)
                        ? Config::experts_at_compile_time / Config::groups_at_compile_time
                        : dynamic>;

  /// Step 1: routing for a batch x [T, H].
  [[nodiscard]] routing_plan<scalar> route(const_rows_ref<scalar> x) const {
    routing_plan<scalar> plan;
    route_into(plan, x);
    return plan;
  }
  /// Step 1 into a plan kept from an earlier batch: its storage is reused (no allocation once
  /// it has held a batch this large).
  /// A configuration that fixes k, or E and G, routes with those sizes (routing_sizes).
  void route_into(routing_plan<scalar>& plan, const_rows_ref<scalar> x) const {
    grove::route_into<sizes_at_compile_time>(plan, routing_, routing_options{config_.top_k(), config_.scale()}, x);
  }

  /// Step 2: the experts of `plan` applied to x, written to y [T, H], on the layer's runner.
  void forward(const routing_plan<scalar>& plan, const_rows_ref<scalar> x, rows_ref<scalar> y) const {
    require_own_plan(plan);
    runner_->forward(expert_forward<weight_type>{weights_, plan, x, y});
  }

  /// Step 2 of a training forward: forward(plan, x, y) that also keeps what backward needs.
  void forward_saving(const routing_plan<scalar>& plan, const_rows_ref<scalar> x, rows_ref<scalar> y,
                      saved_activations<scalar>& saved) const
    requires(info_of<weight_type>().trainable)
  {
    require_own_plan(plan);
    runner_->forward(expert_forward<weight_type>{weights_, plan, x, y, &saved});
  }

  /// Throws unless `plan` was routed with this layer's k and λ.
  void require_own_plan(const routing_plan<scalar>& plan) const {
    detail::require(plan.top_k == config_.top_k() && plan.scale == config_.scale(),
                    "grove: the routing plan was made with another top-k or scale than this layer's");
  }

  /// y = layer(x).
  [[nodiscard]] row_matrix<scalar> forward(const_rows_ref<scalar> x) const {
    return forward(x, forward_request{}).y;
  }

  /// y, and on request the routing (logits, picks, weights) and the batch's activation statistics.
  [[nodiscard]] forward_result<scalar> forward(const_rows_ref<scalar> x, const forward_request& request) const {
    forward_result<scalar> result;
    routing_plan<scalar> plan = route(x);
    result.y.resize(x.rows(), dims().hidden);
    forward(plan, x, result.y);
    if (request.statistics) result.statistics = compute_activation_stats(plan, dims());
    if (request.routing) result.routing = std::move(plan);
    return result;
  }

 private:
  static void require_runner(const std::shared_ptr<grove::runner>& runner) {
    detail::require(runner != nullptr, "grove: a layer needs a runner (got a null std::shared_ptr<grove::runner>)");
  }
  void check_weights() const {
    require_runner(runner_);
    const layer_dims& w = weights_.dims();
    const layer_dims& c = config_.dims();
    detail::require(w == c, "grove: the weights have (H, E, G, I, Ia) = (" + describe(w) +
                                ") but the configuration says (" + describe(c) + ")");
    weights_.require_complete();
  }
  /// The routing view of caller-owned weights: the weights themselves, or an fp32 copy of their
  /// router and bias for a format that routes from one.
  weights_view<scalar> routing_weights_of(const weights_view<weight_type>& weights) {
    if constexpr (is_block_format<weight_type>) {
      static_assert(!is_block_format<weight_type>,
                    "GROVE_A_Q8_OR_Q4_LAYER_OWNS_ITS_WEIGHTS: build it from layer_parameters, whose fp32 router "
                    "copy keeps the picks exact (a quantized view has no fp32 router)");
      return {};
    } else if constexpr (std::is_same_v<scalar, weight_type>) {
      return weights;
    } else {
      const layer_dims& d = weights.dims();
      detail::require(weights.router().data() != nullptr, "grove: missing tensor 'gate.weight' in layer weights");
      const auto router_size = static_cast<std::size_t>(d.experts * d.hidden);
      auto copy = std::make_shared<std::vector<scalar>>(router_size + static_cast<std::size_t>(d.experts), scalar(0));
      widen(weights.router().data(), router_size, copy->data());
      if (weights.bias() != nullptr)
        widen(weights.bias(), static_cast<std::size_t>(d.experts), copy->data() + router_size);
      routing_copy_ = copy;
      weights_view<scalar> routing(d);
      routing.set_router(copy->data());
      routing.set_bias(copy->data() + router_size);
      return routing;
    }
  }
  static std::string describe(const layer_dims& d) {
    return std::to_string(d.hidden) + ", " + std::to_string(d.experts) + ", " + std::to_string(d.groups) + ", " +
           std::to_string(d.expert_intermediate) + ", " + std::to_string(d.adjugate_intermediate);
  }

  Config config_;
  std::shared_ptr<const layer_parameters<weight_type>> owned_;
  weights_view<weight_type> weights_;
  std::shared_ptr<const std::vector<scalar>> routing_copy_;  // fp32 router and bias of a BF16 view
  weights_view<scalar> routing_;
  std::shared_ptr<grove::runner> runner_;
};

GROVE_END_NAMESPACE
