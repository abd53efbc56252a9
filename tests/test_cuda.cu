// Tests of the CUDA backend (docs/cuda.md) against the CPU path: grove::route, grove::layer,
// the CPU runner (grove::cpu_runner), and for backward a plain double-precision reference written
// here (plus grove::gradients when the training helpers are present).
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
struct reference_result {
  row_matrix<double> y;
  row_matrix<double> dx;
  grove::layer_parameters<double> grads;
};

reference_result reference_pass(const grove::weights_view<float>& w, const grove::routing_plan<float>& plan,
                                gc::adjugate_mode mode, const row_matrix<float>& x, const row_matrix<float>* dy) {
  const layer_dims& d = w.dims();
  const index H = d.hidden, E = d.experts, T = plan.tokens;
  reference_result r{row_matrix<double>::Zero(T, H), row_matrix<double>::Zero(T, H),
                     grove::layer_parameters<double>(d)};
  auto grads = r.grads.span();
  row_matrix<double> dw = row_matrix<double>::Zero(T, plan.top_k);
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
  if (dy != nullptr) {
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
  for (index i = 0; i < m.size(); ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(m.data()[i]);
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

/// The device plan must hold exactly what grove's CPU routing decides for the same logits:
/// the same picks, weights, groups, and the same rows per expert and adjugate in the same
/// (ascending-token) order.
void check_plan_matches(const gc::host_plan& dev, const grove::routing_plan<float>& cpu) {
  const index T = cpu.tokens, k = cpu.top_k, E = cpu.experts, G = cpu.groups, mg = cpu.max_groups();
  REQUIRE(dev.tokens == T);
  REQUIRE(dev.max_groups == mg);
  for (index t = 0; t < T; ++t) {
    for (index s = 0; s < k; ++s) {
      const auto at = static_cast<std::size_t>(t * k + s);
      CHECK(dev.topk_ids[at] == cpu.topk_ids(t, s));
      CHECK(dev.topk_weights[at] == doctest::Approx(cpu.topk_weights(t, s)).epsilon(1e-5));
    }
    CHECK(dev.groups_per_token[static_cast<std::size_t>(t)] == cpu.groups_per_token[static_cast<std::size_t>(t)]);
    for (index g = 0; g < mg; ++g) {
      const auto at = static_cast<std::size_t>(t * mg + g);
      CHECK(dev.token_groups[at] == cpu.token_groups(t, g));
      CHECK(dev.group_weights[at] == doctest::Approx(cpu.group_weights(t, g)).epsilon(1e-5));
    }
  }
  for (index e = 0; e <= E; ++e)
    CHECK(dev.offsets[static_cast<std::size_t>(e)] == cpu.expert_offsets[static_cast<std::size_t>(e)]);
  for (index j = 0; j <= G; ++j)
    CHECK(dev.offsets[static_cast<std::size_t>(E + j)] - dev.offsets[static_cast<std::size_t>(E)] ==
          cpu.adjugate_offsets[static_cast<std::size_t>(j)]);
  REQUIRE(dev.rows.size() == cpu.expert_rows.size() + cpu.adjugate_rows.size());
  auto same_row = [](const gc::dispatch_row& a, const grove::dispatch_row<float>& b) {
    return a.token == b.token && a.slot == b.slot &&
           std::abs(a.weight - b.weight) <= 1e-5f * (1.0f + std::abs(b.weight));
  };
  for (std::size_t i = 0; i < cpu.expert_rows.size(); ++i) CHECK(same_row(dev.rows[i], cpu.expert_rows[i]));
  for (std::size_t i = 0; i < cpu.adjugate_rows.size(); ++i)
    CHECK(same_row(dev.rows[cpu.expert_rows.size() + i], cpu.adjugate_rows[i]));
  // The inverse maps point back at each token's own rows.
  for (index t = 0; t < T; ++t)
    for (index s = 0; s < k; ++s) {
      const auto at = static_cast<std::size_t>(t * k + s);
      const auto pick = dev.rows[static_cast<std::size_t>(dev.row_of_pick[at])];
      CHECK((pick.token == t && pick.slot == s));
      const int g = dev.row_of_group[at];
      if (s < cpu.groups_per_token[static_cast<std::size_t>(t)]) {
        REQUIRE(g >= 0);
        const auto row = dev.rows[static_cast<std::size_t>(g)];
        CHECK((row.token == t && row.slot == s));
      } else {
        CHECK(g == -1);
      }
    }
}

row_matrix<float> logits_of(const gc::host_plan& p) {
  row_matrix<float> l(p.tokens, p.experts);
  std::copy(p.logits.begin(), p.logits.end(), l.data());
  return l;
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
// One device run of a case
// ---------------------------------------------------------------------------------------------

template <class T>
struct device_run {
  test_case c;
  bool bf16 = std::is_same_v<T, gc::bfloat16>;
  grove::layer_parameters<float> params;
  row_matrix<float> x;
  gc::device_parameters<T> dev_params;
  gc::device_buffer<T> dev_x;

  explicit device_run(const test_case& tc)
      : c(tc),
        params(make_parameters(tc, bf16)),
        x(make_input(tc, 1, bf16)),
        dev_params(gc::device_parameters<T>::upload(params.view())),
        dev_x(to_device<T>(x)) {}

  gc::layer_options options(gc::adjugate_mode mode = gc::adjugate_mode::once_per_token,
                            gc::combine_mode combine = gc::combine_mode::atomic, bool training = false) const {
    gc::layer_options o;
    o.top_k = c.top_k;
    o.scale = c.scale;
    o.max_tokens = c.tokens + 3;  // batches smaller than the workspace must work too
    o.adjugates = mode;
    o.combine = combine;
    o.training = training;
    return o;
  }
};

template <class T>
void check_routing(const test_case& c) {
  device_run<T> run(c);
  gc::layer<T> layer(run.dev_params.weights(), run.options());
  const gc::host_plan dev = gc::download(layer.route(run.dev_x.data(), c.tokens));
  layer.check_errors();

  // Logits against the CPU router (fp32 accumulation both sides: inputs are exactly
  // representable, only the summation order differs).
  const auto w = run.params.view();
  const grove::routing_plan<float> cpu = grove::route(w, grove::routing_options{c.top_k, c.scale}, run.x);
  check_close(dev.logits, flat(cpu.logits), 1e-5, "router logits");

  // Exactly the CPU's decision for the device's logits.
  check_plan_matches(dev, plan_from_logits(w, c.top_k, c.scale, logits_of(dev)));

  // And grove::route's own picks wherever rounding cannot flip them.
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
void check_forward(const test_case& c, gc::adjugate_mode mode, gc::combine_mode combine, double tol) {
  device_run<T> run(c);
  gc::layer<T> layer(run.dev_params.weights(), run.options(mode, combine));
  gc::device_buffer<T> y(static_cast<std::size_t>(c.tokens * c.dims.hidden));
  layer.forward(run.dev_x.data(), y.data(), c.tokens);
  const row_matrix<float> y_dev = to_host(y, c.tokens, c.dims.hidden);
  const gc::host_plan dev = gc::download(layer.plan());

  const auto w = run.params.view();
  const grove::routing_plan<float> plan = plan_from_logits(w, c.top_k, c.scale, logits_of(dev));
  // The plain reference for this mode...
  const reference_result ref = reference_pass(w, plan, mode, run.x, nullptr);
  check_close(flat(y_dev), flat(ref.y), tol, "y against the plain reference");
  // ...and grove's CPU experts for the default mode (once per pick gives the same y).
  if (mode != gc::adjugate_mode::none) {
    row_matrix<float> y_cpu(c.tokens, c.dims.hidden);
    grove::default_runner()->forward(w, plan, run.x, y_cpu);
    check_close(flat(y_dev), flat(y_cpu), tol, "y against the CPU runner");
  }
  if (combine == gc::combine_mode::deterministic) {
    gc::device_buffer<T> again(y.size());
    layer.forward(run.dev_x.data(), again.data(), c.tokens);
    const auto a = y.download(), b = again.download();
    CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end(),
                     [](T p, T q) { return gc::detail::to_float(p) == gc::detail::to_float(q); }));
  }
}

template <class T>
void check_layer_forward(const test_case& c, double tol) {
  // grove::layer end to end, for the tokens whose routing rounding cannot change.
  device_run<T> run(c);
  gc::layer<T> layer(run.dev_params.weights(), run.options());
  gc::device_buffer<T> y(static_cast<std::size_t>(c.tokens * c.dims.hidden));
  layer.forward(run.dev_x.data(), y.data(), c.tokens);
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

template <class T>
void check_backward(const test_case& c, gc::adjugate_mode mode, gc::combine_mode combine, double tol) {
  device_run<T> run(c);
  gc::layer<T> layer(run.dev_params.weights(), run.options(mode, combine, true));
  const row_matrix<float> dy = make_input(c, 2, run.bf16);
  gc::device_buffer<T> dev_dy = to_device<T>(dy);
  gc::device_buffer<T> y(static_cast<std::size_t>(c.tokens * c.dims.hidden));
  layer.forward(run.dev_x.data(), y.data(), c.tokens);

  // Gradients accumulate: start from a known non-zero state and subtract it afterwards.
  gc::device_parameters<float> grads(c.dims);
  std::vector<float> initial(grads.value_count());
  for (std::size_t i = 0; i < initial.size(); ++i) initial[i] = 0.001f * static_cast<float>(i % 7);
  {
    std::vector<float> upload = initial;
    gc::detail::check(cudaMemcpy(grads.values(), upload.data(), upload.size() * sizeof(float), cudaMemcpyHostToDevice),
                      "upload of initial gradients");
  }
  row_matrix<float> dx0 = make_input(c, 3, false) * 0.01f;
  gc::device_buffer<float> dx = to_device<float>(dx0);
  layer.backward(run.dev_x.data(), dev_dy.data(), dx.data(), grads.gradients());

  const gc::host_plan dev = gc::download(layer.plan());
  const auto w = run.params.view();
  const grove::routing_plan<float> plan = plan_from_logits(w, c.top_k, c.scale, logits_of(dev));
  const reference_result ref = reference_pass(w, plan, mode, run.x, &dy);

  const row_matrix<float> dx_dev = to_host(dx, c.tokens, c.dims.hidden) - dx0;
  check_close(flat(dx_dev), flat(ref.dx), tol, "dx against the plain reference");
  std::vector<float> g = grads.download_values();
  for (std::size_t i = 0; i < g.size(); ++i) g[i] -= initial[i];
  // Compare tensor by tensor so that a small tensor (the router) is not drowned by the others.
  std::size_t at = 0;
  run.params.view().for_each_tensor([&](const grove::tensor_info& info, const float* const&) {
    if (info.role == grove::tensor_role::selection_bias) return;
    const auto n = static_cast<std::size_t>(info.size());
    const std::vector<double> dev_part(g.begin() + static_cast<std::ptrdiff_t>(at),
                                       g.begin() + static_cast<std::ptrdiff_t>(at + n));
    const std::vector<double> ref_part(ref.grads.values().begin() + static_cast<std::ptrdiff_t>(at),
                                       ref.grads.values().begin() + static_cast<std::ptrdiff_t>(at + n));
    at += n;
    if (max_abs(ref_part) == 0.0) {  // an MLP no token picked: its gradient stays untouched
      CHECK(max_abs(dev_part) == 0.0);
      return;
    }
    check_close(dev_part, ref_part, tol, "gradient of " + info.name);
  });
  CHECK(at == g.size());

#ifdef GROVE_TEST_CUDA_HAVE_CPU_BACKWARD
  if (mode == gc::adjugate_mode::once_per_token && !run.bf16) {
    const auto cpu = grove::gradients<float>(w, plan, run.x, dy);
    check_close(flat(dx_dev), flat(cpu.input), tol, "dx against grove::gradients");
    std::vector<double> cpu_values(cpu.weights.values().begin(), cpu.weights.values().end());
    check_close(g, cpu_values, tol, "weight gradients against grove::gradients");
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

TEST_CASE("cuda: device routing equals the CPU's (logits, picks, weights, groups, dispatch rows)") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : float_cases()) {
    CAPTURE(describe(c));
    check_routing<float>(c);
  }
  for (const test_case& c : bf16_cases()) {
    CAPTURE(describe(c));
    check_routing<gc::bfloat16>(c);
  }
}

TEST_CASE("cuda: ties go to the lower expert index and a zero router picks experts 0..k-1") {
  GROVE_REQUIRE_GPU();
  test_case c{{32, 8, 4, 16, 8}, 3, 0.25, 20, false, 21};
  auto params = make_parameters(c, false);
  auto router = params.span().router();
  for (grove::index e = 1; e < c.dims.experts; e += 2) router.row(e) = router.row(e - 1);  // pairs tie exactly
  const row_matrix<float> x = make_input(c, 1, false);
  auto dev_params = gc::device_parameters<float>::upload(params.view());
  auto dev_x = to_device<float>(x);
  gc::layer_options o;
  o.top_k = c.top_k;
  o.scale = c.scale;
  o.max_tokens = c.tokens;
  gc::layer<float> layer(dev_params.weights(), o);
  const gc::host_plan dev = gc::download(layer.route(dev_x.data(), c.tokens));
  for (grove::index t = 0; t < c.tokens; ++t) {
    const auto* ids = &dev.topk_ids[static_cast<std::size_t>(t * c.top_k)];
    for (grove::index s = 0; s < c.top_k; ++s)
      if (ids[s] % 2 == 1) {  // an odd expert may only follow its even twin
        const auto twin = std::find(ids, ids + c.top_k, ids[s] - 1);
        REQUIRE(twin != ids + c.top_k);
        CHECK(twin < ids + s);
      }
  }
  check_plan_matches(dev, plan_from_logits(params.view(), c.top_k, c.scale, logits_of(dev)));

  params.span().router().setZero();
  auto zero_params = gc::device_parameters<float>::upload(params.view());
  gc::layer<float> zero_layer(zero_params.weights(), o);
  const gc::host_plan z = gc::download(zero_layer.route(dev_x.data(), c.tokens));
  for (grove::index t = 0; t < c.tokens; ++t)
    for (grove::index s = 0; s < c.top_k; ++s) {
      CHECK(z.topk_ids[static_cast<std::size_t>(t * c.top_k + s)] == s);
      CHECK(z.topk_weights[static_cast<std::size_t>(t * c.top_k + s)] == doctest::Approx(1.0 / c.top_k));
    }
}

TEST_CASE("cuda: fp32 forward equals the CPU layer") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : float_cases()) {
    CAPTURE(describe(c));
    check_forward<float>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 2e-5);
    check_forward<float>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::deterministic, 2e-5);
    check_layer_forward<float>(c, 2e-5);
  }
}

