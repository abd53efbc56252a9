// Tests of the CUDA backend (docs/cuda.md) against the CPU path: grove::route, grove::layer,
// the CPU runner (grove::cpu_runner), and for backward a plain double-precision reference written
// here (plus grove::gradients when the training helpers are present). Two ways in are tested:
//   - the device path: a cuda::device_router routes device x into a device plan, and the
//     cuda_runner runs it on device buffers (forward, the experts' backward, then the router's);
//   - the runner contract: host requests on a grove::cuda_runner (grove::layer::on, forward,
//     forward_partials, backward, grove::gradients) against the same requests on a cpu_runner.
//
// Without a GPU (cudaGetDeviceCount reports none) the device cases are skipped with a message;
// the host-side checks of the plan and schedule arithmetic the kernels share always run.
// tests/test_cuda_emulated.cpp compiles this same file against a CPU emulation of the CUDA
// subset grove uses, so the kernels' logic is exercised even where there is no GPU.
#ifndef GROVE_CUDA_EMULATION
#define EIGEN_NO_CUDA  // Eigen is used by the host-side references only; keep it out of device code
#endif

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <grove/cuda.cuh>

// The CPU library's headers are host code written for g++ and clang++: nvcc's front end does not
// know their GCC loop pragmas (diagnostic 1675) and is stricter about unused variables (550).
#if defined(__NVCC__)
#pragma nv_diag_suppress 1675
#pragma nv_diag_suppress 550
#endif
#include <grove/grove.hpp>
#if __has_include(<grove/training/backward.hpp>) && __has_include(<grove/kernels/cpu/expert_backward.hpp>)
#include <grove/training/backward.hpp>
#define GROVE_TEST_CUDA_HAVE_CPU_BACKWARD 1
#endif
#include "support/test_support.hpp"
#if defined(__NVCC__)
#pragma nv_diag_default 1675
#pragma nv_diag_default 550
#endif

