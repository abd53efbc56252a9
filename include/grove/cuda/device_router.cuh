// grove CUDA backend: routing on the device (docs/cuda.md, "Plan on the device"), the device
// path's counterpart of grove::route and grove::router_backward.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "grove/cuda/backward_kernels.cuh"
#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/device_weights.cuh"
#include "grove/cuda/routing_kernels.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/cuda/tile_gemm.cuh"
#include "grove/router/routing_options.hpp"
#include "grove/runners/cuda_runner.cuh"

GROVE_BEGIN_NAMESPACE
namespace cuda {

/// The router of one layer on the GPU: turns a batch x in device memory into a device_plan
/// (docs/math.md, steps 1–5: logits, top-k, weights, groups, dispatch) with four launches and no
/// host synchronisation, on its runner's stream, and backpropagates through the routing.
///
///   grove::cuda_runner runner({.max_tokens = 4096});
///   const auto& params = runner.upload(cpu_layer.weights());            // or device_parameters
///   grove::cuda::device_router<float> router(runner, params.weights(), {.top_k = 8, .scale = 0.05});
///   const grove::cuda::device_plan& plan = router.route(x, tokens);     // x, y: device [T, H]
///   runner.forward(params.weights(), plan, x, y);
///
/// The plan lives in the router's storage and is valid until its next route(); the runner's
/// calls that read it are ordered after it on the same stream. A NaN logit raises the runner's
/// error flag (cuda_runner::check_errors). T is float (fp32 logits by FMA) or bfloat16 (tensor
/// cores, fp32 accumulation); the logits are fp32 either way. A router is used from one thread
/// at a time; make one per layer (it keeps that layer's plan), all on one runner.
template <class T>
class device_router {
  static_assert(detail::is_device_scalar<T>, "GROVE_CUDA_SCALAR_MUST_BE_float_OR_bfloat16");

 public:
  device_router(cuda_runner& runner, device_weights<T> weights, const routing_options& options)
      : runner_(&runner), weights_(weights), options_(options) {
    validate();
    const layer_dims& s = weights_.shape;
    const int max_tokens = runner.max_tokens();
    const int k = static_cast<int>(options_.top_k);
    const detail::capacity cap = detail::capacity::of(max_tokens, k, static_cast<int>(s.mlps()));
    cuda::detail::device_scope scope(runner.device());
    storage_.reserve(s, k, max_tokens, true);
    std::size_t partials = 0;
    for (int tiles = 1; tiles <= detail::ceil_div(max_tokens, detail::tile_m); ++tiles) {
      const int t = std::min(tiles * detail::tile_m, max_tokens);
      const int splits = router_splits(t);
      if (splits > 1) partials = std::max(partials, static_cast<std::size_t>(splits) * t * s.experts);
    }
    partials_.allocate(partials);
    chunk_masks_.allocate(static_cast<std::size_t>(cap.chunks) * s.mlps() * k);
    chunk_counts_.allocate(static_cast<std::size_t>(cap.chunks) * s.mlps());
    chunk_base_.allocate(static_cast<std::size_t>(cap.chunks) * s.mlps());
    dl_.allocate(static_cast<std::size_t>(max_tokens) * s.experts);
    storage_.clear_schedule(nullptr);
    gemm_smem_ = detail::tile_smem_bytes<T>(1, 1, 1);
    plan_ = storage_.view(s, k, static_cast<float>(options_.scale), options_.adjugates, 0, runner.error_flag_.data());
    detail::check(cudaDeviceSynchronize(), "setting up the device_router");
  }

  [[nodiscard]] const routing_options& options() const { return options_; }
  [[nodiscard]] const device_weights<T>& weights() const { return weights_; }
  [[nodiscard]] cuda_runner& runner() const { return *runner_; }
  /// The plan of the last route() (device pointers into this router's storage).
  [[nodiscard]] const device_plan& plan() const { return plan_; }

