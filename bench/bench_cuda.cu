// Benchmarks of the CUDA backend at GroveMoE-Inst's shape (H = 2048, E = 128, k = 8, I = 768,
// G = 64, Ia = 128, λ = 0.05), BF16 weights and activations, for T in {1, 64, 512, 4096}:
//
//   grove_layer                the device path: device_router::route + cuda_runner::forward (the
//                              unified kernel, each activated adjugate once per token), atomic combine
//   grove_layer_deterministic  the same with the canonical, bit-reproducible combine (the runner's default)
//   plain_moe                  the same layer without adjugates: what the routed experts alone cost
//   adjugates_per_pick         adjugates evaluated once per pick, as the released code does
//   routing_only               the four routing launches alone
//   dense_cublas               one cuBLAS BF16 GEMM (fp32 compute) with the layer's FLOPs per token
//
// Times are GPU times between CUDA events around one layer call (manual time). Counters:
// tokens/s and the layer's useful TFLOP/s (2·E·H + 6·H·(k·I + n_g·Ia) per token, n_g from the
// batch's plan). Without a GPU every benchmark reports an error and exits.
//
// Status (docs/cuda.md): compile-checked only; these have not yet been run on a GPU.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <cmath>
#include <cstdint>
#include <grove/config/layer_config.hpp>
#include <grove/cuda.cuh>
#include <memory>
#include <string>

namespace {

namespace gc = grove::cuda;
using bf16 = gc::bfloat16;

constexpr grove::layer_dims dims = grove::grove_moe_inst_dims;
constexpr int top_k = 8;
constexpr double scale = 0.05;
constexpr int max_tokens = 4096;

void check(cudaError_t status, const char* what) { gc::detail::check(status, what); }

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) throw grove::error(std::string("cuBLAS: ") + what + " failed");
}

/// Weights (random, 1.3 GB in BF16) and inputs for the largest batch, made once.
struct setup {
  gc::device_parameters<bf16> params{dims};
  gc::device_buffer<bf16> x{static_cast<std::size_t>(max_tokens) * dims.hidden};
  gc::device_buffer<bf16> y{static_cast<std::size_t>(max_tokens) * dims.hidden};
  cudaStream_t stream = nullptr;

  setup() {
    params.fill_normal(1, 0.02f);
    // Inputs: the same generator over x's buffer (scale 1: router logits of a realistic spread).
    gc::detail::launch("fill_normal_kernel", gc::detail::fill_normal_kernel<bf16>, 1024, 256, 0, nullptr, x.data(),
                       static_cast<std::int64_t>(x.size()), 2, 1.0f);
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    check(cudaDeviceSynchronize(), "benchmark setup");
  }
  ~setup() { (void)cudaStreamDestroy(stream); }

  static setup& get() {
    static setup s;
    return s;
  }
};

bool skip_without_gpu(benchmark::State& state) {
  if (gc::device_count() > 0) return false;
  state.SkipWithError("no CUDA device: the CUDA benchmarks need a GPU");
  return true;
}