namespace {

namespace gc = grove::cuda;
using grove::index;
using grove::layer_dims;
using grove::row_matrix;

// ---------------------------------------------------------------------------------------------
// Skipping without a GPU
// ---------------------------------------------------------------------------------------------

bool have_gpu() {
  static const bool present = gc::device_count() > 0;
  return present;
}

#define GROVE_REQUIRE_GPU()                                                                        \
  do {                                                                                             \
    if (!have_gpu()) {                                                                             \
      MESSAGE("skipped: no CUDA device (cudaGetDeviceCount reports none); this case needs a GPU"); \
      return;                                                                                      \
    }                                                                                              \
  } while (false)

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

struct test_case {
  layer_dims dims;
  int top_k;
  double scale;
  int tokens;
  bool bias;
  std::uint64_t seed;
};

std::string describe(const test_case& c) {
  const layer_dims& d = c.dims;
  return "H=" + std::to_string(d.hidden) + " E=" + std::to_string(d.experts) + " G=" + std::to_string(d.groups) +
         " I=" + std::to_string(d.expert_intermediate) + " Ia=" + std::to_string(d.adjugate_intermediate) +
         " k=" + std::to_string(c.top_k) + " T=" + std::to_string(c.tokens) + (c.bias ? " bias" : "");
}

// Shapes chosen to hit the kernels' edges: ragged tiles and chunks, H not a multiple of 8 (the
// element-wise loads), several picks in one group (k > E/G), one group (G = 1), groups of one
// expert (G = E), k = 1, several row tiles per expert, and H large enough for the router's
// split-K at small T.
std::vector<test_case> float_cases() {
  return {
      {{32, 8, 4, 24, 8}, 2, 0.25, 9, false, 1},    {{64, 16, 8, 40, 16}, 4, 0.3, 70, true, 2},
      {{72, 16, 4, 64, 24}, 8, 0.2, 33, false, 3},  {{100, 12, 3, 30, 10}, 3, 0.25, 5, true, 4},
      {{48, 64, 16, 16, 8}, 6, 0.25, 41, false, 5}, {{32, 4, 2, 20, 12}, 2, 0.5, 150, false, 6},
      {{256, 8, 4, 16, 8}, 2, 0.5, 3, true, 7},     {{40, 6, 6, 12, 4}, 1, 1.0, 17, false, 8},
      {{24, 8, 1, 8, 72}, 3, 0.125, 12, false, 9},
  };
}

std::vector<test_case> bf16_cases() {
  return {
      {{32, 8, 4, 24, 8}, 2, 0.25, 9, false, 11},
      {{72, 16, 4, 64, 24}, 8, 0.2, 21, true, 12},
      {{100, 12, 3, 30, 10}, 3, 0.25, 5, false, 13},
      {{256, 8, 4, 16, 8}, 2, 0.5, 2, false, 14},
  };
}

float round_to_bf16(float v) { return gc::detail::to_float(gc::detail::from_float<gc::bfloat16>(v)); }

/// Random weights N(0, 0.2²) (router N(0, 0.5²) so that picks are well separated), bias
/// uniform in ±0.05 when asked; rounded to BF16 when the device runs BF16, so that the CPU
/// reference sees exactly the device's numbers.
grove::layer_parameters<float> make_parameters(const test_case& c, bool bf16) {
  auto p = grove::layer_parameters<float>::random(c.dims, c.seed, 0.2);
  auto router = p.span().router();
  router *= 2.5f;
  if (c.bias) {
    grove::detail::normal_generator gen(c.seed + 100);
    for (float& b : p.bias()) b = static_cast<float>(0.1 * (gen.uniform() - 0.5));
  }
  if (bf16)
    for (float& v : p.values()) v = round_to_bf16(v);
  return p;
}

row_matrix<float> make_input(const test_case& c, std::uint64_t salt, bool bf16) {
  grove::detail::normal_generator gen(c.seed * 7919 + salt);
  row_matrix<float> x(c.tokens, c.dims.hidden);
  for (index i = 0; i < x.size(); ++i) {
    const auto v = static_cast<float>(gen.normal());
    x.data()[i] = bf16 ? round_to_bf16(v) : v;
  }
  return x;
}

template <class T>
gc::device_buffer<T> to_device(const row_matrix<float>& m) {
  std::vector<T> host(static_cast<std::size_t>(m.size()));
  for (index i = 0; i < m.size(); ++i) host[static_cast<std::size_t>(i)] = gc::detail::from_float<T>(m.data()[i]);
  gc::device_buffer<T> d(host.size());
  d.upload(host);
  return d;
}

template <class T>
row_matrix<float> to_host(const gc::device_buffer<T>& d, index rows, index cols) {
  const std::vector<T> host = d.download(static_cast<std::size_t>(rows * cols));
  row_matrix<float> m(rows, cols);
  for (index i = 0; i < m.size(); ++i) m.data()[i] = gc::detail::to_float(host[static_cast<std::size_t>(i)]);
  return m;
}

// ---------------------------------------------------------------------------------------------
// CPU references
// ---------------------------------------------------------------------------------------------

/// grove::route from given logits: what the CPU decides for the logits the device computed.
/// Comparing device picks with this is exact; comparing them with grove::route's own logits is
/// exact only where no two scores lie within rounding of each other (checked separately).
grove::routing_plan<float> plan_from_logits(const grove::weights_view<float>& w, int top_k, double scale,
                                            const row_matrix<float>& logits) {
  const layer_dims& d = w.dims();
  grove::routing_plan<float> plan;
  plan.tokens = logits.rows();
  plan.experts = d.experts;
  plan.groups = d.groups;
  plan.group_size = d.group_size();
  plan.top_k = top_k;
  plan.scale = scale;
  plan.logits = logits;
  const float* bias = grove::detail::bias_is_zero(w.bias(), d.experts) ? nullptr : w.bias();
  plan.topk_ids.resize(plan.tokens, top_k);
  plan.topk_weights.resize(plan.tokens, top_k);
  std::vector<float> scores(static_cast<std::size_t>(top_k));
  for (index t = 0; t < plan.tokens; ++t) {
    grove::detail::select_top_k(&plan.logits(t, 0), bias, d.experts, top_k, &plan.topk_ids(t, 0), scores.data(), t);
    grove::detail::picked_softmax(&plan.logits(t, 0), &plan.topk_ids(t, 0), top_k, &plan.topk_weights(t, 0));
  }
  grove::detail::collect_token_groups(plan);
  grove::detail::counting_sort<float>(
      plan.tokens, plan.top_k, plan.experts, nullptr, [&](index t, index s) { return plan.topk_ids(t, s); },
      [&](index t, index s) { return plan.topk_weights(t, s); }, plan.expert_offsets, plan.expert_rows,
      plan.scratch.cursor);
  const auto lambda = static_cast<float>(scale);
  grove::detail::counting_sort<float>(
      plan.tokens, 0, plan.groups, &plan.groups_per_token, [&](index t, index s) { return plan.token_groups(t, s); },
      [&](index t, index s) { return lambda * plan.group_weights(t, s); }, plan.adjugate_offsets, plan.adjugate_rows,
      plan.scratch.cursor);
  return plan;
}

/// The rows each MLP processes under an adjugate mode, with where their dw goes: (slot, factor).
struct reference_row {
  index mlp;
  index token;
  double weight;
  std::vector<std::pair<index, double>> dw_targets;
};

std::vector<reference_row> reference_rows(const grove::routing_plan<float>& plan, gc::adjugate_mode mode) {
  std::vector<reference_row> rows;
  const index E = plan.experts;
  for (index t = 0; t < plan.tokens; ++t) {
    for (index s = 0; s < plan.top_k; ++s)
      rows.push_back({plan.topk_ids(t, s), t, plan.topk_weights(t, s), {{s, 1.0}}});
    if (mode == gc::adjugate_mode::once_per_token) {
      for (index g = 0; g < plan.groups_per_token[static_cast<std::size_t>(t)]; ++g) {
        const index j = plan.token_groups(t, g);
        reference_row r{E + j, t, plan.scale * plan.group_weights(t, g), {}};
        for (index s = 0; s < plan.top_k; ++s)
          if (plan.topk_ids(t, s) / plan.group_size == j) r.dw_targets.emplace_back(s, plan.scale);
        rows.push_back(r);
      }
    } else if (mode == gc::adjugate_mode::once_per_pick) {
      for (index s = 0; s < plan.top_k; ++s)
        rows.push_back(
            {E + plan.topk_ids(t, s) / plan.group_size, t, plan.scale * plan.topk_weights(t, s), {{s, plan.scale}}});
    }
  }
  return rows;
}

/// Plain double-precision forward and backward of docs/math.md for a given plan: loops only.
/// dw [T, k] is the experts' ∂L/∂w_s; `router` adds the router's part to dx and the gradients
/// (the whole layer's backward) or leaves it out (a runner's backward).
struct reference_result {
  row_matrix<double> y;
  row_matrix<double> dx;
  grove::layer_parameters<double> grads;
  row_matrix<double> dw;
};

reference_result reference_pass(const grove::weights_view<float>& w, const grove::routing_plan<float>& plan,
                                gc::adjugate_mode mode, const row_matrix<float>& x, const row_matrix<float>* dy,
                                bool router = true) {
  const layer_dims& d = w.dims();
  const index H = d.hidden, E = d.experts, T = plan.tokens;
  reference_result r{row_matrix<double>::Zero(T, H), row_matrix<double>::Zero(T, H),
                     grove::layer_parameters<double>(d), row_matrix<double>::Zero(T, plan.top_k)};
  auto grads = r.grads.span();
  row_matrix<double>& dw = r.dw;
  for (const reference_row& row : reference_rows(plan, mode)) {
    const bool routed = row.mlp < E;
    const auto mlp = routed ? w.expert(row.mlp) : w.adjugate(row.mlp - E);
    auto gmlp = routed ? grads.expert(row.mlp) : grads.adjugate(row.mlp - E);
    const index N = mlp.gate.rows(), t = row.token;
    std::vector<double> g(N), u(N), h(N), dh(N, 0.0), out(H, 0.0);
    for (index n = 0; n < N; ++n) {
      double gs = 0, us = 0;
      for (index c = 0; c < H; ++c) {
        gs += double(mlp.gate(n, c)) * x(t, c);
        us += double(mlp.up(n, c)) * x(t, c);
      }
      g[n] = gs;
      u[n] = us;
      h[n] = gs / (1.0 + std::exp(-gs)) * us;
    }
    for (index c = 0; c < H; ++c) {
      for (index n = 0; n < N; ++n) out[c] += double(mlp.down(c, n)) * h[n];
      r.y(t, c) += row.weight * out[c];
    }
    if (dy == nullptr) continue;
    double dot = 0;
    for (index c = 0; c < H; ++c) dot += double((*dy)(t, c)) * out[c];
    for (const auto& [slot, factor] : row.dw_targets) dw(t, slot) += factor * dot;
    for (index c = 0; c < H; ++c) {
      const double o = row.weight * (*dy)(t, c);
      for (index n = 0; n < N; ++n) {
        gmlp.down(c, n) += o * h[n];
        dh[n] += double(mlp.down(c, n)) * o;
      }
    }
    for (index n = 0; n < N; ++n) {
      const double s = 1.0 / (1.0 + std::exp(-g[n]));
      const double dg = dh[n] * u[n] * s * (1.0 + g[n] * (1.0 - s));
      const double du = dh[n] * g[n] * s;
      for (index c = 0; c < H; ++c) {
        gmlp.gate(n, c) += dg * x(t, c);
        gmlp.up(n, c) += du * x(t, c);
        r.dx(t, c) += double(mlp.gate(n, c)) * dg + double(mlp.up(n, c)) * du;
      }
    }
  }
  if (dy != nullptr && router) {
    for (index t = 0; t < T; ++t) {
      double mean = 0;
      for (index s = 0; s < plan.top_k; ++s) mean += plan.topk_weights(t, s) * dw(t, s);
      for (index s = 0; s < plan.top_k; ++s) {
        const index e = plan.topk_ids(t, s);
        const double dl = plan.topk_weights(t, s) * (dw(t, s) - mean);
        for (index c = 0; c < H; ++c) {
          grads.router()(e, c) += dl * x(t, c);
          r.dx(t, c) += dl * double(w.router()(e, c));
        }
      }
    }
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  double m = 0;
  for (index i = 0; i < static_cast<index>(a.size()); ++i)
    m = std::max(m, std::abs(static_cast<double>(a[static_cast<std::size_t>(i)]) -
                             static_cast<double>(b[static_cast<std::size_t>(i)])));
  return m;
}

template <class A>
double max_abs(const A& a) {
  double m = 0;
  for (index i = 0; i < static_cast<index>(a.size()); ++i)
    m = std::max(m, std::abs(static_cast<double>(a[static_cast<std::size_t>(i)])));
  return m;
}

template <class M>
std::vector<double> flat(const M& m) {
  std::vector<double> v(static_cast<std::size_t>(m.size()));
  for (index i = 0; i < static_cast<index>(m.size()); ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(m.data()[i]);
  return v;
}

/// Asserts |a - b| <= tol · max|b| elementwise, and that b is not trivially zero (a test that
/// compares zeros with zeros cannot fail).
template <class A, class B>
void check_close(const A& a, const B& b, double tol, const std::string& what) {
  REQUIRE(a.size() == b.size());
  const double scale = max_abs(b);
  const double diff = max_abs_diff(a, b);
  INFO(what << ": max |device - reference| = " << diff << ", max |reference| = " << scale << ", tolerance " << tol);
  CHECK(scale > 0.0);
  CHECK(diff <= tol * scale);
}

/// Two plans in the device layout agree field by field: integers (picks, groups, the inverse maps,
/// the schedule's five prefix arrays, every row's token and slot) exactly, weights to fp32
/// rounding (the device's softmax exp and the CPU's differ in the last bits).
void check_layout_matches(const gc::host_plan& dev, const gc::host_plan& cpu) {
  REQUIRE(dev.tokens == cpu.tokens);
  REQUIRE(dev.top_k == cpu.top_k);
  REQUIRE(dev.max_groups == cpu.max_groups);
  CHECK(dev.adjugates == cpu.adjugates);
  CHECK(dev.topk_ids == cpu.topk_ids);
  CHECK(dev.groups_per_token == cpu.groups_per_token);
  CHECK(dev.token_groups == cpu.token_groups);
  CHECK(dev.pick_group_slot == cpu.pick_group_slot);
  CHECK(dev.schedule == cpu.schedule);
  CHECK(dev.offsets == cpu.offsets);
  CHECK(dev.row_of_pick == cpu.row_of_pick);
  CHECK(dev.row_of_group == cpu.row_of_group);
  auto close = [](float a, float b) { return std::abs(a - b) <= 1e-5f * (1.0f + std::abs(b)); };
  REQUIRE(dev.topk_weights.size() == cpu.topk_weights.size());
  for (std::size_t i = 0; i < dev.topk_weights.size(); ++i) CHECK(close(dev.topk_weights[i], cpu.topk_weights[i]));
  REQUIRE(dev.group_weights.size() == cpu.group_weights.size());
  for (std::size_t i = 0; i < dev.group_weights.size(); ++i) CHECK(close(dev.group_weights[i], cpu.group_weights[i]));
  REQUIRE(dev.rows.size() == cpu.rows.size());
  for (std::size_t i = 0; i < dev.rows.size(); ++i)
    CHECK((dev.rows[i].token == cpu.rows[i].token && dev.rows[i].slot == cpu.rows[i].slot &&
           close(dev.rows[i].weight, cpu.rows[i].weight)));
}

/// What the inverse maps mean, checked on their own (a layout could agree with a wrong
/// conversion): row_of_pick / row_of_group point at the token's own rows, slot for slot.
void check_inverse_maps(const gc::host_plan& p) {
  for (index t = 0; t < p.tokens; ++t)
    for (index s = 0; s < p.top_k; ++s) {
      const auto at = static_cast<std::size_t>(t * p.top_k + s);
      const int pick = p.row_of_pick[at];
      REQUIRE(pick >= 0);
      CHECK((p.rows[static_cast<std::size_t>(pick)].token == t && p.rows[static_cast<std::size_t>(pick)].slot == s));
      const int group = p.row_of_group[at];
      const bool has_group = p.adjugates == gc::adjugate_mode::once_per_pick ||
                             (p.adjugates == gc::adjugate_mode::once_per_token &&
                              s < p.groups_per_token[static_cast<std::size_t>(t)]);
      if (has_group) {
        REQUIRE(group >= p.offsets[static_cast<std::size_t>(p.experts)]);
        const auto row = p.rows[static_cast<std::size_t>(group)];
        CHECK((row.token == t && row.slot == s));
      } else {
        CHECK(group == -1);
      }
    }
}

row_matrix<float> logits_of(const gc::host_plan& p) {
  row_matrix<float> l(p.tokens, p.experts);
  std::copy(p.logits.begin(), p.logits.end(), l.data());
  return l;
}

/// The layer's gradient, tensor by tensor, against a reference, so that a small tensor (the
/// router) is not drowned by the others. `got` and `want` are flat, in checkpoint order; a tensor
/// the reference leaves at zero (an MLP no token picked, or the router in a runner's backward)
/// must stay exactly zero.
void check_gradients(const std::vector<double>& got, const std::vector<double>& want,
                     const grove::weights_view<float>& layout, double tol) {
  REQUIRE(got.size() == want.size());
  std::size_t at = 0;
  layout.for_each_tensor([&](const grove::tensor_info& info, const float* const&) {
    if (info.role == grove::tensor_role::selection_bias) return;
    const auto n = static_cast<std::size_t>(info.size());
    const auto begin = static_cast<std::ptrdiff_t>(at);
    const std::vector<double> got_part(got.begin() + begin, got.begin() + begin + static_cast<std::ptrdiff_t>(n));
    const std::vector<double> want_part(want.begin() + begin, want.begin() + begin + static_cast<std::ptrdiff_t>(n));
    at += n;
    if (max_abs(want_part) == 0.0) {
      CHECK(max_abs(got_part) == 0.0);
      return;
    }
    check_close(got_part, want_part, tol, "gradient of " + info.name);
  });
  CHECK(at == got.size());
}

/// Tokens whose top-k decision is robust to rounding of the logits: the k-th and (k+1)-th
/// selection scores differ by more than `margin`.
std::vector<bool> clear_tokens(const grove::routing_plan<float>& plan, const float* bias, float margin) {
  std::vector<bool> clear(static_cast<std::size_t>(plan.tokens), true);
  for (index t = 0; t < plan.tokens; ++t) {
    std::vector<float> s(static_cast<std::size_t>(plan.experts));
    for (index e = 0; e < plan.experts; ++e)
      s[static_cast<std::size_t>(e)] =
          bias ? 1.0f / (1.0f + std::exp(-plan.logits(t, e))) + bias[e] : plan.logits(t, e);
    std::sort(s.begin(), s.end(), std::greater<>());
    if (plan.top_k < plan.experts)
      clear[static_cast<std::size_t>(t)] =
          s[static_cast<std::size_t>(plan.top_k - 1)] - s[static_cast<std::size_t>(plan.top_k)] > margin;
  }
  return clear;
}

// ---------------------------------------------------------------------------------------------
// The device path: a device_router and a cuda_runner on device buffers
// ---------------------------------------------------------------------------------------------

/// One case on the device: its weights and x uploaded, a runner whose workspace holds a few
/// tokens more than the batch (smaller batches than the workspace must work too).
template <class T>
struct device_run {
  test_case c;
  bool bf16 = std::is_same_v<T, gc::bfloat16>;
  grove::layer_parameters<float> params;
  row_matrix<float> x;
  grove::cuda_runner runner;
  gc::device_parameters<T> dev_params;
  gc::device_buffer<T> dev_x;

  explicit device_run(const test_case& tc, gc::combine_mode combine = gc::combine_mode::deterministic)
      : c(tc),
        params(make_parameters(tc, bf16)),
        x(make_input(tc, 1, bf16)),
        runner(grove::cuda_runner_options{.max_tokens = tc.tokens + 3, .combine = combine}),
        dev_params(gc::device_parameters<T>::upload(params.view())),
        dev_x(to_device<T>(x)) {}

  gc::device_router<T> router(gc::adjugate_mode mode = gc::adjugate_mode::once_per_token) {
    return gc::device_router<T>(runner, dev_params.weights(), grove::routing_options{c.top_k, c.scale, mode});
  }
  /// grove::route's decision for the device's logits, with the device plan's mode.
  [[nodiscard]] grove::routing_plan<float> cpu_plan_of(const gc::host_plan& dev) const {
    grove::routing_plan<float> plan = plan_from_logits(params.view(), c.top_k, c.scale, logits_of(dev));
    plan.adjugates = dev.adjugates;
    return plan;
  }
};

template <class T>
void check_routing(const test_case& c, gc::adjugate_mode mode) {
  device_run<T> run(c);
  auto router = run.router(mode);
  const gc::host_plan dev = gc::download(router.route(run.dev_x.data(), c.tokens));
  run.runner.check_errors();

  // Logits against grove::route's batch-invariant ones (fp32 accumulation both sides: inputs are
  // exactly representable, only the summation order differs).
  const auto w = run.params.view();
  const grove::routing_plan<float> cpu = grove::route(w, grove::routing_options{c.top_k, c.scale, mode}, run.x);
  check_close(dev.logits, flat(cpu.logits), 1e-5, "router logits");

  // Exactly the CPU's decision for the device's logits, in the layout the runner uploads host
  // plans in (to_device_layout): the one conversion and the device routing agree field by field.
  gc::host_plan expected;
  gc::to_device_layout(run.cpu_plan_of(dev), c.dims, expected);
  check_layout_matches(dev, expected);
  check_inverse_maps(dev);

  // And grove::route's own picks wherever rounding cannot flip them: a token whose k-th and
  // (k+1)-th scores lie within 1e-3 may pick either (the logits differ in the last bits).
  const float* bias = grove::detail::bias_is_zero(w.bias(), c.dims.experts) ? nullptr : w.bias();
  const auto clear = clear_tokens(cpu, bias, 1e-3f);
  index compared = 0;
  for (index t = 0; t < c.tokens; ++t) {
    if (!clear[static_cast<std::size_t>(t)]) continue;
    ++compared;
    for (index s = 0; s < c.top_k; ++s)
      CHECK(dev.topk_ids[static_cast<std::size_t>(t * c.top_k + s)] == cpu.topk_ids(t, s));
  }
  CHECK(compared > 0);
}

template <class T>
void check_device_forward(const test_case& c, gc::adjugate_mode mode, gc::combine_mode combine, double tol) {
  device_run<T> run(c, combine);
  auto router = run.router(mode);
  gc::device_buffer<T> y(static_cast<std::size_t>(c.tokens * c.dims.hidden));
  const gc::device_plan& plan = router.route(run.dev_x.data(), c.tokens);
  run.runner.forward(run.dev_params.weights(), plan, run.dev_x.data(), y.data());
  const row_matrix<float> y_dev = to_host(y, c.tokens, c.dims.hidden);

  const auto w = run.params.view();
  const grove::routing_plan<float> cpu_plan = run.cpu_plan_of(gc::download(plan));
  // The plain reference for this mode, and grove's CPU runner on the same plan.
  const reference_result ref = reference_pass(w, cpu_plan, mode, run.x, nullptr);
  check_close(flat(y_dev), flat(ref.y), tol, "y against the plain reference");
  grove::cpu_runner cpu;
  row_matrix<float> y_cpu(c.tokens, c.dims.hidden);
  cpu.forward(w, cpu_plan, run.x, y_cpu);
  check_close(flat(y_dev), flat(y_cpu), tol, "y against the CPU runner");
  if (combine == gc::combine_mode::deterministic) {
    gc::device_buffer<T> again(y.size());
    run.runner.forward(run.dev_params.weights(), router.route(run.dev_x.data(), c.tokens), run.dev_x.data(),
                       again.data());
    const auto a = y.download(), b = again.download();
    CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end(),
                     [](T p, T q) { return gc::detail::to_float(p) == gc::detail::to_float(q); }));
  }
}

template <class T>
void check_layer_forward(const test_case& c, double tol) {
  // The device path end to end against grove::layer, for the tokens whose routing rounding
  // cannot change.
  device_run<T> run(c);
  auto router = run.router();
  gc::device_buffer<T> y(static_cast<std::size_t>(c.tokens * c.dims.hidden));
  run.runner.forward(run.dev_params.weights(), router.route(run.dev_x.data(), c.tokens), run.dev_x.data(), y.data());
  const row_matrix<float> y_dev = to_host(y, c.tokens, c.dims.hidden);
  grove::layer cpu_layer(grove::dynamic_config<float, grove::unchecked_scale_bound>(c.dims, c.top_k, c.scale),
                         run.params.view());
  const grove::forward_result<float> cpu = cpu_layer.forward(run.x, grove::forward_request{.routing = true});
  const float* bias =
      grove::detail::bias_is_zero(run.params.view().bias(), c.dims.experts) ? nullptr : run.params.view().bias();
  const auto clear = clear_tokens(*cpu.routing, bias, 1e-3f);
  const double scale = max_abs(flat(cpu.y));
  REQUIRE(scale > 0.0);
  for (index t = 0; t < c.tokens; ++t) {
    if (!clear[static_cast<std::size_t>(t)]) continue;
    for (index h = 0; h < c.dims.hidden; ++h) CHECK(std::abs(y_dev(t, h) - cpu.y(t, h)) <= tol * scale);
  }
}

/// Gradient buffers that do not start at zero (backward ADDS), and what they started from.
struct nonzero_start {
  std::vector<float> initial;
  explicit nonzero_start(std::size_t n) : initial(n) {
    for (std::size_t i = 0; i < n; ++i) initial[i] = 0.001f * static_cast<float>(i % 7);
  }
  template <class Values>
  [[nodiscard]] std::vector<double> added(const Values& after) const {
    std::vector<double> d(after.size());
    for (std::size_t i = 0; i < after.size(); ++i) d[i] = static_cast<double>(after[i]) - initial[i];
    return d;
  }
};

template <class T>
void check_device_backward(const test_case& c, gc::adjugate_mode mode, gc::combine_mode combine, double tol) {
  device_run<T> run(c, combine);
  auto router = run.router(mode);
  const row_matrix<float> dy = make_input(c, 2, run.bf16);
  gc::device_buffer<T> dev_dy = to_device<T>(dy);
  gc::device_buffer<T> y(static_cast<std::size_t>(c.tokens * c.dims.hidden));
  const gc::device_plan& plan = router.route(run.dev_x.data(), c.tokens);
  run.runner.forward(run.dev_params.weights(), plan, run.dev_x.data(), y.data());

  gc::device_parameters<float> grads(c.dims);
  const nonzero_start start(grads.value_count());
  gc::detail::check(cudaMemcpy(grads.values(), start.initial.data(), start.initial.size() * sizeof(float),
                               cudaMemcpyHostToDevice),
                    "upload of initial gradients");
  row_matrix<float> dx0 = make_input(c, 3, false) * 0.01f;
  gc::device_buffer<float> dx = to_device<float>(dx0);
  gc::device_buffer<float> dw(static_cast<std::size_t>(c.tokens * c.top_k));
  // The layer's backward on the device: the experts' (runner), then the router's.
  run.runner.backward(run.dev_params.weights(), plan, run.dev_x.data(), dev_dy.data(), dx.data(), grads.gradients(),
                      dw.data());
  router.backward(plan, run.dev_x.data(), dw.data(), dx.data(), grads.gradients());

  const auto w = run.params.view();
  const grove::routing_plan<float> cpu_plan = run.cpu_plan_of(gc::download(plan));
  const reference_result ref = reference_pass(w, cpu_plan, mode, run.x, &dy);
  const row_matrix<float> dx_dev = to_host(dx, c.tokens, c.dims.hidden) - dx0;
  check_close(flat(dx_dev), flat(ref.dx), tol, "dx against the plain reference");
  check_close(flat(to_host(dw, c.tokens, c.top_k)), flat(ref.dw), tol, "dw against the plain reference");
  const std::vector<double> g = start.added(grads.download_values());
  check_gradients(g, flat(ref.grads.values()), w, tol);

#ifdef GROVE_TEST_CUDA_HAVE_CPU_BACKWARD
  if (mode != gc::adjugate_mode::once_per_pick && !run.bf16) {  // the CPU backward has no once_per_pick
    grove::cpu_runner cpu;
    const auto cpu_grads = grove::gradients<float>(cpu, w, cpu_plan, run.x, dy);
    check_close(flat(dx_dev), flat(cpu_grads.input), tol, "dx against grove::gradients");
    check_close(g, flat(cpu_grads.weights.values()), tol, "weight gradients against grove::gradients");
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// The runner contract: host requests on a cuda_runner against a cpu_runner
// ---------------------------------------------------------------------------------------------

std::shared_ptr<grove::cuda_runner> make_cuda_runner(int max_tokens,
                                                     gc::combine_mode combine = gc::combine_mode::deterministic) {
  return std::make_shared<grove::cuda_runner>(grove::cuda_runner_options{.max_tokens = max_tokens, .combine = combine});
}

/// fp32: the same grove::layer on a cpu_runner and, via layer.on(), on a cuda_runner: y from the
/// same plan in `mode`, and (once per token, grove's mode) the whole forward with routing; the
/// group partials against the CPU's, and with the deterministic combine, combine_partials of the
/// CUDA partials gives the CUDA y bit for bit.
void check_runner_forward(const test_case& c, gc::adjugate_mode mode, gc::combine_mode combine, double tol) {
  const auto params = make_parameters(c, false);
  const row_matrix<float> x = make_input(c, 1, false);
  auto cpu = std::make_shared<grove::cpu_runner>();
  auto gpu = make_cuda_runner(c.tokens + 3, combine);
  grove::layer layer(grove::dynamic_config<float, grove::unchecked_scale_bound>(c.dims, c.top_k, c.scale),
                     params.view(), cpu);
  gpu->upload(layer.weights());
  const auto on_gpu = layer.on(gpu);
  CHECK(&on_gpu.runner() == gpu.get());

  grove::routing_plan<float> plan = layer.route(x);
  plan.adjugates = mode;
  row_matrix<float> y_cpu(c.tokens, c.dims.hidden), y_gpu(c.tokens, c.dims.hidden);
  layer.forward(plan, x, y_cpu);
  on_gpu.forward(plan, x, y_gpu);
  check_close(flat(y_gpu), flat(y_cpu), tol, "y on the cuda_runner against the cpu_runner");
  if (mode == gc::adjugate_mode::once_per_token)
    check_close(flat(on_gpu.forward(x)), flat(layer.forward(x)), tol, "layer.on(cuda_runner).forward(x)");

  row_matrix<float> p_cpu(plan.group_row_count(), c.dims.hidden), p_gpu(plan.group_row_count(), c.dims.hidden);
  cpu->forward_partials(layer.weights(), plan, x, p_cpu);
  gpu->forward_partials(layer.weights(), plan, x, p_gpu);
  check_close(flat(p_gpu), flat(p_cpu), tol, "group partials on the cuda_runner against the cpu_runner");
  if (combine == gc::combine_mode::deterministic) {
    row_matrix<float> combined = row_matrix<float>::Zero(c.tokens, c.dims.hidden);
    grove::combine_partials(plan, p_gpu, combined);
    CHECK(grove_test::same_bits(combined, y_gpu));
  }
}

/// BF16 weights (layer_parameters<bf16>, fp32 activations) on both runners: the runners called
/// directly in every adjugate mode, and a BF16 grove::layer (the default mode) on each.
void check_runner_forward_bf16(const test_case& c, gc::adjugate_mode mode, double tol) {
  const auto params = make_parameters(c, true);
  const row_matrix<float> x = make_input(c, 1, true);
  const grove::layer_parameters<grove::bf16> w = grove::layer_parameters<grove::bf16>::from(params.view());
  const grove::routing_plan<float> plan =
      grove::route(w.routing_view(), grove::routing_options{c.top_k, c.scale, mode}, x);
  grove::cpu_runner cpu;
  auto gpu = make_cuda_runner(c.tokens);
  gpu->upload(w.view());
  row_matrix<float> y_cpu(c.tokens, c.dims.hidden), y_gpu(c.tokens, c.dims.hidden);
  cpu.forward(w.view(), plan, x, y_cpu);
  gpu->forward(w.view(), plan, x, y_gpu);
  check_close(flat(y_gpu), flat(y_cpu), tol, "BF16 y on the cuda_runner against the cpu_runner");
  if (mode == gc::adjugate_mode::once_per_token) {
    using bf16_config = grove::dynamic_config<grove::bf16>;
    const grove::layer<bf16_config> layer(bf16_config(c.dims, c.top_k, c.scale), w.view(),
                                          std::make_shared<grove::cpu_runner>());
    const row_matrix<float> layer_cpu = layer.forward(x);
    const row_matrix<float> layer_gpu = layer.on(gpu).forward(x);
    check_close(flat(layer_gpu), flat(layer_cpu), tol, "a BF16 grove::layer on the cuda_runner against the cpu_runner");
  }
}

/// The runner's backward (the experts' part: dx, dw, the experts' and adjugates' gradients, the
/// router's untouched) against the plain reference, and the whole layer's grove::gradients on the
/// cuda_runner against it on the cpu_runner.
void check_runner_backward(const test_case& c, gc::adjugate_mode mode, gc::combine_mode combine, double tol) {
  const auto params = make_parameters(c, false);
  const row_matrix<float> x = make_input(c, 1, false);
  const row_matrix<float> dy = make_input(c, 2, false);
  const auto w = params.view();
  const grove::routing_plan<float> plan = grove::route(w, grove::routing_options{c.top_k, c.scale, mode}, x);
  auto gpu = make_cuda_runner(c.tokens, combine);
  gpu->upload(w);

  grove::layer_parameters<float> grads(c.dims);
  const nonzero_start start(grads.values().size());
  std::copy(start.initial.begin(), start.initial.end(), grads.values().begin());
  const row_matrix<float> dx0 = make_input(c, 3, false) * 0.01f;
  row_matrix<float> dx = dx0, dw;
  gpu->backward(w, plan, x, dy, nullptr, grads.span(), dx, dw);
  const reference_result ref = reference_pass(w, plan, mode, x, &dy, false);
  check_close(flat(row_matrix<float>(dx - dx0)), flat(ref.dx), tol, "dx of the runner's backward");
  check_close(flat(dw), flat(ref.dw), tol, "dw of the runner's backward");
  check_gradients(start.added(grads.values()), flat(ref.grads.values()), w, tol);

#ifdef GROVE_TEST_CUDA_HAVE_CPU_BACKWARD
  if (mode != gc::adjugate_mode::once_per_pick) {  // the CPU backward has no once_per_pick
    grove::cpu_runner cpu;
    const auto on_cpu = grove::gradients<float>(cpu, w, plan, x, dy);
    const auto on_gpu = grove::gradients<float>(*gpu, w, plan, x, dy);
    check_close(flat(on_gpu.input), flat(on_cpu.input), tol, "grove::gradients' dx, cuda_runner against cpu_runner");
    check_close(flat(on_gpu.weights.values()), flat(on_cpu.weights.values()), tol,
                "grove::gradients' weight gradients, cuda_runner against cpu_runner");
  }
#endif
}

}  // namespace

// =============================================================================================
// Host-side checks of the arithmetic the kernels share (always run, GPU or not)
// =============================================================================================

TEST_CASE("cuda: schedule prefixes and ticket decoding cover every tile once, in dependency order") {
  using namespace gc::detail;
  const layer_dims d{100, 8, 4, 130, 20};
  const grove::layer_dims& shape = d;
  const std::vector<int> rows = {0, 65, 1, 128, 0, 0, 64, 3, /*adjugates*/ 7, 0, 129, 2};
  const int mlps = shape.mlps();
  std::vector<int> storage(schedule_arrays<int>::arrays * static_cast<std::size_t>(mlps + 1), -1);
  const auto s = schedule_arrays<int>::at(storage.data(), mlps);
  build_schedule(rows.data(), shape, s);
  int expect_rows = 0;
  for (int m = 0; m < mlps; ++m) {
    CHECK(s.offsets[m] == expect_rows);
    expect_rows += rows[static_cast<std::size_t>(m)];
  }
  CHECK(s.offsets[mlps] == expect_rows);
  const auto cs = schedule_arrays<const int>::at(storage.data(), mlps);

  // Forward: every (mlp, row tile, column tile) exactly once; all gate/up tickets first.
  std::vector<std::vector<int>> gate_up_seen(static_cast<std::size_t>(mlps)), down_seen(static_cast<std::size_t>(mlps));
  bool down_started = false;
  int tickets = 0;
  for (int q = 0;; ++q) {
    const work_item it = forward_item(q, cs, shape);
    if (it.kind == item_kind::done) break;
    ++tickets;
    const int r = rows[static_cast<std::size_t>(it.mlp)];
    REQUIRE(r > 0);
    REQUIRE(it.a >= 0);
    REQUIRE(it.a < ceil_div(r, tile_m));
    if (it.kind == item_kind::gate_up) {
      CHECK(!down_started);
      REQUIRE(it.b < ceil_div(shape.intermediate(it.mlp), tile_n));
      gate_up_seen[static_cast<std::size_t>(it.mlp)].push_back(it.a * 1000 + it.b);
    } else {
      REQUIRE(it.kind == item_kind::down);
      down_started = true;
      REQUIRE(it.b < ceil_div(shape.hidden, tile_n));
      down_seen[static_cast<std::size_t>(it.mlp)].push_back(it.a * 1000 + it.b);
    }
  }
  int expected_tickets = 0;
  for (int m = 0; m < mlps; ++m) {
    const int rt = ceil_div(rows[static_cast<std::size_t>(m)], tile_m);
    const int nt = ceil_div(shape.intermediate(m), tile_n), ht = ceil_div(shape.hidden, tile_n);
    auto& gu = gate_up_seen[static_cast<std::size_t>(m)];
    auto& dn = down_seen[static_cast<std::size_t>(m)];
    std::sort(gu.begin(), gu.end());
    std::sort(dn.begin(), dn.end());
    CHECK(std::adjacent_find(gu.begin(), gu.end()) == gu.end());
    CHECK(std::adjacent_find(dn.begin(), dn.end()) == dn.end());
    CHECK(static_cast<int>(gu.size()) == rt * nt);
    CHECK(static_cast<int>(dn.size()) == rt * ht);
    expected_tickets += rt * (nt + ht);
  }
  CHECK(tickets == expected_tickets);

  // Backward: four phases in order, weight tiles once per MLP with rows.
  int phase = 0, weight_tiles = 0;
  for (int q = 0;; ++q) {
    const work_item it = backward_item(q, cs, shape);
    if (it.kind == item_kind::done) break;
    const int k = static_cast<int>(it.kind) - static_cast<int>(item_kind::gate_up_grad);
    CHECK(k >= phase);
    phase = k;
    if (it.kind == item_kind::weight_gate_up || it.kind == item_kind::weight_down) {
      ++weight_tiles;
      const int nt = ceil_div(shape.intermediate(it.mlp), tile_n), ht = ceil_div(shape.hidden, tile_n);
      CHECK(rows[static_cast<std::size_t>(it.mlp)] > 0);
      if (it.kind == item_kind::weight_gate_up)
        CHECK((it.a < nt && it.b < ht));
      else
        CHECK((it.a < ht && it.b < nt));
    }
  }
  int expected_weight_tiles = 0;
  for (int m = 0; m < mlps; ++m)
    if (rows[static_cast<std::size_t>(m)] > 0)
      expected_weight_tiles += 2 * ceil_div(shape.intermediate(m), tile_n) * ceil_div(shape.hidden, tile_n);
  CHECK(weight_tiles == expected_weight_tiles);
  CHECK(phase == 3);
}

TEST_CASE("cuda: find_bucket skips empty MLPs") {
  const std::vector<int> prefix = {0, 0, 3, 3, 3, 5, 9};  // 6 buckets, 2..4 empty or not
  for (int q = 0; q < 9; ++q) {
    const int m = gc::detail::find_bucket(prefix.data(), 6, q);
    CHECK(prefix[static_cast<std::size_t>(m)] <= q);
    CHECK(q < prefix[static_cast<std::size_t>(m) + 1]);
  }
}

TEST_CASE("cuda: the device plan's stable counting sort, replayed on the host, equals grove::route") {
  // Replays select/scan/scatter's arithmetic (bitmask ranks, chunk prefixes, positions) on the
  // host from the CPU's picks: the device plan must list each MLP's rows in the CPU's order.
  using namespace gc::detail;
  for (const test_case& c : float_cases()) {
    CAPTURE(describe(c));
    const auto params = make_parameters(c, false);
    const row_matrix<float> x = make_input(c, 1, false);
    const auto cpu = grove::route(params.view(), grove::routing_options{c.top_k, c.scale}, x);
    const int k = c.top_k, E = static_cast<int>(c.dims.experts), M = E + static_cast<int>(c.dims.groups);
    const int chunks = ceil_div(c.tokens, chunk_tokens);
    std::vector<std::uint32_t> masks(static_cast<std::size_t>(chunks) * M * k, 0u);
    std::vector<int> counts(static_cast<std::size_t>(chunks) * M, 0), base(counts.size(), 0);
    auto mark = [&](int t, int bucket, int slot) {
      const int chunk = t / chunk_tokens, position = (t % chunk_tokens) * k + slot;
      masks[(static_cast<std::size_t>(chunk) * M + bucket) * k + position / 32] |= 1u << (position % 32);
      ++counts[static_cast<std::size_t>(bucket) * chunks + chunk];
    };
    for (int t = 0; t < c.tokens; ++t) {
      for (int s = 0; s < k; ++s) mark(t, cpu.topk_ids(t, s), s);
      for (int g = 0; g < cpu.groups_per_token[static_cast<std::size_t>(t)]; ++g)
        mark(t, E + cpu.token_groups(t, g), g);
    }
    std::vector<int> totals(static_cast<std::size_t>(M));
    for (int m = 0; m < M; ++m)
      totals[static_cast<std::size_t>(m)] = prefix_over_chunks(counts.data(), base.data(), chunks, m);
    std::vector<int> storage(schedule_arrays<int>::arrays * static_cast<std::size_t>(M + 1));
    const auto s = schedule_arrays<int>::at(storage.data(), M);
    build_schedule(totals.data(), c.dims, s);
    std::vector<std::pair<int, int>> placed(static_cast<std::size_t>(s.offsets[M]), {-1, -1});
    auto place = [&](int t, int bucket, int slot) {
      const int pos = dispatch_position(s.offsets, base.data(), masks.data(), M, chunks, k, t / chunk_tokens, bucket,
                                        (t % chunk_tokens) * k + slot);
      REQUIRE(pos >= 0);
      REQUIRE(pos < s.offsets[M]);
      CHECK(placed[static_cast<std::size_t>(pos)].first == -1);
      placed[static_cast<std::size_t>(pos)] = {t, slot};
    };
    for (int t = 0; t < c.tokens; ++t) {
      for (int sl = 0; sl < k; ++sl) place(t, cpu.topk_ids(t, sl), sl);
      for (int g = 0; g < cpu.groups_per_token[static_cast<std::size_t>(t)]; ++g)
        place(t, E + cpu.token_groups(t, g), g);
    }
    REQUIRE(placed.size() == cpu.expert_rows.size() + cpu.adjugate_rows.size());
    for (std::size_t i = 0; i < cpu.expert_rows.size(); ++i)
      CHECK((placed[i].first == cpu.expert_rows[i].token && placed[i].second == cpu.expert_rows[i].slot));
    for (std::size_t i = 0; i < cpu.adjugate_rows.size(); ++i) {
      const auto& p = placed[cpu.expert_rows.size() + i];
      CHECK((p.first == cpu.adjugate_rows[i].token && p.second == cpu.adjugate_rows[i].slot));
    }
  }
}

TEST_CASE("cuda: selection order and BF16 rounding helpers") {
  using gc::detail::ranks_before;
  CHECK(ranks_before(2.0f, 5, 1.0f, 0));
  CHECK(ranks_before(1.0f, 2, 1.0f, 3));  // tie: lower grove::index first
  CHECK(!ranks_before(1.0f, 3, 1.0f, 2));
  CHECK(ranks_before(0.0f, 1, -0.0f, 2));  // +0 and -0 tie, as `>` on the CPU
  CHECK(!ranks_before(-0.0f, 2, 0.0f, 1));
  CHECK(ranks_before(-INFINITY, 0, -INFINITY, 1));
  // Round to nearest even at the 8th mantissa bit.
  CHECK(round_to_bf16(1.0f) == 1.0f);
  CHECK(round_to_bf16(1.0f + 0x1.0p-8f) == 1.0f);                          // halfway: to even
  CHECK(round_to_bf16(1.0f + 0x1.8p-8f) == 1.0f + 0x1.0p-7f);              // above halfway: up
  CHECK(round_to_bf16(1.0f + 0x1.0p-7f + 0x1.0p-8f) == 1.0f + 0x1.0p-6f);  // halfway from odd: up to even
  CHECK(round_to_bf16(-3.0f) == -3.0f);
  CHECK(gc::detail::silu(0.0f) == 0.0f);
  CHECK(gc::detail::silu(2.0f) == doctest::Approx(grove::detail::silu(2.0f)));
  CHECK(gc::detail::silu_derivative(-1.5f) == doctest::Approx(grove::detail::silu_derivative(-1.5f)));
}

// =============================================================================================
// Device cases (skipped without a GPU)
// =============================================================================================

TEST_CASE("cuda: device routing equals the CPU's (logits, picks, weights, groups, rows, schedule), every mode") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : float_cases()) {
    CAPTURE(describe(c));
    check_routing<float>(c, gc::adjugate_mode::once_per_token);
  }
  for (const test_case& c : bf16_cases()) {
    CAPTURE(describe(c));
    check_routing<gc::bfloat16>(c, gc::adjugate_mode::once_per_token);
  }
  for (const test_case& c : {float_cases()[1], float_cases()[2], float_cases()[8]}) {
    CAPTURE(describe(c));
    check_routing<float>(c, gc::adjugate_mode::once_per_pick);
    check_routing<float>(c, gc::adjugate_mode::none);
  }
}