  /// Routes x [tokens, H] (device memory) into this router's plan: four launches on the
  /// runner's stream, no synchronisation. tokens <= the runner's max_tokens.
  const device_plan& route(const T* x, int tokens) {
    detail::require(tokens >= 0 && tokens <= runner_->max_tokens(), "grove::cuda: a batch of ", tokens,
                    " tokens does not fit max_tokens = ", runner_->max_tokens(), " (cuda_runner_options::max_tokens; ",
                    "device_router::route)");
    cuda::detail::device_scope scope(runner_->device());
    cudaStream_t stream = runner_->stream();
    plan_.tokens = tokens;
    if (tokens == 0) {
      storage_.clear_schedule(stream);
      return plan_;
    }
    detail::require(x != nullptr, "grove::cuda: device_router::route got a null input x");
    const layer_dims& s = weights_.shape;
    detail::routing_args a = routing_args(tokens);
    const int splits = router_splits(tokens);
    const int k_per_split = detail::ceil_div(detail::ceil_div(static_cast<int>(s.hidden), detail::tile_k), splits) * detail::tile_k;
    a.splits = detail::ceil_div(static_cast<int>(s.hidden), k_per_split);
    const dim3 grid(static_cast<unsigned>(detail::ceil_div(tokens, detail::tile_m)),
                    static_cast<unsigned>(detail::ceil_div(static_cast<int>(s.experts), detail::tile_n)),
                    static_cast<unsigned>(a.splits));
    detail::launch("router_logits_kernel", detail::router_logits_kernel<T>, grid, detail::tile_threads, gemm_smem_,
                   stream, weights_, x, tokens, k_per_split, a.splits > 1 ? partials_.data() : storage_.logits());
    const int chunks = a.chunks();
    const std::size_t mask_bytes = static_cast<std::size_t>(s.mlps()) * options_.top_k * sizeof(std::uint32_t);
    detail::launch("select_kernel", detail::select_kernel<>, static_cast<unsigned>(chunks), detail::routing_threads,
                   mask_bytes, stream, a);
    detail::launch("scan_kernel", detail::scan_kernel<>, 1, detail::scan_threads,
                   static_cast<std::size_t>(s.mlps()) * sizeof(int), stream, a);
    const int warps = detail::routing_threads / 32;
    detail::launch("scatter_kernel", detail::scatter_kernel<>, static_cast<unsigned>(detail::ceil_div(chunks, warps)),
                   detail::routing_threads, 0, stream, a);
    return plan_;
  }

  /// The router's backward for `plan` (routed from x; usually plan()), after the runner's
  /// backward gave dw [T, k] = ∂L/∂w_s: the logit gradient dl_{e_s} = w_s (dw_s − Σ_r w_r dw_r),
  /// then ADDS dl W_r to dx [T, H] and dlᵀ x to grads.router (docs/math.md, "Backward"), as
  /// grove::router_backward does on the CPU. Three launches on the runner's stream.
  void backward(const device_plan& plan, const T* x, const float* dw, float* dx, const device_gradients& grads) {
    const layer_dims& s = weights_.shape;
    detail::require(grads.shape == s, "grove::cuda: the gradient buffers have other dimensions than the router's layer");
    detail::require(plan.experts == s.experts && plan.tokens <= runner_->max_tokens(),
                    "grove::cuda: device_router::backward got a plan of another layer or larger than max_tokens");
    const int tokens = plan.tokens;
    if (tokens == 0) return;
    detail::require(x != nullptr && dw != nullptr && dx != nullptr && grads.router != nullptr,
                    "grove::cuda: device_router::backward got a null x, dw, dx or router gradient");
    cuda::detail::device_scope scope(runner_->device());
    cudaStream_t stream = runner_->stream();
    const int warps = detail::routing_threads / 32;
    detail::launch("logit_grad_kernel", detail::logit_grad_kernel<>, static_cast<unsigned>(detail::ceil_div(tokens, warps)),
                   detail::routing_threads, 0, stream, plan, dw, dl_.data());
    const dim3 input_grid(static_cast<unsigned>(detail::ceil_div(tokens, detail::tile_m)),
                          static_cast<unsigned>(detail::ceil_div(static_cast<int>(s.hidden), detail::tile_n)));
    detail::launch("router_input_grad_kernel", detail::router_input_grad_kernel<T>, input_grid, detail::tile_threads,
                   gemm_smem_, stream, weights_, dl_.data(), tokens, dx);
    const dim3 weight_grid(static_cast<unsigned>(detail::ceil_div(static_cast<int>(s.experts), detail::tile_m)),
                           static_cast<unsigned>(detail::ceil_div(static_cast<int>(s.hidden), detail::tile_n)));
    detail::launch("router_weight_grad_kernel", detail::router_weight_grad_kernel<T>, weight_grid, detail::tile_threads,
                   gemm_smem_, stream, s, dl_.data(), x, tokens, grads.router);
  }

