// CPU benchmarks of the Grove layer at GroveMoE-Inst's shape (H = 2048, E = 128, k = 8, I = 768,
// G = 64, Ia = 128, λ = 0.05), with the baselines the targets in docs/performance.md refer to.
//
//   grove/<fmt>/T:<T>/threads:<n>      the fused expert pass (grove::cpu_runner) on a routed plan
//   route/T:<T>                        routing (grove::route) of the same batch, for the layer total
//   route_into/T:<T>                   grove::route_into a reused plan, k and group size at run time
//   route_fixed/T:<T>                  the same with k = 8 and group size 2 fixed at compile time
//   dense_sgemm/T:<T>/threads:<n>      (a) Eigen sgemm of the same FLOPs: X[T,H] · W[N,H]ᵀ
//   read_sweep/<fmt>/T:<T>/threads:<n> (b) a read of exactly the weight bytes the forward needs
//   fma_peak/threads:<n>               (c) register-only FMA loop
//   per_pick/<fmt>/T:<T>/threads:<n>   (d) adjugates evaluated once per pick (released code)
//   plain_moe/<fmt>/T:<T>/threads:<n>  (e) the same layer without adjugates
//   naive/T:<T>                        (f) token by token, Eigen matrix-vector products
//   simple/T:<T>                       cpu::forward_experts_simple (the former kernel)
//   grove/{q8,q4}/T:<T>/threads:<n>    the same pass with block-quantized weights (formats/quantized.hpp)
//   cold/<fmt>/T:<T>/threads:<n>       decode (T = 1, 16) with the weights out of cache: each
//                                      iteration runs the next of 16 batches of other tokens, whose
//                                      experts together exceed the last-level cache, as a 48-layer
//                                      decode does (the grove/ cases repeat one batch)
//   backward/fp32/T:<T>/threads:<n>    the fused backward (cpu_runner::backward) from saved g, u
//   backward_recompute/fp32/...        the same, recomputing g and u (no saved activations)
//   simple_backward/T:<T>              cpu::backward_experts_simple (per-item Eigen, one thread)
//
// Counters: tokens_per_s, gflops (activated FLOPs per second), weight_gbps (bytes of the weights
// the batch activates, per second; for backward: the weights read once and their gradients read
// and written once, 3× the forward's bytes, over the backward's 2× FLOPs). Random router weights route nearly uniformly: at T = 128
// almost every expert is activated. Regenerate docs/performance.md with
//   python3 scripts/bench_table.py --bench <build>/bench/bench_layer --out docs/performance.md
// g++ 12 with -march=native (AVX-512) reports its own intrinsics' `__m512 __Y = __Y;` as
// uninitialised wherever Eigen's AVX-512 packet math is inlined (GCC bug 105593); the headers
// are system headers but the report lands on this file. Nothing here reads an uninitialised value.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <benchmark/benchmark.h>

#include <grove/grove.hpp>
#include <grove/weights/layer_parameters.hpp>
#include <grove/kernels/cpu/expert_backward.hpp>
#include <grove/runners/cpu_runner.hpp>
#include <grove/kernels/cpu/expert_forward.hpp>
#include <grove/kernels/cpu/thread_pool.hpp>
#include <grove/simd/batch.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

using grove::index;
using grove::row_matrix;

constexpr grove::layer_dims dims = grove::grove_moe_inst_dims;
constexpr index top_k = 8;
constexpr double lambda = 0.05;
constexpr index token_counts[] = {1, 16, 128, 512};
/// The batch sizes of the kernels/ cases: where q8 and q4 cross over from the integer dots to
/// the dequantized tiles (format_kernels.hpp, dequantize_from_rows).
constexpr index crossover_counts[] = {16, 32, 64, 128, 512};

// ---------------------------------------------------------------------------------------------
// The layer, built once: fp32 weights in a huge-page buffer (values do not matter for speed;
// a fast generator fills them uniformly with the std of N(0, 0.02²)), their bf16 copy, inputs
// and the plans of every batch size.
// ---------------------------------------------------------------------------------------------
void fill_uniform(float* p, std::size_t n, std::uint64_t seed, float stddev) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  const float scale = stddev * 3.4641016f / 16777216.0f;  // uniform with this standard deviation
  for (std::size_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    p[i] = scale * (static_cast<float>((s >> 40) & 0xFFFFFF) - 8388608.0f);
  }
}