/// Times `call` with CUDA events on the setup's stream.
template <class Call>
void time_on_device(benchmark::State& state, cudaStream_t stream, Call&& call) {
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  call();  // warm-up
  check(cudaStreamSynchronize(stream), "warm-up");
  for (auto _ : state) {
    check(cudaEventRecord(start, stream), "cudaEventRecord");
    call();
    check(cudaEventRecord(stop, stream), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    state.SetIterationTime(static_cast<double>(ms) * 1e-3);
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
}

/// FLOPs of one layer call: router, k routed experts per token, and the batch's adjugate rows.
double layer_flops(int tokens, long long adjugate_rows) {
  const double h = static_cast<double>(dims.hidden);
  return 2.0 * tokens * dims.experts * h + 6.0 * h *
                                               (static_cast<double>(tokens) * top_k * dims.expert_intermediate +
                                                static_cast<double>(adjugate_rows) * dims.adjugate_intermediate);
}

void report(benchmark::State& state, int tokens, double flops) {
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["TFLOP_per_s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

/// A runner on the setup's stream whose workspace fits `tokens`, and a router of the setup's layer.
struct device_layer {
  grove::cuda_runner runner;
  gc::device_router<bf16> router;

  device_layer(int tokens, gc::adjugate_mode mode, gc::combine_mode combine)
      : runner(grove::cuda_runner_options{.max_tokens = tokens, .stream = setup::get().stream, .combine = combine}),
        router(runner, setup::get().params.weights(), grove::routing_options{top_k, scale, mode}) {}

  /// y = layer(x) on the device: route, then the experts; no host synchronisation.
  void forward(const bf16* x, bf16* y, int tokens) {
    runner.forward(setup::get().params.weights(), router.route(x, tokens), x, y);
  }
};

template <gc::adjugate_mode Mode, gc::combine_mode Combine = gc::combine_mode::atomic>
void layer_benchmark(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int tokens = static_cast<int>(state.range(0));
  setup& s = setup::get();
  device_layer layer(tokens, Mode, Combine);
  time_on_device(state, s.stream, [&] { layer.forward(s.x.data(), s.y.data(), tokens); });
  const gc::host_plan plan = gc::download(layer.router.plan());
  const long long adjugate_rows = plan.offsets.back() - plan.offsets[static_cast<std::size_t>(dims.experts)];
  state.counters["adjugate_rows_per_token"] = static_cast<double>(adjugate_rows) / tokens;
  report(state, tokens, layer_flops(tokens, adjugate_rows));
}

void BM_grove_layer(benchmark::State& state) { layer_benchmark<gc::adjugate_mode::once_per_token>(state); }
void BM_grove_layer_deterministic(benchmark::State& state) {
  layer_benchmark<gc::adjugate_mode::once_per_token, gc::combine_mode::deterministic>(state);
}
void BM_plain_moe(benchmark::State& state) { layer_benchmark<gc::adjugate_mode::none>(state); }
void BM_adjugates_per_pick(benchmark::State& state) { layer_benchmark<gc::adjugate_mode::once_per_pick>(state); }

void BM_routing_only(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int tokens = static_cast<int>(state.range(0));
  setup& s = setup::get();
  device_layer layer(tokens, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic);
  time_on_device(state, s.stream, [&] { layer.router.route(s.x.data(), tokens); });
  report(state, tokens, 2.0 * tokens * dims.experts * static_cast<double>(dims.hidden));
}

/// Expected distinct groups per token for uniformly random picks: G·(1 − C(E−g, k)/C(E, k)).
double expected_groups() {
  const double e = static_cast<double>(dims.experts), g = static_cast<double>(dims.experts / dims.groups);
  double none_in_group = 1.0;
  for (int i = 0; i < top_k; ++i) none_in_group *= (e - g - i) / (e - i);
  return static_cast<double>(dims.groups) * (1.0 - none_in_group);
}

void BM_dense_cublas(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int tokens = static_cast<int>(state.range(0));
  setup& s = setup::get();
  // A [T, H] × [H, N] GEMM with the layer's FLOPs: 2·H·N = 2·E·H + 6·H·(k·I + n_g·Ia).
  const double ng = expected_groups();
  const int n = static_cast<int>(
      std::lround(dims.experts + 3.0 * (top_k * dims.expert_intermediate + ng * dims.adjugate_intermediate)));
  const int h = static_cast<int>(dims.hidden);
  gc::device_buffer<bf16> w(static_cast<std::size_t>(n) * h), out(static_cast<std::size_t>(tokens) * n);
  gc::detail::launch("fill_normal_kernel", gc::detail::fill_normal_kernel<bf16>, 1024, 256, 0, s.stream, w.data(),
                     static_cast<std::int64_t>(w.size()), 3, 0.02f);
  cublasHandle_t handle = nullptr;
  check(cublasCreate(&handle), "cublasCreate");
  check(cublasSetStream(handle, s.stream), "cublasSetStream");
  const float alpha = 1.0f, beta = 0.0f;
  // Column-major view: out^T [N, T] = W [N, H] (row-major, so op T of a [H, N] matrix) · x^T [H, T].
  time_on_device(state, s.stream, [&] {
    check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, tokens, h, &alpha, w.data(), CUDA_R_16BF, h, s.x.data(),
                       CUDA_R_16BF, h, &beta, out.data(), CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  });
  (void)cublasDestroy(handle);
  state.counters["N"] = n;
  report(state, tokens, 2.0 * tokens * static_cast<double>(h) * n);
}

void batch_sizes(benchmark::internal::Benchmark* b) {
  for (int t : {1, 64, 512, 4096}) b->Arg(t);
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_grove_layer)->Apply(batch_sizes);
BENCHMARK(BM_grove_layer_deterministic)->Apply(batch_sizes);
BENCHMARK(BM_plain_moe)->Apply(batch_sizes);
BENCHMARK(BM_adjugates_per_pick)->Apply(batch_sizes);
BENCHMARK(BM_routing_only)->Apply(batch_sizes);
BENCHMARK(BM_dense_cublas)->Apply(batch_sizes);

}  // namespace

BENCHMARK_MAIN();
