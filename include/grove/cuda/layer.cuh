// grove CUDA backend: a Grove MoE layer on one GPU stream (docs/cuda.md).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "grove/cuda/backward_kernels.cuh"
#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/device_weights.cuh"
#include "grove/cuda/expert_kernels.cuh"
#include "grove/cuda/routing_kernels.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/cuda/tile_gemm.cuh"

GROVE_BEGIN_NAMESPACE
namespace cuda {

/// How expert outputs are summed per token.
enum class combine_mode {
  atomic,         ///< fp32 atomicAdd straight into the token's row: fastest, run-to-run bits may differ
  deterministic,  ///< each row's term to a buffer, summed per token in a fixed order: bit-reproducible
};

/// What a device layer needs besides its weights. `max_tokens` bounds every batch: all
/// workspace is allocated from it once, so a layer call never allocates or synchronises.
struct layer_options {
  int top_k = 0;
  double scale = 0.0;  ///< λ
  int max_tokens = 0;
  adjugate_mode adjugates = adjugate_mode::once_per_token;
  combine_mode combine = combine_mode::atomic;
  bool training = false;  ///< also allocate what backward needs
};

/// A Grove MoE layer on the GPU: route, run the experts and adjugates in one unified kernel,
/// and (with options.training) backpropagate — with the same semantics as grove::route,
/// grove::layer::forward and grove::backward on the CPU (docs/cuda.md).
///
///   namespace gc = grove::cuda;
///   auto params = gc::device_parameters<gc::bfloat16>::upload(cpu_layer.weights());
///   gc::layer<gc::bfloat16> layer(params.weights(), {.top_k = 8, .scale = 0.05, .max_tokens = 4096});
///   layer.forward(x, y, tokens, stream);  // x, y: device [T, H]
///
/// Every call is asynchronous on `stream`; the object holds one batch's plan and workspace, so
/// use one object per stream. T is float (fp32 FMA) or bfloat16 (tensor cores, fp32 accumulation).
template <class T>
class layer {
  static_assert(detail::is_device_scalar<T>, "GROVE_CUDA_SCALAR_MUST_BE_float_OR_bfloat16");