/// Adjugates once per pick (weight λ·w_s), as the released code evaluates them: (d).
grove::routing_plan<float> per_pick_plan(const grove::routing_plan<float>& plan) {
  grove::routing_plan<float> out = plan;
  out.adjugates = grove::adjugate_mode::once_per_pick;
  return out;
}

/// The same routing without adjugates: (e).
grove::routing_plan<float> plain_moe_plan(const grove::routing_plan<float>& plan) {
  grove::routing_plan<float> out = plan;
  out.adjugates = grove::adjugate_mode::none;
  return out;
}

struct batch_plans {
  grove::routing_plan<float> grove, per_pick, plain_moe;
};

/// Batches of decode that rotate through other tokens (cold/ cases): batch i of size T is rows
/// [i·T, (i + 1)·T) of x.
constexpr int cold_batches = 16;

struct model {
  std::vector<float, grove::detail::huge_page_allocator<float>> values;
  grove::weights_view<float> f32;
  grove::layer_parameters<grove::bf16> bf16;
  row_matrix<float> x;  // [512, H]
  std::map<index, batch_plans> plans_f32, plans_bf16;
  std::map<std::pair<index, bool>, std::vector<grove::routing_plan<float>>> cold_plans;  // (T, bf16): the batches' plans

  /// The block formats, quantized from the fp32 weights on first use (their routing is the fp32
  /// router's: plans_f32 serve them).
  template <class Block>
  const grove::layer_parameters<Block>& blocks() {
    static const grove::layer_parameters<Block> quantized = grove::layer_parameters<Block>::from(f32);
    return quantized;
  }
  /// The cold batches' plans: routed by the fp32 router, or by BF16's (its router rounded).
  const std::vector<grove::routing_plan<float>>& cold(index T, bool bf16_router) {
    auto& plans = cold_plans[{T, bf16_router}];
    if (plans.empty())
      for (int i = 0; i < cold_batches; ++i)
        plans.push_back(grove::route<float>(bf16_router ? bf16.routing_view() : f32, {top_k, lambda}, x.middleRows(i * T, T)));
    return plans;
  }

  model() : values(static_cast<std::size_t>(grove::total_parameters(dims))), f32(dims) {
    fill_uniform(values.data(), values.size(), 1, 0.02f);
    grove::weights_span<float> span(dims);
    float* cursor = values.data();
    span.for_each_tensor([&](const grove::tensor_info& info, float*& p) {
      if (info.role == grove::tensor_role::selection_bias) return;
      p = cursor;
      cursor += info.size();
    });
    f32 = span;
    bf16 = grove::layer_parameters<grove::bf16>::from(f32);
    x.resize(token_counts[3], dims.hidden);
    fill_uniform(x.data(), static_cast<std::size_t>(x.size()), 2, 1.0f);
    std::vector<index> counts(std::begin(token_counts), std::end(token_counts));
    counts.insert(counts.end(), std::begin(crossover_counts), std::end(crossover_counts));
    for (index T : counts) {
      auto make = [&](const grove::weights_view<float>& router) {
        batch_plans p;
        p.grove = grove::route<float>(router, {top_k, lambda}, x.topRows(T));
        p.per_pick = per_pick_plan(p.grove);
        p.plain_moe = plain_moe_plan(p.grove);
        return p;
      };
      plans_f32[T] = make(f32);
      plans_bf16[T] = make(bf16.routing_view());
    }
  }
};

model& the_model() {
  static model m;
  return m;
}

grove::cpu_runner& engine(int threads, grove::quantized_kernels kernels = grove::quantized_kernels::automatic) {
  static std::map<std::pair<int, grove::quantized_kernels>, std::unique_ptr<grove::cpu_runner>> engines;
  auto& e = engines[{threads, kernels}];
  if (!e) {
    grove::cpu_runner_options options;
    options.threads = threads;
    options.quantized = kernels;
    e = std::make_unique<grove::cpu_runner>(options);
  }
  return *e;
}