TEST_CASE("cuda: ties go to the lower expert index and a zero router picks experts 0..k-1") {
  GROVE_REQUIRE_GPU();
  test_case c{{32, 8, 4, 16, 8}, 3, 0.25, 20, false, 21};
  auto params = make_parameters(c, false);
  auto router_weights = params.span().router();
  for (grove::index e = 1; e < c.dims.experts; e += 2) router_weights.row(e) = router_weights.row(e - 1);  // pairs tie
  const row_matrix<float> x = make_input(c, 1, false);
  grove::cuda_runner runner(grove::cuda_runner_options{.max_tokens = c.tokens});
  const auto& dev_params = runner.upload(params.view());
  auto dev_x = to_device<float>(x);
  const grove::routing_options options{c.top_k, c.scale};
  gc::device_router<float> router(runner, dev_params.weights(), options);
  const gc::host_plan dev = gc::download(router.route(dev_x.data(), c.tokens));
  for (grove::index t = 0; t < c.tokens; ++t) {
    const auto* ids = &dev.topk_ids[static_cast<std::size_t>(t * c.top_k)];
    for (grove::index s = 0; s < c.top_k; ++s)
      if (ids[s] % 2 == 1) {  // an odd expert may only follow its even twin
        const auto twin = std::find(ids, ids + c.top_k, ids[s] - 1);
        REQUIRE(twin != ids + c.top_k);
        CHECK(twin < ids + s);
      }
  }
  gc::host_plan expected;
  gc::to_device_layout(plan_from_logits(params.view(), c.top_k, c.scale, logits_of(dev)), c.dims, expected);
  check_layout_matches(dev, expected);

  params.span().router().setZero();
  runner.upload(params.view());  // the same view: new values, same device memory, the router sees them
  const gc::host_plan z = gc::download(router.route(dev_x.data(), c.tokens));
  for (grove::index t = 0; t < c.tokens; ++t)
    for (grove::index s = 0; s < c.top_k; ++s) {
      CHECK(z.topk_ids[static_cast<std::size_t>(t * c.top_k + s)] == s);
      CHECK(z.topk_weights[static_cast<std::size_t>(t * c.top_k + s)] == doctest::Approx(1.0 / c.top_k));
    }
}