 public:
  layer(device_weights<T> weights, layer_options options) : weights_(weights), options_(options) {
    validate();
    const layer_dims& s = weights_.shape;
    const int mlps = s.mlps();
    cap_ = detail::capacity::of(options_.max_tokens, options_.top_k, mlps);
    max_groups_ = std::min(options_.top_k, static_cast<int>(s.groups));

    int device = 0;
    detail::check(cudaGetDevice(&device), "cudaGetDevice");
    detail::check(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");

    const auto tokens = static_cast<std::size_t>(cap_.tokens);
    const auto k = static_cast<std::size_t>(options_.top_k);
    const auto rows = static_cast<std::size_t>(cap_.rows);
    const auto hidden = static_cast<std::size_t>(s.hidden);
    std::size_t partials = 0;
    for (int rt = 1; rt <= detail::ceil_div(cap_.tokens, detail::tile_m); ++rt) {
      const int t = std::min(rt * detail::tile_m, cap_.tokens);
      const int splits = router_splits(t);
      if (splits > 1) partials = std::max(partials, static_cast<std::size_t>(splits) * t * s.experts);
    }
    partials_.allocate(partials);
    logits_.allocate(tokens * s.experts);
    topk_ids_.allocate(tokens * k);
    topk_weights_.allocate(tokens * k);
    token_groups_.allocate(tokens * max_groups_);
    group_weights_.allocate(tokens * max_groups_);
    groups_per_token_.allocate(tokens);
    pick_group_slot_.allocate(tokens * k);
    chunk_masks_.allocate(static_cast<std::size_t>(cap_.chunks) * mlps * k);
    chunk_counts_.allocate(static_cast<std::size_t>(cap_.chunks) * mlps);
    chunk_base_.allocate(static_cast<std::size_t>(cap_.chunks) * mlps);
    schedule_.allocate(detail::schedule_arrays<int>::arrays * static_cast<std::size_t>(mlps + 1));
    rows_.allocate(rows);
    row_of_pick_.allocate(tokens * k);
    row_of_group_.allocate(tokens * k);
    counters_.allocate(1 + static_cast<std::size_t>(cap_.row_tiles) + mlps);
    error_flag_.allocate(1);
    error_flag_.zero();
    schedule_.zero();
    // h: T·k routed rows of width I, then up to T·k adjugate rows of width Ia.
    const std::size_t act = tokens * k * (static_cast<std::size_t>(s.expert_intermediate) + s.adjugate_intermediate);
    act_.allocate(act);
    if (options_.combine == combine_mode::deterministic)
      row_values_.allocate(rows * hidden);
    else if (!std::is_same_v<T, float>)
      y_accum_.allocate(tokens * hidden);
    if (options_.training) {
      act_grad_.allocate(2 * act);
      dw_stride_ = detail::ceil_div(std::max(s.expert_intermediate, s.adjugate_intermediate), detail::tile_n);
      dw_partial_.allocate(rows * static_cast<std::size_t>(dw_stride_));
      dl_.allocate(tokens * s.experts);
    }

    forward_smem_ = std::max(detail::tile_smem_bytes<T>(1, 2, 2), detail::tile_smem_bytes<T>(1, 1, 1));
    backward_smem_ = std::max({detail::tile_smem_bytes<T>(2, 3, 3), detail::tile_smem_bytes<T>(1, 1, 1),
                               detail::tile_smem_bytes<T>(2, 1, 2)});
    gemm_smem_ = detail::tile_smem_bytes<T>(1, 1, 1);
    forward_grid_ = persistent_grid(detail::forward_experts_kernel<T>, forward_smem_);
    if (options_.training) backward_grid_ = persistent_grid(detail::backward_experts_kernel<T>, backward_smem_);

    args_.shape = s;
    args_.top_k = options_.top_k;
    args_.max_groups = max_groups_;
    args_.scale = static_cast<float>(options_.scale);
    args_.adjugates = options_.adjugates;
    args_.partials = partials_.data();
    args_.bias = weights_.bias;
    args_.logits = logits_.data();
    args_.topk_ids = topk_ids_.data();
    args_.topk_weights = topk_weights_.data();
    args_.token_groups = token_groups_.data();
    args_.group_weights = group_weights_.data();
    args_.groups_per_token = groups_per_token_.data();
    args_.pick_group_slot = pick_group_slot_.data();
    args_.chunk_masks = chunk_masks_.data();
    args_.chunk_counts = chunk_counts_.data();
    args_.chunk_base = chunk_base_.data();
    args_.schedule = schedule_.data();
    args_.rows = rows_.data();
    args_.row_of_pick = row_of_pick_.data();
    args_.row_of_group = row_of_group_.data();
    args_.error_flag = error_flag_.data();

    plan_.experts = s.experts;
    plan_.groups = s.groups;
    plan_.group_size = s.group_size();
    plan_.top_k = options_.top_k;
    plan_.max_groups = max_groups_;
    plan_.scale = args_.scale;
    plan_.adjugates = options_.adjugates;
    plan_.logits = logits_.data();
    plan_.topk_ids = topk_ids_.data();
    plan_.topk_weights = topk_weights_.data();
    plan_.token_groups = token_groups_.data();
    plan_.group_weights = group_weights_.data();
    plan_.groups_per_token = groups_per_token_.data();
    plan_.pick_group_slot = pick_group_slot_.data();
    plan_.offsets = schedule_.data();
    plan_.rows = rows_.data();
    plan_.row_of_pick = row_of_pick_.data();
    plan_.row_of_group = row_of_group_.data();
    plan_.error_flag = error_flag_.data();
  }

  [[nodiscard]] const layer_options& options() const { return options_; }
  [[nodiscard]] const layer_dims& shape() const { return weights_.shape; }
  /// The plan of the last route() (device pointers into this object's workspace).
  [[nodiscard]] const device_plan& plan() const { return plan_; }

  /// Routes a batch x [tokens, H] (device memory) and builds the plan on the device
  /// (docs/math.md, steps 1–5). Four launches on `stream`, no synchronisation.
  const device_plan& route(const T* x, int tokens, cudaStream_t stream = nullptr) {
    require_tokens(tokens);
    plan_.tokens = tokens;
    args_.tokens = tokens;
    const layer_dims& s = weights_.shape;
    if (tokens == 0) {
      schedule_.zero(stream);
      return plan_;
    }
    detail::require(x != nullptr, "grove::cuda: route() got a null input x");
    error_flag_.zero(stream);
    const int splits = router_splits(tokens);
    const int k_per_split = detail::ceil_div(detail::ceil_div(s.hidden, detail::tile_k), splits) * detail::tile_k;
    args_.splits = detail::ceil_div(s.hidden, k_per_split);
    const dim3 grid(static_cast<unsigned>(detail::ceil_div(tokens, detail::tile_m)),
                    static_cast<unsigned>(detail::ceil_div(s.experts, detail::tile_n)),
                    static_cast<unsigned>(args_.splits));
    detail::launch("router_logits_kernel", detail::router_logits_kernel<T>, grid, detail::tile_threads, gemm_smem_,
                   stream, weights_, x, tokens, k_per_split, args_.splits > 1 ? partials_.data() : logits_.data());
    const int chunks = args_.chunks();
    const std::size_t mask_bytes = static_cast<std::size_t>(s.mlps()) * options_.top_k * sizeof(std::uint32_t);
    detail::launch("select_kernel", detail::select_kernel<>, static_cast<unsigned>(chunks), detail::routing_threads,
                   mask_bytes, stream, args_);
    detail::launch("scan_kernel", detail::scan_kernel<>, 1, detail::scan_threads,
                   static_cast<std::size_t>(s.mlps()) * sizeof(int), stream, args_);
    const int warps = detail::routing_threads / 32;
    detail::launch("scatter_kernel", detail::scatter_kernel<>, static_cast<unsigned>(detail::ceil_div(chunks, warps)),
                   detail::routing_threads, 0, stream, args_);
    return plan_;
  }

  /// Runs the experts and adjugates of the last plan on x and writes y [tokens, H] (step 6):
  /// one persistent launch (plus a combine or convert pass where needed).
  void forward_experts(const T* x, T* y, cudaStream_t stream = nullptr) {
    const int tokens = plan_.tokens;
    if (tokens == 0) return;
    detail::require(x != nullptr && y != nullptr, "grove::cuda: forward got a null x or y");
    const auto hidden = static_cast<std::size_t>(weights_.shape.hidden);
    const std::size_t outputs = static_cast<std::size_t>(tokens) * hidden;
    detail::expert_args<T> a = expert_args(x, nullptr);
    if (options_.combine == combine_mode::deterministic) {
      a.out = row_values_.data();
    } else if constexpr (std::is_same_v<T, float>) {
      a.out = y;
    } else {
      a.out = y_accum_.data();
    }
    if (!a.deterministic)
      detail::check(cudaMemsetAsync(a.out, 0, outputs * sizeof(float), stream), "cudaMemsetAsync of y");
    counters_.zero(stream);
    detail::launch("forward_experts_kernel", detail::forward_experts_kernel<T>, forward_grid_, detail::tile_threads,
                   forward_smem_, stream, a);
    if (a.deterministic) {
      const dim3 grid(static_cast<unsigned>(tokens),
                      static_cast<unsigned>(detail::ceil_div(static_cast<int>(hidden), 256)));
      detail::launch("combine_kernel", detail::combine_kernel<T>, grid, 256, 0, stream, row_values_.data(),
                     row_of_pick_.data(), row_of_group_.data(), tokens, options_.top_k, static_cast<int>(hidden), y,
                     false);
    } else if constexpr (!std::is_same_v<T, float>) {
      detail::launch("convert_kernel", detail::convert_kernel<T>, 1024, 256, 0, stream, y_accum_.data(), y,
                     static_cast<std::int64_t>(outputs));
    }
  }

  /// y = layer(x): route, then the experts. x, y: device [tokens, H].
  void forward(const T* x, T* y, int tokens, cudaStream_t stream = nullptr) {
    route(x, tokens, stream);
    forward_experts(x, y, stream);
  }

  /// Backward of the last routed batch (x must be the batch given to route()): ADDS ∂L/∂x to
  /// dx [tokens, H] (fp32) and the weight gradients to `grads` (fp32, e.g.
  /// device_parameters<float>::gradients()), as grove::backward does on the CPU. Needs
  /// options.training. Recomputes g and u from x (the forward keeps no activations).
  void backward(const T* x, const T* dy, float* dx, const device_gradients& grads, cudaStream_t stream = nullptr) {
    detail::require(options_.training, "grove::cuda: backward needs a layer built with layer_options::training = true");
    const layer_dims& s = weights_.shape;
    detail::require(grads.shape.hidden == s.hidden && grads.shape.experts == s.experts &&
                        grads.shape.groups == s.groups && grads.shape.expert_intermediate == s.expert_intermediate &&
                        grads.shape.adjugate_intermediate == s.adjugate_intermediate,
                    "grove::cuda: the gradient buffers have other dimensions than the layer");
    const int tokens = plan_.tokens;
    if (tokens == 0) return;
    detail::require(x != nullptr && dy != nullptr && dx != nullptr, "grove::cuda: backward got a null x, dy or dx");
    detail::expert_args<T> a = expert_args(x, dy);
    a.grads = grads;
    a.act_grad = act_grad_.data();
    a.dw_partial = dw_partial_.data();
    a.dw_stride = dw_stride_;
    a.out = a.deterministic ? row_values_.data() : dx;
    counters_.zero(stream);
    detail::launch("backward_experts_kernel", detail::backward_experts_kernel<T>, backward_grid_, detail::tile_threads,
                   backward_smem_, stream, a);
    if (a.deterministic) {
      const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(detail::ceil_div(s.hidden, 256)));
      detail::launch("combine_kernel", detail::combine_kernel<float>, grid, 256, 0, stream, row_values_.data(),
                     row_of_pick_.data(), row_of_group_.data(), tokens, options_.top_k, s.hidden, dx, true);
    }
    detail::routing_backward_args r;
    r.plan = plan_;
    r.dw_partial = dw_partial_.data();
    r.dw_stride = dw_stride_;
    r.expert_tiles = detail::ceil_div(s.expert_intermediate, detail::tile_n);
    r.adjugate_tiles = detail::ceil_div(s.adjugate_intermediate, detail::tile_n);
    r.dl = dl_.data();
    const int warps = detail::routing_threads / 32;
    detail::launch("routing_backward_kernel", detail::routing_backward_kernel<>,
                   static_cast<unsigned>(detail::ceil_div(tokens, warps)), detail::routing_threads, 0, stream, r);
    const dim3 input_grid(static_cast<unsigned>(detail::ceil_div(tokens, detail::tile_m)),
                          static_cast<unsigned>(detail::ceil_div(s.hidden, detail::tile_n)));
    detail::launch("router_input_grad_kernel", detail::router_input_grad_kernel<T>, input_grid, detail::tile_threads,
                   gemm_smem_, stream, weights_, dl_.data(), tokens, dx);
    const dim3 weight_grid(static_cast<unsigned>(detail::ceil_div(s.experts, detail::tile_m)),
                           static_cast<unsigned>(detail::ceil_div(s.hidden, detail::tile_n)));
    detail::launch("router_weight_grad_kernel", detail::router_weight_grad_kernel<T>, weight_grid, detail::tile_threads,
                   gemm_smem_, stream, s, dl_.data(), x, tokens, grads.router);
  }

