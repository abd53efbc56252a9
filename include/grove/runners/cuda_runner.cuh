// grove: the CUDA runner (docs/cuda.md, docs/runners.md). Compile with nvcc (C++20, sm_80 or
// newer); included by grove/cuda.cuh.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>

#include "grove/cuda/backward_kernels.cuh"
#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/device_weights.cuh"
#include "grove/cuda/expert_kernels.cuh"
#include "grove/cuda/runner_workspace.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/cuda/tile_gemm.cuh"
#include "grove/cuda/weights_registry.cuh"

// The CPU library's headers are host code written for g++ and clang++: nvcc's front end does not
// know their GCC loop pragmas (diagnostic 1675) and is stricter about unused variables (550).
#if defined(__NVCC__)
#pragma nv_diagnostic push
#pragma nv_diag_suppress 1675
#pragma nv_diag_suppress 550
#endif
#include "grove/cuda/plan_layout.cuh"
#include "grove/plan/backward_inputs.hpp"
#include "grove/plan/batch_shapes.hpp"
#include "grove/runners/runner.hpp"
#if defined(__NVCC__)
#pragma nv_diagnostic pop
#endif

GROVE_BEGIN_NAMESPACE
namespace cuda {

/// How the runner sums a token's terms (the routed experts' and the adjugates' weighted outputs).
enum class combine_mode {
  /// Each row's weighted term to a [rows, H] buffer, then a pass that sums every token's terms
  /// in the canonical order of plan/combine.hpp: bit-reproducible, and forward_partials +
  /// combine_partials give the same bits.
  deterministic,
  /// fp32 atomicAdd of each term into the token's row: no buffer and no extra pass, but the
  /// order, and so the last bits, may change from run to run.
  atomic,
};

template <class T>
class device_router;

namespace detail {
/// The device element type of a host weight type: fp32 stays fp32, grove::bf16 (Eigen's) is
/// __nv_bfloat16 (the same bits).
template <class W>
using device_scalar_t = std::conditional_t<std::is_same_v<W, float>, float, bfloat16>;

/// Launch shapes of the two persistent kernels for one element type: dynamic shared memory and
/// the grid that fills the GPU (SMs × blocks per SM).
struct persistent_shape {
  std::size_t forward_smem = 0, backward_smem = 0;
  int forward_grid = 1, backward_grid = 1;

  template <class T>
  static persistent_shape of(int multiprocessors) {
    persistent_shape s;
    s.forward_smem = std::max(tile_smem_bytes<T>(1, 2, 2), tile_smem_bytes<T>(1, 1, 1));
    s.backward_smem = std::max({tile_smem_bytes<T>(2, 3, 3), tile_smem_bytes<T>(1, 1, 1), tile_smem_bytes<T>(2, 1, 2)});
    s.forward_grid = grid_of(forward_experts_kernel<T>, s.forward_smem, multiprocessors);
    s.backward_grid = grid_of(backward_experts_kernel<T>, s.backward_smem, multiprocessors);
    return s;
  }

 private:
  template <class Kernel>
  static int grid_of(Kernel kernel, std::size_t smem, int multiprocessors) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "cudaFuncSetAttribute (dynamic shared memory)");
    int blocks = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, tile_threads, smem),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return std::max(1, blocks) * multiprocessors;
  }
};
}  // namespace detail
}  // namespace cuda

/// Settings of a cuda_runner.
struct cuda_runner_options {
  /// The largest batch (tokens) one call may carry. Every workspace buffer is sized from it, so
  /// that calls neither allocate once warm nor learn a plan's sizes from the device (a plan
  /// routed on the device has row counts the host never sees). Required: at least 1.
  int max_tokens = 0;
  /// The stream every call is ordered on; nullptr: a stream the runner creates and destroys
  /// (cudaStreamCreate: ordered with the legacy default stream). Pass cudaStreamLegacy to run on
  /// the legacy default stream itself.
  cudaStream_t stream = nullptr;
  /// How a token's terms are summed (cuda::combine_mode).
  cuda::combine_mode combine = cuda::combine_mode::deterministic;
};