TEST_CASE("cuda: device path, fp32 forward equals the references, both combines") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : float_cases()) {
    CAPTURE(describe(c));
    check_device_forward<float>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::deterministic, 2e-5);
    check_device_forward<float>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 2e-5);
    check_layer_forward<float>(c, 2e-5);
  }
}

TEST_CASE("cuda: device path, adjugates once per pick give grove's y, and none gives the plain MoE") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : float_cases()) {
    CAPTURE(describe(c));
    check_device_forward<float>(c, gc::adjugate_mode::once_per_pick, gc::combine_mode::atomic, 2e-5);
    check_device_forward<float>(c, gc::adjugate_mode::none, gc::combine_mode::deterministic, 2e-5);
  }
}

TEST_CASE("cuda: device path, BF16 forward (tensor cores, fp32 accumulation) matches the CPU on rounded inputs") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : bf16_cases()) {
    CAPTURE(describe(c));
    // h and y are rounded to BF16 on the device (as PyTorch does); the references are fp32.
    check_device_forward<gc::bfloat16>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 2e-2);
    check_device_forward<gc::bfloat16>(c, gc::adjugate_mode::once_per_pick, gc::combine_mode::deterministic, 2e-2);
  }
}

TEST_CASE("cuda: device path, fp32 backward (runner, then router) equals the reference") {
  GROVE_REQUIRE_GPU();
  const std::vector<test_case> cases = float_cases();
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const test_case& c = cases[i];
    CAPTURE(describe(c));
    check_device_backward<float>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 1e-4);
    // The deterministic combine on every other shape (it only changes how dx is summed).
    if (i % 2 == 1)
      check_device_backward<float>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::deterministic, 1e-4);
  }
  const test_case c = float_cases()[2];
  CAPTURE(describe(c));
  check_device_backward<float>(c, gc::adjugate_mode::once_per_pick, gc::combine_mode::deterministic, 1e-4);
  check_device_backward<float>(c, gc::adjugate_mode::none, gc::combine_mode::atomic, 1e-4);
}