grove::detail::thread_pool& pool(int threads) {
  static std::map<int, std::unique_ptr<grove::detail::thread_pool>> pools;
  auto& p = pools[threads];
  if (!p) p = std::make_unique<grove::detail::thread_pool>(threads);
  return *p;
}

// ---------------------------------------------------------------------------------------------
// What a plan costs: activated FLOPs (2 per multiply-add: 6·H·inter per row) and the weight
// bytes of the experts and adjugates it activates (each read once).
// ---------------------------------------------------------------------------------------------
struct plan_cost {
  double flops = 0;
  double bytes = 0;
  double rows = 0, items = 0;  // rows over the experts and adjugates with rows (the CPU runner's rows per item)
  std::vector<std::pair<const void*, std::size_t>> ranges;  // weight tensors read
};

template <class W>
plan_cost cost_of(const grove::weights_view<W>& w, const grove::routing_plan<float>& plan) {
  plan_cost c;
  auto add = [&](const grove::mlp_tensors<const W>& mlp, std::size_t rows) {
    if (rows == 0) return;
    c.rows += double(rows);
    c.items += 1;
    const auto inter = static_cast<double>(mlp.inter);
    c.flops += 6.0 * double(dims.hidden) * inter * double(rows);
    // Bytes as stored: gate and up are [inter, H], down [H, inter], in the format's units.
    const auto units = [](index rows_, index cols) {
      return static_cast<std::size_t>(rows_ * grove::units_per_row<W>(cols)) * sizeof(W);
    };
    const std::size_t sizes[] = {units(mlp.inter, dims.hidden), units(mlp.inter, dims.hidden), units(dims.hidden, mlp.inter)};
    const W* starts[] = {mlp.gate, mlp.up, mlp.down};
    for (int i = 0; i < 3; ++i) {
      c.ranges.emplace_back(starts[i], sizes[i]);
      c.bytes += double(sizes[i]);
    }
  };
  for (index e = 0; e < dims.experts; ++e) add(w.expert_tensors(e), plan.rows_of_expert(e).size());
  // Adjugate rows by mode: the plan's group rows, one per pick, or none.
  for (index j = 0; j < dims.groups; ++j) {
    std::size_t rows = 0;
    if (plan.adjugates == grove::adjugate_mode::once_per_token) {
      rows = plan.rows_of_adjugate(j).size();
    } else if (plan.adjugates == grove::adjugate_mode::once_per_pick) {
      for (index e = j * plan.group_size; e < (j + 1) * plan.group_size; ++e) rows += plan.rows_of_expert(e).size();
    }
    add(w.adjugate_tensors(j), rows);
  }
  return c;
}