  /// Throws grove::error when the last route() met a NaN router logit (the CPU route throws
  /// at once; the device sets a flag instead, ranks NaN last and goes on). Synchronises.
  void check_errors() const {
    int flag = 0;
    detail::check(cudaMemcpy(&flag, error_flag_.data(), sizeof(int), cudaMemcpyDeviceToHost), "reading the error flag");
    if (flag != 0)
      throw error("grove::cuda: a router logit was NaN in the last batch (check the input x and gate.weight)");
  }

  /// Device memory this layer holds for its workspace, in bytes.
  [[nodiscard]] std::size_t workspace_bytes() const {
    return partials_.size() * 4 + logits_.size() * 4 + topk_ids_.size() * 4 + topk_weights_.size() * 4 +
           token_groups_.size() * 4 + group_weights_.size() * 4 + groups_per_token_.size() * 4 +
           pick_group_slot_.size() * 4 + chunk_masks_.size() * 4 + chunk_counts_.size() * 4 + chunk_base_.size() * 4 +
           schedule_.size() * 4 + rows_.size() * sizeof(dispatch_row) + row_of_pick_.size() * 4 +
           row_of_group_.size() * 4 + counters_.size() * 4 + 4 + act_.size() * sizeof(T) +
           act_grad_.size() * sizeof(T) + row_values_.size() * 4 + y_accum_.size() * 4 + dw_partial_.size() * 4 +
           dl_.size() * 4;
  }