TEST_CASE("cuda: device path, BF16 backward matches the reference within BF16 rounding") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : bf16_cases()) {
    CAPTURE(describe(c));
    check_device_backward<gc::bfloat16>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 4e-2);
  }
}

TEST_CASE("cuda_runner: a grove::layer on a cuda_runner matches it on a cpu_runner (fp32, three adjugate modes)") {
  GROVE_REQUIRE_GPU();
  // Tolerance 2e-5 of max |y|: both sum in fp32, in different orders inside the products.
  const std::vector<test_case> cases = float_cases();
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const test_case& c = cases[i];
    CAPTURE(describe(c));
    check_runner_forward(c, gc::adjugate_mode::once_per_token, gc::combine_mode::deterministic, 2e-5);
    if (i % 3 == 0) check_runner_forward(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 2e-5);
    check_runner_forward(c, gc::adjugate_mode::once_per_pick, gc::combine_mode::deterministic, 2e-5);
    check_runner_forward(c, gc::adjugate_mode::none, gc::combine_mode::deterministic, 2e-5);
  }
}

TEST_CASE("cuda_runner: BF16 weights match the cpu_runner's BF16 path (three adjugate modes)") {
  GROVE_REQUIRE_GPU();
  // Tolerance 2e-2 of max |y|: the device rounds x and h to BF16; the CPU does so only with
  // AVX512_BF16 (otherwise it widens the weights and keeps fp32 activations).
  for (const test_case& c : bf16_cases()) {
    CAPTURE(describe(c));
    check_runner_forward_bf16(c, gc::adjugate_mode::once_per_token, 2e-2);
    check_runner_forward_bf16(c, gc::adjugate_mode::once_per_pick, 2e-2);
    check_runner_forward_bf16(c, gc::adjugate_mode::none, 2e-2);
  }
}