/// CPU seconds of the whole process (all threads) since construction: on a shared machine the
/// wall-clock time includes waiting for a core; rates per CPU-second show what the code does
/// when it runs.
struct process_cpu_timer {
  double start = now();
  static double now() {
    timespec t{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
  }
  [[nodiscard]] double elapsed() const { return now() - start; }
};

void set_counters(benchmark::State& state, index T, const plan_cost& c, const process_cpu_timer& cpu) {
  using benchmark::Counter;
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["cpu_s_per_iter"] = cpu.elapsed() / iterations;
  state.counters["tokens_per_s"] = Counter(double(T) * iterations, Counter::kIsRate);
  state.counters["gflops"] = Counter(c.flops * 1e-9 * iterations, Counter::kIsRate);
  state.counters["weight_gbps"] = Counter(c.bytes * 1e-9 * iterations, Counter::kIsRate);
  state.counters["flops_per_iter"] = c.flops;
  state.counters["bytes_per_iter"] = c.bytes;
  state.counters["rows_per_item"] = c.items > 0 ? c.rows / c.items : 0;
}

enum class format { fp32, bf16, q8, q4 };
enum class variant { grove, per_pick, plain_moe };

/// Calls fn(weights view) with the model's weights in `fmt`.
template <class Fn>
decltype(auto) with_weights(format fmt, Fn&& fn) {
  model& m = the_model();
  switch (fmt) {
    case format::bf16: return fn(m.bf16.view());
    case format::q8: return fn(m.blocks<grove::q8_block>().view());
    case format::q4: return fn(m.blocks<grove::q4_block>().view());
    case format::fp32: break;
  }
  return fn(m.f32);
}

void bm_experts(benchmark::State& state, format fmt, variant which, index T, int threads,
                grove::quantized_kernels kernels = grove::quantized_kernels::automatic) {
  model& m = the_model();
  const batch_plans& plans = fmt == format::bf16 ? m.plans_bf16.at(T) : m.plans_f32.at(T);
  const grove::routing_plan<float>& plan =
      which == variant::grove ? plans.grove : which == variant::per_pick ? plans.per_pick : plans.plain_moe;
  grove::cpu_runner& eng = engine(threads, kernels);
  row_matrix<float> y(T, dims.hidden);
  const auto x = m.x.topRows(T);
  plan_cost c;
  const process_cpu_timer cpu;
  with_weights(fmt, [&](const auto& weights) {
    for (auto _ : state) {
      eng.forward(weights, plan, x, y);
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
    }
    c = cost_of(weights, plan);
  });
  set_counters(state, T, c, cpu);
  state.counters["workspace_mb"] = double(eng.workspace_bytes()) * 1e-6;
  state.counters["gate_up_ms"] = eng.last_timings().gate_up * 1e3;
  state.counters["down_ms"] = eng.last_timings().down * 1e3;
  state.SetLabel(grove::simd::isa_name(eng.isa()));
}

/// Decode with cold weights: iteration i runs batch i mod 16 of other tokens, so that the weights
/// a batch reads were last read 15 batches ago, with some 600 MB (fp32) to 150 MB (q4) of other
/// experts in between: out of the last-level cache, as in a 48-layer model's decode.
void bm_cold(benchmark::State& state, format fmt, index T, int threads) {
  model& m = the_model();
  const std::vector<grove::routing_plan<float>>& batches = m.cold(T, fmt == format::bf16);
  grove::cpu_runner& eng = engine(threads);
  row_matrix<float> y(T, dims.hidden);
  plan_cost c;
  const process_cpu_timer cpu;
  with_weights(fmt, [&](const auto& weights) {
    int i = 0;
    for (auto _ : state) {
      eng.forward(weights, batches[static_cast<std::size_t>(i)], m.x.middleRows(i * T, T), y);
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
      i = (i + 1) % cold_batches;
    }
    for (const auto& plan : batches) {
      const plan_cost one = cost_of(weights, plan);
      c.flops += one.flops / cold_batches;
      c.bytes += one.bytes / cold_batches;
    }
  });
  set_counters(state, T, c, cpu);
  state.SetLabel(grove::simd::isa_name(eng.isa()));
}

/// Gradient buffers of the whole layer (2.4 GB; pages are touched only where a batch activates).
grove::layer_parameters<float>& gradient_buffers() {
  static grove::layer_parameters<float> grads(dims);
  return grads;
}

/// A backward's cost: twice the forward's FLOPs (r = Dᵀdy, ∂D, ∂G and ∂U, dx), and the weights
/// read once plus their gradients read and written once.
plan_cost backward_cost(const grove::routing_plan<float>& plan) {
  plan_cost c = cost_of(the_model().f32, plan);
  c.flops *= 2;
  c.bytes *= 3;
  return c;
}

void bm_backward(benchmark::State& state, index T, int threads, bool keep_activations) {
  model& m = the_model();
  const grove::routing_plan<float>& plan = m.plans_f32.at(T).grove;
  grove::cpu_runner& eng = engine(threads);
  const auto x = m.x.topRows(T);
  // dy: any values; the rows of x will do.
  const row_matrix<float> dy = m.x.bottomRows(T);
  row_matrix<float> y(T, dims.hidden), dx = row_matrix<float>::Zero(T, dims.hidden), dw;
  grove::saved_activations<float> saved;
  if (keep_activations) eng.forward_saving(m.f32, plan, x, y, saved);
  grove::weights_span<float> grads = gradient_buffers().span();
  const process_cpu_timer cpu;
  for (auto _ : state) {
    eng.backward(m.f32, plan, x, dy, keep_activations ? &saved : nullptr, grads, dx, dw);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, backward_cost(plan), cpu);
  state.counters["workspace_mb"] = double(eng.workspace_bytes()) * 1e-6;
  state.counters["gate_up_ms"] = eng.last_timings().gate_up * 1e3;
  state.counters["dh_ms"] = eng.last_timings().dh * 1e3;
  state.counters["gradients_ms"] = eng.last_timings().gradients * 1e3;
  state.SetLabel(grove::simd::isa_name(eng.isa()));
}

// The plain backward (per-item Eigen products, one thread), from saved activations.
void bm_simple_backward(benchmark::State& state, index T) {
  model& m = the_model();
  const grove::routing_plan<float>& plan = m.plans_f32.at(T).grove;
  const auto x = m.x.topRows(T);
  const row_matrix<float> dy = m.x.bottomRows(T);
  row_matrix<float> y(T, dims.hidden), dx = row_matrix<float>::Zero(T, dims.hidden), dw;
  grove::saved_activations<float> saved;
  grove::cpu::forward_experts_saving_simple<float>(m.f32, plan, x, y, saved);
  grove::weights_span<float> grads = gradient_buffers().span();
  const process_cpu_timer cpu;
  for (auto _ : state) {
    grove::cpu::backward_experts_simple<float>(m.f32, plan, x, dy, &saved, grads, dx, dw);
    benchmark::DoNotOptimize(dx.data());
  }
  set_counters(state, T, backward_cost(plan), cpu);
}

void bm_route(benchmark::State& state, index T) {
  model& m = the_model();
  const auto x = m.x.topRows(T);
  const process_cpu_timer cpu;
  for (auto _ : state) {
    auto plan = grove::route<float>(m.f32, {top_k, lambda}, x);
    benchmark::DoNotOptimize(plan.expert_rows.data());
  }
  plan_cost c;
  c.flops = 2.0 * double(T) * double(dims.experts) * double(dims.hidden);
  c.bytes = double(dims.experts * dims.hidden) * sizeof(float);
  set_counters(state, T, c, cpu);
}

// Routing into a reused plan, with k and the group size at run time (Sizes = routing_sizes<>) or
// fixed at compile time (routing_sizes<8, 2>, what a grove_moe_inst_config layer uses).
template <class Sizes>
void bm_route_into(benchmark::State& state, index T) {
  model& m = the_model();
  const auto x = m.x.topRows(T);
  grove::routing_plan<float> plan;
  grove::route_into<Sizes>(plan, m.f32, {top_k, lambda}, x);
  const process_cpu_timer cpu;
  for (auto _ : state) {
    grove::route_into<Sizes>(plan, m.f32, {top_k, lambda}, x);
    benchmark::DoNotOptimize(plan.expert_rows.data());
  }
  plan_cost c;
  c.flops = 2.0 * double(T) * double(dims.experts) * double(dims.hidden);
  c.bytes = double(dims.experts * dims.hidden) * sizeof(float);
  set_counters(state, T, c, cpu);
}

// (f) Token by token: for each pick, matrix-vector products with Eigen; adjugates once per group.
void bm_naive(benchmark::State& state, index T) {
  model& m = the_model();
  const grove::routing_plan<float>& plan = m.plans_f32.at(T).grove;
  row_matrix<float> y(T, dims.hidden);
  grove::vector<float> g, u, out;
  auto run = [&](const grove::swiglu_weights<const float>& mlp, index t, float weight) {
    const auto xt = m.x.row(t).transpose();
    g.noalias() = mlp.gate * xt;
    u.noalias() = mlp.up * xt;
    g = g.unaryExpr([](float z) { return grove::detail::silu(z); }).cwiseProduct(u);
    out.noalias() = mlp.down * g;
    y.row(t) += weight * out.transpose();
  };
  const process_cpu_timer cpu;
  for (auto _ : state) {
    y.setZero();
    for (index t = 0; t < T; ++t) {
      for (index s = 0; s < top_k; ++s) run(m.f32.expert(plan.topk_ids(t, s)), t, plan.topk_weights(t, s));
      for (index gi = 0; gi < plan.groups_per_token[static_cast<std::size_t>(t)]; ++gi)
        run(m.f32.adjugate(plan.token_groups(t, gi)), t, static_cast<float>(lambda) * plan.group_weights(t, gi));
    }
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, T, cost_of(m.f32, plan), cpu);
}

// The former kernel (per-expert Eigen GEMMs, one thread).
void bm_simple(benchmark::State& state, index T) {
  model& m = the_model();
  const grove::routing_plan<float>& plan = m.plans_f32.at(T).grove;
  row_matrix<float> y(T, dims.hidden);
  const process_cpu_timer cpu;
  for (auto _ : state) {
    grove::cpu::forward_experts_simple(m.f32, plan, m.x.topRows(T), y);
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, T, cost_of(m.f32, plan), cpu);
}

// (a) Dense Eigen sgemm with the FLOPs of the layer's forward at this T: C[T, N] = X Wᵀ with
// N = activated FLOPs / (2·T·H). With n threads, each computes its share of N's columns.
void bm_dense_sgemm(benchmark::State& state, index T, int threads) {
  model& m = the_model();
  const plan_cost c = cost_of(m.f32, m.plans_f32.at(T).grove);
  const auto N = static_cast<index>(c.flops / (2.0 * double(T) * double(dims.hidden)) + 0.5);
  static std::map<index, row_matrix<float>> weights;  // one [N, H] per N (values irrelevant)
  row_matrix<float>& w = weights[N];
  if (w.rows() != N) {
    w.resize(N, dims.hidden);
    fill_uniform(w.data(), static_cast<std::size_t>(w.size()), 3, 0.02f);
  }
  row_matrix<float> out(T, N);
  const auto x = m.x.topRows(T);
  grove::detail::thread_pool& p = pool(threads);
  auto region = [&](int i) {
    const index n0 = N * i / threads, n1 = N * (i + 1) / threads;
    out.middleCols(n0, n1 - n0).noalias() = x * w.middleRows(n0, n1 - n0).transpose();
  };
  const process_cpu_timer cpu;
  for (auto _ : state) {
    p.run(region);
    benchmark::DoNotOptimize(out.data());
  }
  plan_cost dense;
  dense.flops = 2.0 * double(T) * double(N) * double(dims.hidden);
  dense.bytes = double(N) * double(dims.hidden) * sizeof(float);
  set_counters(state, T, dense, cpu);
}

// (b) Read sweep over exactly the weight tensors a forward reads at this T.
#if GROVE_SIMD_X86
__attribute__((target(GROVE_SIMD_TARGET_AVX512))) float sweep_avx512(const float* p, std::size_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  std::size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  float s = grove::simd::reduce_add(grove::simd::avx512_batch{_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))});
  for (; i < n; ++i) s += p[i];
  return s;
}
#endif
float sweep(const float* p, std::size_t n) {
#if GROVE_SIMD_X86
  if (grove::simd::supported(grove::simd::isa::avx512)) return sweep_avx512(p, n);
#endif
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  for (; i < n; ++i) s0 += p[i];
  return s0 + s1 + s2 + s3;
}