/// The CUDA runner (docs/cuda.md): a grove::runner whose expert passes run on one GPU stream —
/// every routed expert and activated adjugate of a plan as tiles of one persistent kernel,
/// fp32 (FMA) or BF16 (tensor cores, fp32 accumulation) weights, and the fp32 backward.
///
/// Two ways in:
///   - the runner contract (host requests): `layer.on(runner)`, runner.forward(weights, plan, x, y),
///     forward_partials, backward. x, y, the plan and the gradients are host memory; a call
///     uploads x and the plan (to_device_layout), runs, downloads the result and returns when it
///     is there. The weights must be on the device first: upload(weights) once per layer (and
///     again after changing them); a call with weights that were not uploaded throws.
///   - the device path: a cuda::device_router routes device x into a device plan, and
///     forward(device_weights, device_plan, x, y) / backward(…) run it on device pointers,
///     asynchronously on stream(), with no host round trip (the fast path).
///
/// The runner owns its stream (or uses the caller's), the error flag the device routing raises,
/// the device copies of uploaded weights and a workspace sized by max_tokens and the largest layer
/// it has run; a steady stream of calls allocates nothing (workspace_allocations()). Share one
/// runner among the layers of a model on one stream; one runner used from two threads runs one
/// call at a time (a mutex serialises the enqueueing). fp64 weights do not run on the GPU: such
/// calls throw a grove::error that names this runner.
class cuda_runner final : public runner {
 public:
  explicit cuda_runner(const cuda_runner_options& options) : options_(options) {
    detail::require(options_.max_tokens >= 1, "grove: cuda_runner_options::max_tokens must be at least 1, got ",
                    options_.max_tokens);
    cuda::detail::check(cudaGetDevice(&device_), "cudaGetDevice");
    cudaDeviceProp properties{};
    cuda::detail::check(cudaGetDeviceProperties(&properties, device_), "cudaGetDeviceProperties");
    device_name_ = properties.name;
    cuda::detail::check(cudaDeviceGetAttribute(&multiprocessors_, cudaDevAttrMultiProcessorCount, device_),
                        "cudaDeviceGetAttribute (multiprocessors)");
    f32_shape_ = cuda::detail::persistent_shape::of<float>(multiprocessors_);
    bf16_shape_ = cuda::detail::persistent_shape::of<cuda::bfloat16>(multiprocessors_);
    error_flag_.allocate(1);
    error_flag_.zero();
    if (options_.stream == nullptr) {
      cuda::detail::check(cudaStreamCreate(&stream_), "cudaStreamCreate");
      owns_stream_ = true;
    } else {
      stream_ = options_.stream;
    }
    cuda::detail::check(cudaDeviceSynchronize(), "setting up the cuda_runner");
  }
  ~cuda_runner() override {
    if (owns_stream_) {
      (void)cudaStreamSynchronize(stream_);
      (void)cudaStreamDestroy(stream_);
    }
  }

  /// "cuda (<device name>, fp32 and bf16 weights)": the GPU and the weight types it runs.
  [[nodiscard]] std::string name() const override { return "cuda (" + device_name_ + ", fp32 and bf16 weights)"; }

  using runner::backward;
  using runner::forward;

  [[nodiscard]] int max_tokens() const { return options_.max_tokens; }
  [[nodiscard]] cudaStream_t stream() const { return stream_; }
  [[nodiscard]] cuda::combine_mode combine() const { return options_.combine; }
  /// The CUDA device the runner was made on (its calls run there) and its multiprocessor count.
  [[nodiscard]] int device() const { return device_; }
  [[nodiscard]] int multiprocessors() const { return multiprocessors_; }

  // ---- host weights on the device --------------------------------------------------------