TEST_CASE("cuda_runner: the experts' backward on host requests, and grove::gradients on a cuda_runner") {
  GROVE_REQUIRE_GPU();
  const std::vector<test_case> cases = float_cases();
  for (std::size_t i = 0; i < cases.size(); i += 2) {
    const test_case& c = cases[i];
    CAPTURE(describe(c));
    check_runner_backward(c, gc::adjugate_mode::once_per_token, gc::combine_mode::deterministic, 1e-4);
  }
  const test_case c = float_cases()[2];
  CAPTURE(describe(c));
  check_runner_backward(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 1e-4);
  check_runner_backward(c, gc::adjugate_mode::once_per_pick, gc::combine_mode::deterministic, 1e-4);
  check_runner_backward(c, gc::adjugate_mode::none, gc::combine_mode::deterministic, 1e-4);
}

TEST_CASE("cuda_runner: shards of groups and plans with holes run as on the CPU") {
  GROVE_REQUIRE_GPU();
  const test_case c = float_cases()[1];  // E = 16, G = 8, k = 4, T = 70
  const auto params = make_parameters(c, false);
  const row_matrix<float> x = make_input(c, 1, false);
  const row_matrix<float> dy = make_input(c, 2, false);
  const auto w = params.view();
  const grove::routing_plan<float> plan = grove::route(w, grove::routing_options{c.top_k, c.scale}, x);
  grove::cpu_runner cpu;
  auto gpu = make_cuda_runner(c.tokens);
  gpu->upload(w);

  const std::vector<grove::index> groups = {1, 4, 6};
  const grove::routing_plan<float> shard = grove::restrict_to_groups(plan, groups);
  std::vector<grove::routed_row<float>> picks;  // every pick but each fifth: holes
  for (grove::index t = 0; t < c.tokens; ++t)
    for (grove::index s = 0; s < c.top_k; ++s)
      if ((t * c.top_k + s) % 5 != 0)
        picks.push_back({static_cast<std::int32_t>(t), static_cast<std::int32_t>(s), plan.topk_ids(t, s),
                         plan.topk_weights(t, s)});
  const grove::routing_plan<float> holes =
      grove::plan_from_rows<float>(c.dims, c.tokens, c.top_k, c.scale, std::span<const grove::routed_row<float>>(picks));

  for (const grove::routing_plan<float>* p : {&shard, &holes}) {
    const std::string which = p == &shard ? "shard of groups 1, 4, 6" : "plan with holes";
    CAPTURE(which);
    row_matrix<float> y_cpu(c.tokens, c.dims.hidden), y_gpu(c.tokens, c.dims.hidden);
    cpu.forward(w, *p, x, y_cpu);
    gpu->forward(w, *p, x, y_gpu);
    check_close(flat(y_gpu), flat(y_cpu), 2e-5, "y");
    row_matrix<float> p_cpu(p->group_row_count(), c.dims.hidden), p_gpu(p->group_row_count(), c.dims.hidden);
    cpu.forward_partials(w, *p, x, p_cpu);
    gpu->forward_partials(w, *p, x, p_gpu);
    check_close(flat(p_gpu), flat(p_cpu), 2e-5, "group partials");

    grove::layer_parameters<float> g_cpu(c.dims), g_gpu(c.dims);
    row_matrix<float> dx_cpu = row_matrix<float>::Zero(c.tokens, c.dims.hidden), dx_gpu = dx_cpu, dw_cpu, dw_gpu;
    cpu.backward(w, *p, x, dy, nullptr, g_cpu.span(), dx_cpu, dw_cpu);
    gpu->backward(w, *p, x, dy, nullptr, g_gpu.span(), dx_gpu, dw_gpu);
    check_close(flat(dx_gpu), flat(dx_cpu), 1e-4, "dx");
    // dw of the picks there are: a hole's dw is 0 here, while the CPU's backward reads a hole's
    // expert id -1 as group 0 (-1 / group_size) and gives it that adjugate's term.
    for (grove::index t = 0; t < c.tokens; ++t)
      for (grove::index s = 0; s < c.top_k; ++s)
        if (p->topk_ids(t, s) < 0) {
          CHECK(dw_gpu(t, s) == 0.0f);
          dw_cpu(t, s) = 0.0f;
        }
    check_close(flat(dw_gpu), flat(dw_cpu), 1e-4, "dw");
    check_gradients(flat(g_gpu.values()), flat(g_cpu.values()), w, 1e-4);
  }
}