void bm_read_sweep(benchmark::State& state, format fmt, index T, int threads) {
  model& m = the_model();
  const grove::routing_plan<float>& plan = fmt == format::bf16 ? m.plans_bf16.at(T).grove : m.plans_f32.at(T).grove;
  const plan_cost c = with_weights(fmt, [&](const auto& weights) { return cost_of(weights, plan); });
  // Split the bytes evenly over the threads, in 4-byte words.
  std::vector<std::pair<const float*, std::size_t>> words;
  for (const auto& [p, bytes] : c.ranges) words.emplace_back(static_cast<const float*>(p), bytes / 4);
  std::size_t total = 0;
  for (const auto& w : words) total += w.second;
  std::vector<float> sums(static_cast<std::size_t>(threads));
  grove::detail::thread_pool& p = pool(threads);
  auto region = [&](int i) {
    const std::size_t begin = total * static_cast<std::size_t>(i) / static_cast<std::size_t>(threads);
    const std::size_t end = total * static_cast<std::size_t>(i + 1) / static_cast<std::size_t>(threads);
    std::size_t at = 0;
    float s = 0;
    for (const auto& [ptr, n] : words) {
      const std::size_t lo = std::max(begin, at), hi = std::min(end, at + n);
      if (lo < hi) s += sweep(ptr + (lo - at), hi - lo);
      at += n;
    }
    sums[static_cast<std::size_t>(i)] = s;
  };
  const process_cpu_timer cpu;
  for (auto _ : state) {
    p.run(region);
    benchmark::DoNotOptimize(sums.data());
  }
  plan_cost read;
  read.bytes = c.bytes;
  set_counters(state, T, read, cpu);
}