  /// Copies host weights (fp32, or BF16 such as layer_parameters<bf16>::view()) to the device, once, for
  /// the calls that name them; a later upload of the same view (the same tensor addresses)
  /// copies the new values into the same device memory. Returns the device copy, whose
  /// weights() a cuda::device_router and the device path take. Synchronous; not for hot loops.
  template <class W>
    requires(std::is_same_v<W, float> || std::is_same_v<W, bf16>)
  const cuda::device_parameters<cuda::detail::device_scalar_t<W>>& upload(const weights_view<W>& weights) {
    std::lock_guard<std::mutex> lock(mutex_);
    cuda::detail::device_scope scope(device_);
    weights.require_complete();
    cuda::detail::check(cudaStreamSynchronize(stream_), "waiting for the runner's stream before an upload");
    return registry<W>().upload(weights);
  }
  /// The device copy of `weights`, or nullptr when they were not uploaded.
  template <class W>
    requires(std::is_same_v<W, float> || std::is_same_v<W, bf16>)
  [[nodiscard]] const cuda::device_parameters<cuda::detail::device_scalar_t<W>>* uploaded(
      const weights_view<W>& weights) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return registry<W>().find(weights);
  }
  /// Frees the device copy of `weights`; false when there was none.
  template <class W>
    requires(std::is_same_v<W, float> || std::is_same_v<W, bf16>)
  bool release(const weights_view<W>& weights) {
    std::lock_guard<std::mutex> lock(mutex_);
    cuda::detail::device_scope scope(device_);
    cuda::detail::check(cudaStreamSynchronize(stream_), "waiting for the runner's stream before a release");
    return registry<W>().release(weights);
  }

  // ---- the device path: device plans on device pointers, asynchronous on stream() ---------

  /// y [T, H] = the experts of `plan` applied to x [T, H] (docs/math.md, step 6), all device
  /// memory, T = plan.tokens <= max_tokens. Enqueued on stream(); returns at once.
  template <class T>
  void forward(const cuda::device_weights<T>& weights, const cuda::device_plan& plan, const T* x, T* y) {
    std::lock_guard<std::mutex> lock(mutex_);
    cuda::detail::device_scope scope(device_);
    require_device_pass(weights.shape, plan, "forward");
    if (plan.tokens == 0) return;
    detail::require(x != nullptr && y != nullptr, name(), ": forward got a null x or y");
    const bool per_row = per_row_terms();
    workspace_.reserve_pass<T>(weights.shape, plan.top_k, options_.max_tokens, per_row,
                               !per_row && !std::is_same_v<T, float>, false);
    enqueue_forward<T>(weights, plan, x, y);
  }

  /// The experts' backward of `plan` (docs/math.md, "Backward"), all device memory: ADDS the
  /// experts' share of ∂L/∂x to dx [T, H] and their weight gradients to `grads` (fp32, e.g.
  /// device_parameters<float>::gradients()), and writes dw [T, k] = ∂L/∂w_s. g and u are
  /// recomputed from x. The router's part follows with device_router::backward(plan, x, dw, …).
  template <class T>
  void backward(const cuda::device_weights<T>& weights, const cuda::device_plan& plan, const T* x, const T* dy,
                float* dx, const cuda::device_gradients& grads, float* dw) {
    std::lock_guard<std::mutex> lock(mutex_);
    cuda::detail::device_scope scope(device_);
    require_device_pass(weights.shape, plan, "backward");
    detail::require(grads.shape == weights.shape, name(),
                    ": the gradient buffers have other dimensions (H, E, G, I, Ia) than the weights");
    if (plan.tokens == 0) return;
    detail::require(x != nullptr && dy != nullptr && dx != nullptr && dw != nullptr, name(),
                    ": backward got a null x, dy, dx or dw");
    workspace_.reserve_pass<T>(weights.shape, plan.top_k, options_.max_tokens, per_row_terms(), false, true);
    enqueue_backward<T>(weights, plan, x, dy, dx, grads, dw);
  }

  /// Throws grove::error when a device_router on this runner met a NaN router logit since the
  /// last check (grove::route throws at once; the device raises a flag instead, ranks the NaN
  /// last and goes on), and clears the flag. Synchronises with stream().
  void check_errors() {
    std::lock_guard<std::mutex> lock(mutex_);
    cuda::detail::device_scope scope(device_);
    int flag = 0;
    cuda::detail::check(cudaMemcpyAsync(&flag, error_flag_.data(), sizeof(int), cudaMemcpyDeviceToHost, stream_),
                        "reading the error flag");
    cuda::detail::check(cudaStreamSynchronize(stream_), "reading the error flag");
    if (flag == 0) return;
    error_flag_.zero(stream_);
    throw error(name() + ": a router logit was NaN since the last check_errors() (check the input x and gate.weight)");
  }

  /// Waits until everything enqueued on stream() has run.
  void synchronize() const {
    cuda::detail::device_scope scope(device_);
    cuda::detail::check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  /// Device memory of the workspace (not counting uploaded weights), in bytes.
  [[nodiscard]] std::size_t workspace_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return workspace_.bytes();
  }
  /// Times the workspace had to grow: constant over a steady stream of calls.
  [[nodiscard]] std::size_t workspace_allocations() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return workspace_.allocations;
  }
  /// Device memory of the uploaded weights, in bytes.
  [[nodiscard]] std::size_t uploaded_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return f32_weights_.bytes() + bf16_weights_.bytes();
  }

 protected:
  void run_forward(const expert_forward<float>& request) override { forward_host(request); }
  void run_forward(const expert_forward<bf16>& request) override { forward_host(request); }
  void run_forward(const expert_forward<double>&) override {
    detail::fail(name(), ": fp64 (double) weights do not run on the GPU; the CUDA kernels take fp32 and BF16 "
                         "weights (run fp64 on a grove::cpu_runner)");
  }
  void run_backward(const expert_backward<float>& request) override { backward_host(request); }
  void run_backward(const expert_backward<double>&) override {
    detail::fail(name(), ": fp64 (double) weights do not run on the GPU; the CUDA backward takes fp32 weights "
                         "(run fp64 on a grove::cpu_runner)");
  }

 private:
  template <class>
  friend class cuda::device_router;

  static constexpr int combine_threads = 256;

  [[nodiscard]] bool per_row_terms() const { return options_.combine == cuda::combine_mode::deterministic; }

  template <class T>
  [[nodiscard]] const cuda::detail::persistent_shape& shape_of() const {
    if constexpr (std::is_same_v<T, float>)
      return f32_shape_;
    else
      return bf16_shape_;
  }
  template <class W>
  cuda::detail::weights_registry<cuda::detail::device_scalar_t<W>>& registry() {
    if constexpr (std::is_same_v<W, float>)
      return f32_weights_;
    else
      return bf16_weights_;
  }
  template <class W>
  const cuda::detail::weights_registry<cuda::detail::device_scalar_t<W>>& registry() const {
    if constexpr (std::is_same_v<W, float>)
      return f32_weights_;
    else
      return bf16_weights_;
  }

  /// The checks of a plan every pass makes: it fits the workspace, its k the kernels, its layer
  /// the weights.
  void require_plan_sizes(index tokens, index top_k, index experts, index groups, const layer_dims& d,
                          const char* pass) const {
    detail::require(tokens >= 0 && tokens <= options_.max_tokens, name(), ": a batch of ", tokens,
                    " tokens does not fit max_tokens = ", options_.max_tokens, " (cuda_runner_options::max_tokens; ",
                    pass, ")");
    detail::require(top_k >= 1 && top_k <= cuda::detail::max_top_k, name(), ": top-k k = ", top_k,
                    " must lie in [1, ", cuda::detail::max_top_k, "] (", pass, ")");
    detail::require(experts == d.experts && groups == d.groups, name(), ": the plan was made for a layer with (E, G) = (",
                    experts, ", ", groups, ") but the weights have (", d.experts, ", ", d.groups, ") (", pass, ")");
    detail::require(2.0 * options_.max_tokens * static_cast<double>(top_k) < 2147483647.0, name(),
                    ": max_tokens · k = ", options_.max_tokens, " · ", top_k,
                    " is too large for the kernels' 32-bit row indices");
  }
  void require_device_pass(const layer_dims& d, const cuda::device_plan& plan, const char* pass) const {
    require_plan_sizes(plan.tokens, plan.top_k, plan.experts, plan.groups, d, pass);
  }

  /// The device copy of host weights given to a runner call; throws when there is none.
  template <class W>
  const cuda::device_parameters<cuda::detail::device_scalar_t<W>>& device_copy(const weights_view<W>& weights) const {
    const auto* found = registry<W>().find(weights);
    if (found == nullptr)
      detail::fail(name(), ": these weights (H, E, G, I, Ia) = (", weights.dims().hidden, ", ", weights.dims().experts,
                   ", ", weights.dims().groups, ", ", weights.dims().expert_intermediate, ", ",
                   weights.dims().adjugate_intermediate,
                   ") are not on the device; call cuda_runner::upload(weights) once before running them (and again "
                   "after changing them)");
    return *found;
  }

  // ---- enqueueing the passes (the lock is held) -----------------------------------------

  template <class T>
  cuda::detail::expert_args<T> expert_args(const cuda::device_weights<T>& w, const cuda::device_plan& plan, const T* x,
                                           const T* dy) {
    const cuda::detail::capacity cap =
        cuda::detail::capacity::of(options_.max_tokens, plan.top_k, static_cast<int>(w.shape.mlps()));
    cuda::detail::expert_args<T> a;
    a.w = w;
    a.x = x;
    a.dy = dy;
    a.schedule = plan.offsets;
    a.rows = plan.rows;
    a.act = workspace_.act<T>().data();
    a.ticket = workspace_.counters.data();
    a.row_tile_ready = workspace_.counters.data() + 1;
    a.mlp_ready = workspace_.counters.data() + 1 + cap.row_tiles;
    a.deterministic = per_row_terms();
    return a;
  }

  /// The forward kernel with its output `out`: [T, H] sums (atomic, zeroed first) or [rows, H]
  /// per-row terms (`per_row`).
  template <class T>
  void enqueue_expert_kernel(const cuda::device_weights<T>& w, const cuda::device_plan& plan, const T* x, float* out,
                             bool per_row) {
    cuda::detail::expert_args<T> a = expert_args(w, plan, x, static_cast<const T*>(nullptr));
    a.deterministic = per_row;
    a.out = out;
    if (!per_row)
      cuda::detail::check(
          cudaMemsetAsync(out, 0, static_cast<std::size_t>(plan.tokens) * w.shape.hidden * sizeof(float), stream_),
          "cudaMemsetAsync of y");
    workspace_.counters.zero(stream_);
    const auto& shape = shape_of<T>();
    cuda::detail::launch("forward_experts_kernel", cuda::detail::forward_experts_kernel<T>, shape.forward_grid,
                         cuda::detail::tile_threads, shape.forward_smem, stream_, a);
  }

  /// The canonical combine of per-row terms into out [T, H] (y from 0, or dx from itself).
  template <class Out>
  void enqueue_combine(const cuda::device_plan& plan, int hidden, Out* out, bool accumulate) {
    const dim3 grid(static_cast<unsigned>(plan.tokens), static_cast<unsigned>(cuda::detail::ceil_div(hidden, combine_threads)));
    cuda::detail::launch("combine_kernel", cuda::detail::combine_kernel<Out>, grid, combine_threads, 0, stream_, plan,
                         workspace_.row_values.data(), hidden, out, accumulate);
  }

  /// y = the experts of `plan` on x, Out = T (device path) or float (host requests).
  template <class T, class Out>
  void enqueue_forward(const cuda::device_weights<T>& w, const cuda::device_plan& plan, const T* x, Out* y) {
    const int hidden = static_cast<int>(w.shape.hidden);
    if (per_row_terms()) {
      enqueue_expert_kernel(w, plan, x, workspace_.row_values.data(), true);
      enqueue_combine<Out>(plan, hidden, y, false);
    } else if constexpr (std::is_same_v<Out, float>) {
      enqueue_expert_kernel(w, plan, x, y, false);
    } else {
      enqueue_expert_kernel(w, plan, x, workspace_.y_accum.data(), false);
      cuda::detail::launch("convert_kernel", cuda::detail::convert_kernel<Out>, 1024, 256, 0, stream_,
                           workspace_.y_accum.data(), y, static_cast<std::int64_t>(plan.tokens) * hidden);
    }
  }

  template <class T>
  void enqueue_backward(const cuda::device_weights<T>& w, const cuda::device_plan& plan, const T* x, const T* dy,
                        float* dx, const cuda::device_gradients& grads, float* dw) {
    const layer_dims& d = w.shape;
    const int hidden = static_cast<int>(d.hidden);
    cuda::detail::expert_args<T> a = expert_args(w, plan, x, dy);
    a.grads = grads;
    a.act_grad = workspace_.act_grad<T>().data();
    a.dw_partial = workspace_.dw_partial.data();
    a.dw_stride = cuda::detail::dw_stride_of(d);
    a.out = a.deterministic ? workspace_.row_values.data() : dx;
    workspace_.counters.zero(stream_);
    const auto& shape = shape_of<T>();
    cuda::detail::launch("backward_experts_kernel", cuda::detail::backward_experts_kernel<T>, shape.backward_grid,
                         cuda::detail::tile_threads, shape.backward_smem, stream_, a);
    if (a.deterministic) enqueue_combine<float>(plan, hidden, dx, true);
    cuda::detail::pick_grad_args g;
    g.plan = plan;
    g.dw_partial = workspace_.dw_partial.data();
    g.dw_stride = a.dw_stride;
    g.expert_tiles = cuda::detail::ceil_div(static_cast<int>(d.expert_intermediate), cuda::detail::tile_n);
    g.adjugate_tiles = cuda::detail::ceil_div(static_cast<int>(d.adjugate_intermediate), cuda::detail::tile_n);
    g.dw = dw;
    const auto picks = static_cast<int>(plan.tokens * plan.top_k);
    cuda::detail::launch("pick_grad_kernel", cuda::detail::pick_grad_kernel<>,
                         static_cast<unsigned>(cuda::detail::ceil_div(picks, cuda::detail::routing_threads)),
                         cuda::detail::routing_threads, 0, stream_, g);
  }

  // ---- host requests -------------------------------------------------------------------

  /// Copies a host [rows, cols] row block (any row stride) to packed device memory, or back.
  template <class U>
  void copy_rows_to_device(U* device, const U* host, index host_stride, index rows, index cols) {
    if (rows == 0) return;
    const std::size_t width = static_cast<std::size_t>(cols) * sizeof(U);
    cuda::detail::check(cudaMemcpy2DAsync(device, width, host, static_cast<std::size_t>(host_stride) * sizeof(U), width,
                                          static_cast<std::size_t>(rows), cudaMemcpyHostToDevice, stream_),
                        "cudaMemcpy2DAsync to device");
  }
  template <class U>
  void copy_rows_to_host(U* host, index host_stride, const U* device, index rows, index cols) {
    if (rows == 0) return;
    const std::size_t width = static_cast<std::size_t>(cols) * sizeof(U);
    cuda::detail::check(cudaMemcpy2DAsync(host, static_cast<std::size_t>(host_stride) * sizeof(U), device, width, width,
                                          static_cast<std::size_t>(rows), cudaMemcpyDeviceToHost, stream_),
                        "cudaMemcpy2DAsync to host");
  }

  /// Uploads a host plan (in the device layout) and returns its device view.
  cuda::device_plan upload_plan(const routing_plan<float>& plan, const layer_dims& d) {
    workspace_.reserve_host_plan(d, static_cast<int>(plan.top_k), options_.max_tokens);
    cuda::to_device_layout(plan, d, workspace_.host);
    workspace_.plan.upload(workspace_.host, stream_);
    return workspace_.plan.view(d, static_cast<int>(plan.top_k), static_cast<float>(plan.scale), plan.adjugates,
                                static_cast<int>(plan.tokens), error_flag_.data());
  }

  /// x on the device as T: fp32 as it is; for BF16 weights rounded to BF16 on the device (the
  /// BF16 kernels read BF16 activations, as the CPU's AVX512_BF16 kernels do).
  template <class T>
  const T* upload_input(const_rows_ref<float> x) {
    workspace_.reserve(workspace_.x, static_cast<std::size_t>(options_.max_tokens) * static_cast<std::size_t>(x.cols()));
    copy_rows_to_device(workspace_.x.data(), x.data(), x.outerStride(), x.rows(), x.cols());
    if constexpr (std::is_same_v<T, float>) {
      return workspace_.x.data();
    } else {
      workspace_.reserve(workspace_.x_bf16, workspace_.x.size());
      cuda::detail::launch("convert_kernel", cuda::detail::convert_kernel<T>, 1024, 256, 0, stream_,
                           workspace_.x.data(), workspace_.x_bf16.data(), static_cast<std::int64_t>(x.rows() * x.cols()));
      return workspace_.x_bf16.data();
    }
  }

  template <class W>
  void forward_host(const expert_forward<W>& request) {
    using T = cuda::detail::device_scalar_t<W>;
    std::lock_guard<std::mutex> lock(mutex_);
    cuda::detail::device_scope scope(device_);
    const layer_dims& d = request.weights.dims();
    const routing_plan<float>& plan = request.plan;
    grove::detail::require_batch_shapes(d, plan, request.x.rows(), request.x.cols(), "input x");
    const bool partials = request.output == forward_output::group_partials;
    if (partials)
      detail::require(request.y.rows() == plan.group_row_count() && request.y.cols() == d.hidden, name(),
                      ": the group partials are [", request.y.rows(), ", ", request.y.cols(),
                      "] but the plan and layer expect [", plan.group_row_count(), ", ", d.hidden,
                      "] (one row per token and picked group)");
    else
      grove::detail::require_batch_shapes(d, plan, request.y.rows(), request.y.cols(), "output y");
    detail::require(request.saved == nullptr, name(),
                    ": the training forward (saved activations) is not supported: the CUDA backward recomputes g "
                    "and u from x; run forward() and give backward() no saved activations");
    require_plan_sizes(plan.tokens, plan.top_k, plan.experts, plan.groups, d, "forward");
    const auto& weights = device_copy(request.weights);
    if (plan.tokens == 0) return;

    const bool per_row = partials || per_row_terms();
    workspace_.reserve_pass<T>(d, static_cast<int>(plan.top_k), options_.max_tokens, per_row, false, false);
    const std::size_t max_rows =
        static_cast<std::size_t>(options_.max_tokens) * static_cast<std::size_t>(std::max<index>(plan.max_groups(), 1));
    workspace_.reserve(workspace_.out, max_rows * static_cast<std::size_t>(d.hidden));
    const cuda::device_plan device_plan = upload_plan(plan, d);
    const T* x = upload_input<T>(request.x);
    if (partials) {
      workspace_.reserve(workspace_.group_rows, max_rows);
      workspace_.group_rows.upload_async(plan.adjugate_rows, stream_);
      enqueue_expert_kernel(weights.weights(), device_plan, x, workspace_.row_values.data(), true);
      if (plan.group_row_count() > 0) {
        const dim3 grid(static_cast<unsigned>(plan.group_row_count()),
                        static_cast<unsigned>(cuda::detail::ceil_div(static_cast<int>(d.hidden), combine_threads)));
        cuda::detail::launch("group_partials_kernel", cuda::detail::group_partials_kernel<>, grid, combine_threads, 0,
                             stream_, device_plan, workspace_.row_values.data(), workspace_.group_rows.data(),
                             static_cast<int>(d.hidden), workspace_.out.data());
      }
    } else {
      enqueue_forward<T, float>(weights.weights(), device_plan, x, workspace_.out.data());
    }
    rows_ref<float> y = request.y;  // a request is read-only; the Ref it holds writes
    copy_rows_to_host(y.data(), y.outerStride(), workspace_.out.data(), y.rows(), d.hidden);
    cuda::detail::check(cudaStreamSynchronize(stream_), "the forward");
  }

  void backward_host(const expert_backward<float>& request) {
    std::lock_guard<std::mutex> lock(mutex_);
    cuda::detail::device_scope scope(device_);
    const layer_dims& d = request.weights.dims();
    const routing_plan<float>& plan = request.plan;
    rows_ref<float> dx = request.dx;  // a request is read-only; the Ref it holds writes
    // The saved activations are checked, not read: the device recomputes g and u (the same values).
    grove::detail::require_backward_inputs<float>(d, plan, request.x, request.dy, request.dx, request.grads.dims(),
                                                  request.saved);
    require_plan_sizes(plan.tokens, plan.top_k, plan.experts, plan.groups, d, "backward");
    const auto& weights = device_copy(request.weights);
    request.dw.setZero(plan.tokens, plan.top_k);
    if (plan.tokens == 0) return;

    const auto max_tokens = static_cast<std::size_t>(options_.max_tokens);
    const auto hidden = static_cast<std::size_t>(d.hidden);
    workspace_.reserve_pass<float>(d, static_cast<int>(plan.top_k), options_.max_tokens, per_row_terms(), false, true);
    workspace_.reserve(workspace_.dy, max_tokens * hidden);
    workspace_.reserve(workspace_.dx, max_tokens * hidden);
    workspace_.reserve(workspace_.dw, max_tokens * static_cast<std::size_t>(plan.top_k));
    cuda::device_parameters<float>& grads = workspace_.gradients(d);
    const cuda::device_plan device_plan = upload_plan(plan, d);
    const float* x = upload_input<float>(request.x);
    copy_rows_to_device(workspace_.dy.data(), request.dy.data(), request.dy.outerStride(), plan.tokens, d.hidden);
    // dx from the caller's values: the canonical dx rule starts from them (plan/combine.hpp).
    copy_rows_to_device(workspace_.dx.data(), dx.data(), dx.outerStride(), plan.tokens, d.hidden);
    // The gradients of the MLPs with rows start at zero here and are added to the caller's on the
    // host (0 + s == s: the caller's grads + the device's sums, as the CPU adds them).
    const std::vector<std::int32_t>& offsets = workspace_.host.offsets;
    auto mlp_rows = [&](index m) { return offsets[static_cast<std::size_t>(m) + 1] - offsets[static_cast<std::size_t>(m)]; };
    auto mlp_block = [&](index m) { return static_cast<std::size_t>(3 * d.intermediate(m) * d.hidden); };
    for (index m = 0; m < d.mlps(); ++m)
      if (mlp_rows(m) > 0)
        cuda::detail::check(cudaMemsetAsync(grads.values() + cuda::detail::flat_mlp_offset(d, m), 0,
                                            mlp_block(m) * sizeof(float), stream_),
                            "cudaMemsetAsync of the gradients");
    enqueue_backward<float>(weights.weights(), device_plan, x, workspace_.dy.data(), workspace_.dx.data(),
                            grads.gradients(), workspace_.dw.data());
    copy_rows_to_host(dx.data(), dx.outerStride(), workspace_.dx.data(), plan.tokens, d.hidden);
    copy_rows_to_host(request.dw.data(), plan.top_k, workspace_.dw.data(), plan.tokens, plan.top_k);
    for (index m = 0; m < d.mlps(); ++m) {
      if (mlp_rows(m) == 0) continue;
      float* stage = workspace_.grads_host.data();
      cuda::detail::check(cudaMemcpyAsync(stage, grads.values() + cuda::detail::flat_mlp_offset(d, m),
                                          mlp_block(m) * sizeof(float), cudaMemcpyDeviceToHost, stream_),
                          "cudaMemcpyAsync of the gradients");
      cuda::detail::check(cudaStreamSynchronize(stream_), "the backward");
      const index n = d.intermediate(m);
      swiglu_weights<float> g = m < d.experts ? request.grads.expert(m) : request.grads.adjugate(m - d.experts);
      g.gate += matrix_map<const float>(stage, n, d.hidden);
      g.up += matrix_map<const float>(stage + n * d.hidden, n, d.hidden);
      g.down += matrix_map<const float>(stage + 2 * n * d.hidden, d.hidden, n);
    }
    cuda::detail::check(cudaStreamSynchronize(stream_), "the backward");
  }

  cuda_runner_options options_;
  int device_ = 0;
  int multiprocessors_ = 1;
  std::string device_name_;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;
  cuda::detail::persistent_shape f32_shape_, bf16_shape_;

  mutable std::mutex mutex_;
  cuda::device_buffer<int> error_flag_;
  cuda::detail::weights_registry<float> f32_weights_;
  cuda::detail::weights_registry<cuda::bfloat16> bf16_weights_;
  cuda::detail::runner_workspace workspace_;
};

GROVE_END_NAMESPACE