TEST_CASE("cuda_runner: a warm runner allocates nothing; empty batches") {
  GROVE_REQUIRE_GPU();
  const test_case c = float_cases()[0];
  const auto params = make_parameters(c, false);
  const auto w = params.view();
  const row_matrix<float> x = make_input(c, 1, false);
  const grove::routing_plan<float> plan = grove::route(w, grove::routing_options{c.top_k, c.scale}, x);
  grove::cuda_runner gpu(grove::cuda_runner_options{.max_tokens = c.tokens + 5});
  const auto& dev_params = gpu.upload(w);
  row_matrix<float> y(c.tokens, c.dims.hidden), dx = row_matrix<float>::Zero(c.tokens, c.dims.hidden), dw;
  grove::layer_parameters<float> grads(c.dims);

  // Host requests: the first calls size the workspace, later ones (smaller batches too) reuse it.
  gpu.forward(w, plan, x, y);
  gpu.backward(w, plan, x, x, nullptr, grads.span(), dx, dw);
  const std::size_t warm = gpu.workspace_allocations();
  CHECK(warm > 0);
  CHECK(gpu.workspace_bytes() > 0);
  gpu.forward(w, plan, x, y);
  gpu.backward(w, plan, x, x, nullptr, grads.span(), dx, dw);
  const row_matrix<float> x_small = x.topRows(c.tokens - 2);
  const grove::routing_plan<float> small = grove::route(w, grove::routing_options{c.top_k, c.scale}, x_small);
  row_matrix<float> y_small(c.tokens - 2, c.dims.hidden);
  gpu.forward(w, small, x_small, y_small);
  CHECK(gpu.workspace_allocations() == warm);

  // The device path on the same runner: sized once, then nothing.
  gc::device_router<float> router(gpu, dev_params.weights(), grove::routing_options{c.top_k, c.scale});
  auto dev_x = to_device<float>(x);
  gc::device_buffer<float> dev_y(static_cast<std::size_t>(c.tokens * c.dims.hidden));
  gpu.forward(dev_params.weights(), router.route(dev_x.data(), c.tokens), dev_x.data(), dev_y.data());
  const std::size_t device_warm = gpu.workspace_allocations();
  gpu.forward(dev_params.weights(), router.route(dev_x.data(), c.tokens), dev_x.data(), dev_y.data());
  CHECK(gpu.workspace_allocations() == device_warm);
  CHECK(router.workspace_bytes() > 0);

  // T = 0: nothing to do, nothing written; the empty plan has no rows.
  const gc::device_plan& empty = router.route(dev_x.data(), 0);
  gpu.forward(dev_params.weights(), empty, dev_x.data(), dev_y.data());
  CHECK(gc::download(empty).offsets.back() == 0);
  const grove::routing_plan<float> none = grove::route(w, grove::routing_options{c.top_k, c.scale}, x.topRows(0));
  row_matrix<float> y_none(0, c.dims.hidden);
  gpu.forward(w, none, x.topRows(0), y_none);
}