// (c) Peak: 24 independent FMA chains in registers, per thread.
#if GROVE_SIMD_X86
__attribute__((target(GROVE_SIMD_TARGET_AVX512), noinline)) float fma_loop_avx512(long iterations) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(0.001f * float(i));
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(0.0001f);
  for (long it = 0; it < iterations; ++it) {
    GROVE_SIMD_UNROLL
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, acc[i]);
  return grove::simd::reduce_add(grove::simd::avx512_batch{s});
}
__attribute__((target(GROVE_SIMD_TARGET_AVX2), noinline)) float fma_loop_avx2(long iterations) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(0.001f * float(i));
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(0.0001f);
  for (long it = 0; it < iterations; ++it) {
    GROVE_SIMD_UNROLL
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  return grove::simd::reduce_add(grove::simd::avx2_batch{s});
}
#endif

void bm_fma_peak(benchmark::State& state, int threads) {
  constexpr long iterations = 4'000'000;
  double flops_per_call = 0;
  float (*loop)(long) = nullptr;
#if GROVE_SIMD_X86
  if (grove::simd::supported(grove::simd::isa::avx512)) {
    loop = fma_loop_avx512;
    flops_per_call = 2.0 * 16 * 24 * iterations;
  } else if (grove::simd::supported(grove::simd::isa::avx2)) {
    loop = fma_loop_avx2;
    flops_per_call = 2.0 * 8 * 12 * iterations;
  }
#endif
  if (loop == nullptr) {
    state.SkipWithError("no AVX2 or AVX-512 on this machine");
    return;
  }
  std::vector<float> sink(static_cast<std::size_t>(threads));
  grove::detail::thread_pool& p = pool(threads);
  auto region = [&](int i) { sink[static_cast<std::size_t>(i)] = loop(iterations); };
  const process_cpu_timer cpu;
  for (auto _ : state) {
    p.run(region);
    benchmark::DoNotOptimize(sink.data());
  }
  plan_cost peak;
  peak.flops = flops_per_call * threads;
  set_counters(state, 0, peak, cpu);
}