TEST_CASE("cuda: adjugates once per pick give grove's y, and none gives the plain MoE") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : float_cases()) {
    CAPTURE(describe(c));
    check_forward<float>(c, gc::adjugate_mode::once_per_pick, gc::combine_mode::atomic, 2e-5);
    check_forward<float>(c, gc::adjugate_mode::none, gc::combine_mode::deterministic, 2e-5);
  }
}

TEST_CASE("cuda: BF16 forward (tensor cores, fp32 accumulation) matches the CPU on the same rounded inputs") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : bf16_cases()) {
    CAPTURE(describe(c));
    // h and y are rounded to BF16 on the device (as PyTorch does); the reference is fp32.
    check_forward<gc::bfloat16>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 2e-2);
    check_forward<gc::bfloat16>(c, gc::adjugate_mode::once_per_pick, gc::combine_mode::deterministic, 2e-2);
  }
}

TEST_CASE("cuda: fp32 backward equals the reference (dx, router, experts, adjugates)") {
  GROVE_REQUIRE_GPU();
  const std::vector<test_case> cases = float_cases();
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const test_case& c = cases[i];
    CAPTURE(describe(c));
    check_backward<float>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 1e-4);
    // The deterministic combine on every other shape (it only changes how dx is summed).
    if (i % 2 == 1) check_backward<float>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::deterministic, 1e-4);
  }
  const test_case c = float_cases()[2];
  CAPTURE(describe(c));
  check_backward<float>(c, gc::adjugate_mode::once_per_pick, gc::combine_mode::atomic, 1e-4);
  check_backward<float>(c, gc::adjugate_mode::none, gc::combine_mode::atomic, 1e-4);
}