TEST_CASE("cuda_runner: errors name the runner, the dtype and the sizes") {
  GROVE_REQUIRE_GPU();
  const test_case c{{32, 8, 4, 24, 8}, 2, 0.25, 6, false, 31};
  const auto params = make_parameters(c, false);
  const auto w = params.view();
  const row_matrix<float> x = make_input(c, 1, false);
  const grove::routing_plan<float> plan = grove::route(w, grove::routing_options{c.top_k, c.scale}, x);
  grove::cuda_runner gpu(grove::cuda_runner_options{.max_tokens = c.tokens});
  CHECK(gpu.name().rfind("cuda (", 0) == 0);
  CHECK(gpu.name().find("fp32 and bf16") != std::string::npos);
  row_matrix<float> y(c.tokens, c.dims.hidden);

  // Weights that were not uploaded.
  CHECK_THROWS_WITH_AS(gpu.forward(w, plan, x, y), doctest::Contains("cuda_runner::upload(weights)"), grove::error);
  CHECK(gpu.uploaded(w) == nullptr);
  gpu.upload(w);
  CHECK(gpu.uploaded(w) != nullptr);
  CHECK(gpu.uploaded_bytes() > 0);
  CHECK_NOTHROW(gpu.forward(w, plan, x, y));

  // fp64: a clear error naming the runner and the dtype.
  const grove::layer_parameters<double> params64(c.dims);
  const row_matrix<double> x64 = x.cast<double>();
  const grove::routing_plan<double> plan64 = grove::route(params64.view(), grove::routing_options{c.top_k, c.scale}, x64);
  row_matrix<double> y64(c.tokens, c.dims.hidden);
  CHECK_THROWS_WITH_AS(gpu.forward(params64.view(), plan64, x64, y64), doctest::Contains((gpu.name() + ": fp64 (double)").c_str()),
                       grove::error);
  grove::layer_parameters<double> grads64(c.dims);
  row_matrix<double> dx64 = row_matrix<double>::Zero(c.tokens, c.dims.hidden), dw64;
  CHECK_THROWS_WITH_AS(gpu.backward(params64.view(), plan64, x64, x64, nullptr, grads64.span(), dx64, dw64),
                       doctest::Contains("fp64 (double)"), grove::error);

  // A batch larger than max_tokens: the message names both sizes.
  const row_matrix<float> big = make_input(test_case{c.dims, c.top_k, c.scale, c.tokens + 1, false, 32}, 1, false);
  const grove::routing_plan<float> big_plan = grove::route(w, grove::routing_options{c.top_k, c.scale}, big);
  row_matrix<float> y_big(c.tokens + 1, c.dims.hidden);
  CHECK_THROWS_WITH_AS(gpu.forward(w, big_plan, big, y_big),
                       doctest::Contains("a batch of 7 tokens does not fit max_tokens = 6"), grove::error);

  // The training forward: the device keeps no activations.
  grove::saved_activations<float> saved;
  CHECK_THROWS_WITH_AS(gpu.forward_saving(w, plan, x, y, saved), doctest::Contains("saved activations"),
                       grove::error);

  // Bad options and bad router settings.
  CHECK_THROWS_WITH_AS(grove::cuda_runner(grove::cuda_runner_options{.max_tokens = 0}),
                       doctest::Contains("max_tokens must be at least 1"), grove::error);
  const auto& dev_params = *gpu.uploaded(w);
  CHECK_THROWS_AS(gc::device_router<float>(gpu, dev_params.weights(), grove::routing_options{33, c.scale}),
                  grove::error);
  CHECK_THROWS_AS(gc::device_router<float>(gpu, dev_params.weights(), grove::routing_options{c.top_k, -1.0}),
                  grove::error);

  // The device router: too many tokens, and a NaN input (the CPU throws in route; the device
  // raises the runner's flag for check_errors, which clears it).
  gc::device_router<float> router(gpu, dev_params.weights(), grove::routing_options{c.top_k, c.scale});
  auto dev_x = to_device<float>(x);
  CHECK_THROWS_WITH_AS(router.route(dev_x.data(), c.tokens + 1),
                       doctest::Contains("a batch of 7 tokens does not fit max_tokens = 6"), grove::error);
  row_matrix<float> x_nan = x;
  x_nan(2, 3) = std::nanf("");
  auto dev_nan = to_device<float>(x_nan);
  router.route(dev_nan.data(), c.tokens);
  CHECK_THROWS_WITH_AS(gpu.check_errors(), doctest::Contains("NaN"), grove::error);
  CHECK_NOTHROW(gpu.check_errors());
  CHECK_THROWS_AS((void)grove::route(w, grove::routing_options{c.top_k, c.scale}, x_nan), grove::error);
  router.route(dev_x.data(), c.tokens);
  CHECK_NOTHROW(gpu.check_errors());

  CHECK(gpu.release(w));
  CHECK_FALSE(gpu.release(w));
  CHECK(gpu.uploaded(w) == nullptr);
}