 private:
  void validate() const {
    const layer_dims& s = weights_.shape;
    using std::to_string;
    detail::require(s.hidden > 0 && s.experts > 0 && s.groups > 0 && s.expert_intermediate > 0 &&
                        s.adjugate_intermediate > 0 && s.experts % s.groups == 0,
                    "grove::cuda: invalid layer shape (H, E, G, I, Ia) = (" + to_string(s.hidden) + ", " +
                        to_string(s.experts) + ", " + to_string(s.groups) + ", " + to_string(s.expert_intermediate) +
                        ", " + to_string(s.adjugate_intermediate) + ")");
    detail::require(options_.top_k >= 1 && options_.top_k <= s.experts && options_.top_k <= detail::max_top_k,
                    "grove::cuda: top-k k = " + to_string(options_.top_k) + " must lie in [1, min(E = " +
                        to_string(s.experts) + ", " + to_string(detail::max_top_k) + ")]");
    detail::require(std::isfinite(options_.scale) && options_.scale >= 0.0,
                    "grove::cuda: the adjugate scale λ must be finite and >= 0, got " + to_string(options_.scale));
    detail::require(options_.max_tokens >= 1,
                    "grove::cuda: layer_options::max_tokens must be at least 1, got " + to_string(options_.max_tokens));
    const std::size_t mask_bytes = static_cast<std::size_t>(s.mlps()) * options_.top_k * sizeof(std::uint32_t);
    detail::require(mask_bytes <= 48 * 1024,
                    "grove::cuda: (E + G)·k = " + to_string(s.mlps() * options_.top_k) +
                        " exceeds the routing kernel's shared-memory bitmasks (at most 12288)");
    detail::require(
        weights_.router != nullptr && weights_.gate != nullptr && weights_.up != nullptr && weights_.down != nullptr,
        "grove::cuda: the device weights are incomplete (router or pointer tables missing)");
    const double rows = 2.0 * options_.max_tokens * options_.top_k * static_cast<double>(s.hidden);
    detail::require(rows < 9.0e18 && 2.0 * options_.max_tokens * options_.top_k < 2147483647.0,
                    "grove::cuda: max_tokens · k is too large for 32-bit row indices");
  }

