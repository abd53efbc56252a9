#pragma once

#include <mutex>
#include <optional>
#include <string>

#include "grove/error.hpp"
#include "grove/kernels/cpu/engine.hpp"
#include "grove/kernels/cpu/expert_backward.hpp"
#include "grove/kernels/cpu/expert_forward.hpp"
#include "grove/runners/runner.hpp"
#include "grove/simd/arch.hpp"

GROVE_BEGIN_NAMESPACE

/// Settings of a cpu_runner.
struct cpu_runner_options {
  /// Threads of the parallel regions, the caller included; 0: std::thread::hardware_concurrency().
  int threads = 0;
  /// Instruction-set level of the kernels; unset: the best this machine runs (simd::best_isa()).
  std::optional<simd::isa> isa;
  /// Tile sizes of the schedule.
  schedule_shape shape{};
  /// How q8 and q4 weights run: integer dots or dequantized tiles, chosen per expert and
  /// adjugate by its rows by default (docs/quantization.md, "Two paths").
  quantized_kernels quantized = quantized_kernels::automatic;
  /// Under `automatic`, the rows from which an expert or adjugate runs dequantized; 0: the
  /// format's own (none: the integer dots were faster at every shape measured; another CPU may
  /// differ).
  index dequantize_from_rows = 0;
};

/// The CPU runner (docs/performance.md): the fused, multi-threaded pass over every routed expert
/// and activated adjugate of a plan, with SIMD kernels of the chosen instruction-set level, fp32
/// or BF16 weights, and the fused fp32 backward on the same schedule. Results are bitwise
/// identical for every thread count. fp64 weights run the plain per-expert Eigen path
/// (cpu::forward_experts_simple) on the calling thread.
///
/// A runner owns its thread pool and a workspace that grows to the largest batch it has seen:
/// a steady stream of batches allocates nothing. Share one runner among the layers of a model.
/// Two runners run at the same time from two threads; one runner used from two threads runs
/// one call at a time (a mutex serialises them, each call's result is unchanged).
class cpu_runner final : public runner {
 public:
  explicit cpu_runner(const cpu_runner_options& options = {})
      : engine_(options.threads, options.isa ? *options.isa : simd::best_isa(), options.shape, options.quantized,
                options.dequantize_from_rows) {}

  [[nodiscard]] std::string name() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    const int n = engine_.threads();
    return std::string("cpu (") + simd::isa_name(engine_.isa()) + ", " + std::to_string(n) +
           (n == 1 ? " thread)" : " threads)");
  }

  [[nodiscard]] int threads() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_.threads();
  }
  /// Replaces the thread pool (allocates; not for the steady state). 0: hardware_concurrency().
  void set_threads(int threads) {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_.set_threads(threads);
  }
  [[nodiscard]] simd::isa isa() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_.isa();
  }
  /// Forces an instruction-set level; throws grove::error when this machine cannot run it.
  void set_isa(simd::isa level) {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_.set_isa(level);
  }
  [[nodiscard]] schedule_shape shape() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_.shape();
  }
  void set_shape(const schedule_shape& shape) {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_.set_shape(shape);
  }
  [[nodiscard]] quantized_kernels quantized() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_.quantized();
  }
  /// Chooses how q8 and q4 weights run (docs/quantization.md, "Two paths"); takes effect at the next call.
  void set_quantized(quantized_kernels kernels) {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_.set_quantized(kernels);
  }
  /// Wall-clock seconds of the phases of the last fused pass (for benchmarks and tuning).
  [[nodiscard]] pass_timings last_timings() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_.last_timings();
  }
  /// Bytes of workspace held (staging, h, schedules, backward buffers).
  [[nodiscard]] std::size_t workspace_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_.workspace_bytes();
  }
  /// Times the workspace had to grow (a steady stream of batches of one size adds nothing).
  [[nodiscard]] std::size_t workspace_allocations() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_.workspace_allocations();
  }

 protected:
  void run_forward(const expert_forward<float>& request) override { fused_forward(request); }
  void run_forward(const expert_forward<bf16>& request) override { fused_forward(request); }
  void run_forward(const expert_forward<double>& request) override {
    detail::require(request.output == forward_output::combined,
                    "grove: group partials need fp32 or BF16 weights (fp64 runs the plain per-expert path)");
    if (request.saved != nullptr)
      cpu::forward_experts_saving_simple<double>(request.weights, request.plan, request.x, request.y, *request.saved);
    else
      cpu::forward_experts_simple<double>(request.weights, request.plan, request.x, request.y);
  }
  void run_block_forward(const expert_forward<q8_block>& request) override { fused_forward(request); }
  void run_block_forward(const expert_forward<q4_block>& request) override { fused_forward(request); }
  void run_backward(const expert_backward<float>& request) override {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_.backward(request);
  }
  void run_backward(const expert_backward<double>& request) override {
    cpu::backward_experts_simple<double>(request.weights, request.plan, request.x, request.dy, request.saved,
                                         request.grads, request.dx, request.dw);
  }

 private:
  /// The fused pass of every format the engine runs, one call at a time.
  template <class Weight>
  void fused_forward(const expert_forward<Weight>& request) {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_.forward(request);
  }

  mutable std::mutex mutex_;
  detail::cpu_engine engine_;
};

GROVE_END_NAMESPACE