  /// Device memory this router holds (its plan and routing scratch), in bytes.
  [[nodiscard]] std::size_t workspace_bytes() const {
    return storage_.bytes() +
           sizeof(float) * (partials_.size() + dl_.size()) +
           sizeof(std::uint32_t) * chunk_masks_.size() + sizeof(int) * (chunk_counts_.size() + chunk_base_.size());
  }

 private:
  void validate() const {
    const layer_dims& s = weights_.shape;
    s.validate();
    using std::to_string;
    const index k = options_.top_k;
    detail::require(k >= 1 && k <= s.experts && k <= detail::max_top_k, "grove::cuda: top-k k = ", k,
                    " must lie in [1, min(E = ", s.experts, ", ", detail::max_top_k, ")]");
    detail::require(std::isfinite(options_.scale) && options_.scale >= 0.0,
                    "grove::cuda: the adjugate scale λ must be finite and >= 0, got " + to_string(options_.scale));
    const std::size_t mask_bytes = static_cast<std::size_t>(s.mlps()) * static_cast<std::size_t>(k) * sizeof(std::uint32_t);
    detail::require(mask_bytes <= 48 * 1024, "grove::cuda: (E + G)·k = ", s.mlps() * k,
                    " exceeds the routing kernel's shared-memory bitmasks (at most 12288)");
    detail::require(weights_.router != nullptr && weights_.gate != nullptr && weights_.up != nullptr &&
                        weights_.down != nullptr,
                    "grove::cuda: the device weights are incomplete (router or pointer tables missing)");
    detail::require(2.0 * runner_->max_tokens() * static_cast<double>(k) < 2147483647.0,
                    "grove::cuda: max_tokens · k is too large for 32-bit row indices");
  }

  detail::routing_args routing_args(int tokens) const {
    detail::routing_args a;
    a.shape = weights_.shape;
    a.tokens = tokens;
    a.top_k = static_cast<int>(options_.top_k);
    a.max_groups = plan_.max_groups;
    a.scale = plan_.scale;
    a.adjugates = options_.adjugates;
    a.partials = partials_.data();
    a.bias = weights_.bias;
    a.logits = storage_.logits();
    a.topk_ids = storage_.topk_ids();
    a.topk_weights = storage_.topk_weights();
    a.token_groups = storage_.token_groups();
    a.group_weights = storage_.group_weights();
    a.groups_per_token = storage_.groups_per_token();
    a.pick_group_slot = storage_.pick_group_slot();
    a.chunk_masks = chunk_masks_.data();
    a.chunk_counts = chunk_counts_.data();
    a.chunk_base = chunk_base_.data();
    a.schedule = storage_.schedule();
    a.rows = storage_.rows();
    a.row_of_pick = storage_.row_of_pick();
    a.row_of_group = storage_.row_of_group();
    a.error_flag = runner_->error_flag_.data();
    return a;
  }

  /// Router split-K: enough blocks to cover the GPU for small batches (decode), at least four
  /// k-steps per split, at most 16 splits.
  [[nodiscard]] int router_splits(int tokens) const {
    const layer_dims& s = weights_.shape;
    const int tiles = detail::ceil_div(tokens, detail::tile_m) * detail::ceil_div(static_cast<int>(s.experts), detail::tile_n);
    const int k_steps = detail::ceil_div(static_cast<int>(s.hidden), detail::tile_k);
    int splits = std::max(1, 2 * runner_->multiprocessors() / std::max(tiles, 1));
    splits = std::min({splits, std::max(1, k_steps / 4), 16});
    return splits;
  }

  cuda_runner* runner_;
  device_weights<T> weights_;
  routing_options options_;
  plan_storage storage_;
  device_plan plan_;
  std::size_t gemm_smem_ = 0;
  device_buffer<float> partials_, dl_;
  device_buffer<std::uint32_t> chunk_masks_;
  device_buffer<int> chunk_counts_, chunk_base_;
};

}  // namespace cuda
GROVE_END_NAMESPACE