TEST_CASE("cuda: BF16 backward matches the reference within BF16 rounding") {
  GROVE_REQUIRE_GPU();
  for (const test_case& c : bf16_cases()) {
    CAPTURE(describe(c));
    check_backward<gc::bfloat16>(c, gc::adjugate_mode::once_per_token, gc::combine_mode::atomic, 4e-2);
  }
}

TEST_CASE("cuda: empty batches, smaller batches than the workspace, and errors") {
  GROVE_REQUIRE_GPU();
  const test_case c{{32, 8, 4, 24, 8}, 2, 0.25, 6, false, 31};
  device_run<float> run(c);
  gc::layer_options o = run.options();
  gc::layer<float> layer(run.dev_params.weights(), o);

  // T = 0: nothing to do, nothing written.
  gc::device_buffer<float> y(static_cast<std::size_t>(c.tokens * c.dims.hidden));
  layer.forward(run.dev_x.data(), y.data(), 0);
  CHECK(gc::download(layer.plan()).offsets.back() == 0);

  // Too many tokens for the workspace.
  CHECK_THROWS_AS(layer.route(run.dev_x.data(), o.max_tokens + 1), grove::error);

  // Bad options.
  gc::layer_options bad = o;
  bad.top_k = 33;
  CHECK_THROWS_AS(gc::layer<float>(run.dev_params.weights(), bad), grove::error);
  bad = o;
  bad.scale = -1.0;
  CHECK_THROWS_AS(gc::layer<float>(run.dev_params.weights(), bad), grove::error);
  bad = o;
  bad.max_tokens = 0;
  CHECK_THROWS_AS(gc::layer<float>(run.dev_params.weights(), bad), grove::error);

  // Backward without training workspace.
  gc::device_parameters<float> grads(c.dims);
  layer.route(run.dev_x.data(), c.tokens);
  CHECK_THROWS_AS(layer.backward(run.dev_x.data(), run.dev_x.data(), y.data(), grads.gradients()), grove::error);

  // A NaN input: the CPU throws in route; the device flags it for check_errors.
  row_matrix<float> x = run.x;
  x(2, 3) = std::nanf("");
  auto dev_x = to_device<float>(x);
  layer.route(dev_x.data(), c.tokens);
  CHECK_THROWS_AS(layer.check_errors(), grove::error);
  CHECK_THROWS_AS((void)grove::route(run.params.view(), grove::routing_options{c.top_k, c.scale}, x), grove::error);
  layer.route(run.dev_x.data(), c.tokens);
  CHECK_NOTHROW(layer.check_errors());
}