  void require_tokens(int tokens) const {
    detail::require(tokens >= 0 && tokens <= options_.max_tokens,
                    "grove::cuda: a batch of " + std::to_string(tokens) +
                        " tokens does not fit this layer's workspace (layer_options::max_tokens = " +
                        std::to_string(options_.max_tokens) + ")");
  }

  /// Router split-K: enough blocks to cover the GPU for small batches (decode), at least four
  /// k-steps per split, at most 16 splits.
  [[nodiscard]] int router_splits(int tokens) const {
    const layer_dims& s = weights_.shape;
    const int tiles = detail::ceil_div(tokens, detail::tile_m) * detail::ceil_div(s.experts, detail::tile_n);
    const int k_steps = detail::ceil_div(s.hidden, detail::tile_k);
    int splits = std::max(1, 2 * sms_ / std::max(tiles, 1));
    splits = std::min({splits, std::max(1, k_steps / 4), 16});
    return splits;
  }

  template <class Kernel>
  int persistent_grid(Kernel kernel, std::size_t smem) const {
    detail::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                  "cudaFuncSetAttribute (dynamic shared memory)");
    int blocks = 0;
    detail::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, detail::tile_threads, smem),
                  "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return std::max(1, blocks) * sms_;
  }

  detail::expert_args<T> expert_args(const T* x, const T* dy) const {
    detail::expert_args<T> a;
    a.w = weights_;
    a.x = x;
    a.dy = dy;
    a.tokens = plan_.tokens;
    a.top_k = options_.top_k;
    a.schedule = schedule_.data();
    a.rows = rows_.data();
    a.act = act_.data();
    a.ticket = counters_.data();
    a.row_tile_ready = counters_.data() + 1;
    a.mlp_ready = counters_.data() + 1 + cap_.row_tiles;
    a.deterministic = options_.combine == combine_mode::deterministic;
    return a;
  }

  device_weights<T> weights_;
  layer_options options_;
  detail::capacity cap_{};
  int max_groups_ = 0;
  int sms_ = 1;
  int forward_grid_ = 1;
  int backward_grid_ = 1;
  std::size_t forward_smem_ = 0;
  std::size_t backward_smem_ = 0;
  std::size_t gemm_smem_ = 0;
  int dw_stride_ = 0;
  detail::routing_args args_;
  device_plan plan_;

  device_buffer<float> partials_, logits_, topk_weights_, group_weights_;
  device_buffer<std::int32_t> topk_ids_, token_groups_, groups_per_token_, pick_group_slot_, row_of_pick_,
      row_of_group_;
  device_buffer<std::uint32_t> chunk_masks_;
  device_buffer<int> chunk_counts_, chunk_base_, schedule_, counters_, error_flag_;
  device_buffer<dispatch_row> rows_;
  device_buffer<T> act_, act_grad_;
  device_buffer<float> row_values_, y_accum_, dw_partial_, dl_;
};

}  // namespace cuda
GROVE_END_NAMESPACE