void register_all() {
  auto add = [](const std::string& name, auto fn) {
    return benchmark::RegisterBenchmark(name.c_str(), fn)->UseRealTime()->Unit(benchmark::kMillisecond);
  };
  const char* fmt_name[] = {"fp32", "bf16", "q8", "q4"};
  for (int threads : {1, 2}) {
    add("fma_peak/threads:" + std::to_string(threads), [threads](benchmark::State& s) { bm_fma_peak(s, threads); });
    for (index T : token_counts) {
      const std::string tt = "/T:" + std::to_string(T) + "/threads:" + std::to_string(threads);
      for (format fmt : {format::fp32, format::bf16}) {
        const std::string f = fmt_name[static_cast<int>(fmt)];
        add("grove/" + f + tt, [=](benchmark::State& s) { bm_experts(s, fmt, variant::grove, T, threads); });
        add("read_sweep/" + f + tt, [=](benchmark::State& s) { bm_read_sweep(s, fmt, T, threads); });
        add("per_pick/" + f + tt, [=](benchmark::State& s) { bm_experts(s, fmt, variant::per_pick, T, threads); });
        add("plain_moe/" + f + tt, [=](benchmark::State& s) { bm_experts(s, fmt, variant::plain_moe, T, threads); });
      }
      for (format fmt : {format::q8, format::q4}) {
        const std::string f = fmt_name[static_cast<int>(fmt)];
        add("grove/" + f + tt, [=](benchmark::State& s) { bm_experts(s, fmt, variant::grove, T, threads); });
        add("read_sweep/" + f + tt, [=](benchmark::State& s) { bm_read_sweep(s, fmt, T, threads); });
        add("plain_moe/" + f + tt, [=](benchmark::State& s) { bm_experts(s, fmt, variant::plain_moe, T, threads); });
      }
      if (T <= 16)
        for (format fmt : {format::fp32, format::bf16, format::q8, format::q4}) {
          const std::string f = fmt_name[static_cast<int>(fmt)];
          add("cold/" + f + tt, [=](benchmark::State& s) { bm_cold(s, fmt, T, threads); });
        }
      add("dense_sgemm" + tt, [=](benchmark::State& s) { bm_dense_sgemm(s, T, threads); });
      add("backward/fp32" + tt, [=](benchmark::State& s) { bm_backward(s, T, threads, true); });
      add("backward_recompute/fp32" + tt, [=](benchmark::State& s) { bm_backward(s, T, threads, false); });
    }
  }
  // The block formats' two paths, each forced, and the automatic choice (item by item), beside
  // bf16: where the choice should switch (kernels/<fmt>/<path>/T:…).
  for (int threads : {1, 2})
    for (index T : crossover_counts) {
      const std::string tt = "/T:" + std::to_string(T) + "/threads:" + std::to_string(threads);
      add("kernels/bf16" + tt, [=](benchmark::State& s) { bm_experts(s, format::bf16, variant::grove, T, threads); });
      for (format fmt : {format::q8, format::q4})
        for (const auto kernels : {grove::quantized_kernels::integer_dots, grove::quantized_kernels::dequantized,
                                   grove::quantized_kernels::automatic}) {
          const char* path = kernels == grove::quantized_kernels::dequantized    ? "/dequantized"
                             : kernels == grove::quantized_kernels::integer_dots ? "/integer_dots"
                                                                                 : "/automatic";
          const std::string name = std::string("kernels/") + fmt_name[static_cast<int>(fmt)] + path + tt;
          add(name, [=](benchmark::State& s) { bm_experts(s, fmt, variant::grove, T, threads, kernels); });
        }
    }
  for (index T : token_counts) {
    const std::string tt = "/T:" + std::to_string(T);
    add("route" + tt, [=](benchmark::State& s) { bm_route(s, T); });
    add("route_into" + tt, [=](benchmark::State& s) { bm_route_into<grove::routing_sizes<>>(s, T); });
    add("route_fixed" + tt, [=](benchmark::State& s) {
      bm_route_into<grove::routing_sizes<static_cast<int>(top_k), 2>>(s, T);
    });
    add("simple" + tt, [=](benchmark::State& s) { bm_simple(s, T); });
    add("naive" + tt, [=](benchmark::State& s) { bm_naive(s, T); });
    add("simple_backward" + tt, [=](benchmark::State& s) { bm_simple_backward(s, T); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  // Build the layer now (a few seconds), so that the context can say whether its weights got
  // transparent huge pages.
  const model& m = the_model();
  benchmark::AddCustomContext("grove_weights_mb", std::to_string((m.values.size() * sizeof(float) + m.bf16.bytes()) >> 20));
  std::ifstream smaps("/proc/self/smaps_rollup");
  for (std::string line; std::getline(smaps, line);)
    if (line.rfind("AnonHugePages:", 0) == 0) benchmark::AddCustomContext("grove_anon_huge_pages", line.substr(14));
  benchmark::AddCustomContext("grove_isa", grove::simd::isa_name(grove::simd::best_isa()));
  benchmark::AddCustomContext("grove_shape", "H=2048 E=128 k=8 I=768 G=64 Ia=128 lambda=0.05");
#if defined(__AVX512F__)
  benchmark::AddCustomContext("grove_build", "-march with AVX-512 (Eigen baselines vectorised for AVX-512)");
#elif defined(__AVX2__)
  benchmark::AddCustomContext("grove_build", "-march with AVX2 (Eigen baselines vectorised for AVX2)");
#else
  benchmark::AddCustomContext("grove_build", "baseline x86-64 (Eigen baselines use SSE2 only)");
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
