// Tests of the training helpers: backward against central finite differences of an independent
// scalar forward, saved vs recomputed activations, float vs double, load balancing, the
// auxiliary loss, upcycling (bit-exact at step 0), AdamW and RMSNorm.
#include <doctest/doctest.h>

#include "support/test_support.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <grove/training.hpp>
#include <map>
#include <numeric>
#include <string>
#include <vector>

namespace {

using grove_test::random_matrix;

using grove::layer_dims;
using grove::layer_parameters;
using grove::row_matrix;

// ------------------------------------------------------------------------------------------
// Independent reference: the layer written as plain loops in double (docs/math.md, forward).
// ------------------------------------------------------------------------------------------

struct reference_output {
  row_matrix<double> y;
  std::vector<std::vector<int>> picks;  // per token, sorted ascending (the picked set)
};

template <class S>
double dot_row(const S* w, const double* x, grove::index n) {
  double acc = 0;
  for (grove::index i = 0; i < n; ++i) acc += double(w[i]) * x[i];
  return acc;
}

// out += scale * down(silu(gate x) * up x) for one SwiGLU MLP, in double.
template <class S>
void reference_mlp(const grove::swiglu_weights<const S>& m, const double* x, double scale, double* out) {
  const grove::index inter = m.gate.rows(), h = m.gate.cols();
  std::vector<double> hid(static_cast<std::size_t>(inter));
  for (grove::index i = 0; i < inter; ++i) {
    const double g = dot_row(m.gate.data() + i * h, x, h);
    const double u = dot_row(m.up.data() + i * h, x, h);
    hid[static_cast<std::size_t>(i)] = g / (1.0 + std::exp(-g)) * u;
  }
  for (grove::index o = 0; o < h; ++o) out[o] += scale * dot_row(m.down.data() + o * inter, hid.data(), inter);
}

// `adjugates`: once per token (the adjugate of each picked group with λ·c_j), once per pick (the
// group's adjugate for every pick, each with λ·w_s: the released code's order of evaluation),
// or none.
template <class S>
reference_output reference_forward(const grove::weights_view<S>& w, grove::index k, double lambda,
                                   const row_matrix<double>& x,
                                   grove::adjugate_mode adjugates = grove::adjugate_mode::once_per_token) {
  const layer_dims& d = w.dims();
  reference_output r;
  r.y = row_matrix<double>::Zero(x.rows(), d.hidden);
  for (grove::index t = 0; t < x.rows(); ++t) {
    const double* xt = &x(t, 0);
    std::vector<double> logit(static_cast<std::size_t>(d.experts)), score(logit.size());
    for (grove::index e = 0; e < d.experts; ++e) {
      logit[static_cast<std::size_t>(e)] = dot_row(w.router().data() + e * d.hidden, xt, d.hidden);
      const double b = w.bias() ? double(w.bias()[e]) : 0.0;
      score[static_cast<std::size_t>(e)] = 1.0 / (1.0 + std::exp(-logit[static_cast<std::size_t>(e)])) + b;
    }
    std::vector<int> order(logit.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)];
    });
    std::vector<int> picks(order.begin(), order.begin() + k);
    double top = -1e300, sum = 0;
    for (int e : picks) top = std::max(top, logit[static_cast<std::size_t>(e)]);
    for (int e : picks) sum += std::exp(logit[static_cast<std::size_t>(e)] - top);
    std::vector<double> group_weight(static_cast<std::size_t>(d.groups), 0.0);
    for (int e : picks) {
      const double ws = std::exp(logit[static_cast<std::size_t>(e)] - top) / sum;
      reference_mlp(w.expert(e), xt, ws, &r.y(t, 0));
      if (adjugates == grove::adjugate_mode::once_per_pick)
        reference_mlp(w.adjugate(e / d.group_size()), xt, lambda * ws, &r.y(t, 0));
      group_weight[static_cast<std::size_t>(e / d.group_size())] += ws;
    }
    if (adjugates == grove::adjugate_mode::once_per_token)
      for (grove::index j = 0; j < d.groups; ++j)
        if (group_weight[static_cast<std::size_t>(j)] > 0)
          reference_mlp(w.adjugate(j), xt, lambda * group_weight[static_cast<std::size_t>(j)], &r.y(t, 0));
    std::sort(picks.begin(), picks.end());
    r.picks.push_back(picks);
  }
  return r;
}

double inner(const row_matrix<double>& a, const row_matrix<double>& b) { return a.cwiseProduct(b).sum(); }


struct layer_case {
  const char* name;
  layer_dims dims;
  grove::index top_k;
  double lambda;
  bool bias;
  grove::index tokens;
};

layer_parameters<double> case_parameters(const layer_case& c, std::uint64_t seed) {
  auto p = layer_parameters<double>::random(c.dims, seed, 0.4);
  if (c.bias) {
    grove::detail::normal_generator gen(seed + 99);
    for (double& b : p.bias()) b = 0.05 * gen.normal();
  }
  return p;
}

// Central differences of L = <R, y> for every entry of every tensor and of x, against the
// analytic gradient. An entry whose ±h perturbation changes any token's picked set is skipped:
// the loss is not differentiable across a change of selection.
void check_against_finite_differences(const layer_case& c, std::uint64_t seed,
                                      grove::adjugate_mode adjugates = grove::adjugate_mode::once_per_token) {
  CAPTURE(c.name);
  CAPTURE(static_cast<int>(adjugates));
  layer_parameters<double> p = case_parameters(c, seed);
  const row_matrix<double> x = random_matrix<double>(c.tokens, c.dims.hidden, seed + 1);
  const row_matrix<double> R = random_matrix<double>(c.tokens, c.dims.hidden, seed + 2);
  grove::routing_options options{c.top_k, c.lambda};
  options.adjugates = adjugates;

  const auto plan = grove::route(p.view(), options, x);
  const reference_output base = reference_forward(p.view(), c.top_k, c.lambda, x, adjugates);
  for (grove::index t = 0; t < c.tokens; ++t) {
    std::vector<int> ids(&plan.topk_ids(t, 0), &plan.topk_ids(t, 0) + c.top_k);
    std::sort(ids.begin(), ids.end());
    REQUIRE(ids == base.picks[static_cast<std::size_t>(t)]);
  }
  row_matrix<double> y(c.tokens, c.dims.hidden);
  grove::default_runner()->forward<double>(p.view(), plan, x, y);
  REQUIRE((y - base.y).cwiseAbs().maxCoeff() < 1e-12);

  const auto g = grove::gradients<double>(p.view(), plan, x, R);
  const double h = 1e-5;
  auto check = [&](double analytic, auto&& evaluate, const std::string& what, grove::index entry, int& checked,
                   int& skipped) {
    const auto plus = evaluate(+h), minus = evaluate(-h);
    if (plus.picks != base.picks || minus.picks != base.picks) {
      ++skipped;
      return;
    }
    ++checked;
    const double fd = (inner(R, plus.y) - inner(R, minus.y)) / (2 * h);
    if (std::abs(fd - analytic) > 2e-9 + 1e-8 * std::abs(analytic)) {
      FAIL_CHECK(what << "[" << entry << "]: analytic " << analytic << " vs finite difference " << fd);
    }
  };

  // Every trainable tensor, every entry; the gradient buffers are walked in the same order.
  std::vector<double*> params_ptrs, grad_ptrs;
  std::vector<grove::tensor_info> infos;
  p.span().for_each_tensor([&](const grove::tensor_info& info, double*& ptr) {
    infos.push_back(info);
    params_ptrs.push_back(ptr);
  });
  grove::weights_view<double> gv = g.weights.view();
  gv.for_each_tensor(
      [&](const grove::tensor_info&, const double* const& ptr) { grad_ptrs.push_back(const_cast<double*>(ptr)); });
  int total_checked = 0, total_skipped = 0;
  for (std::size_t n = 0; n < infos.size(); ++n) {
    const auto& info = infos[n];
    if (info.role == grove::tensor_role::selection_bias) continue;
    int checked = 0, skipped = 0;
    for (grove::index i = 0; i < info.size(); ++i) {
      double& entry = params_ptrs[n][i];
      const double saved = entry;
      check(
          grad_ptrs[n][i],
          [&](double step) {
            entry = saved + step;
            auto out = reference_forward(p.view(), c.top_k, c.lambda, x, adjugates);
            entry = saved;
            return out;
          },
          info.name, i, checked, skipped);
    }
    CAPTURE(info.name);
    CHECK(checked > 0);  // every tensor is actually covered
    total_checked += checked;
    total_skipped += skipped;
  }
  // The bias receives no gradient.
  for (double b : g.weights.bias()) CHECK(b == 0.0);

  int checked = 0, skipped = 0;
  row_matrix<double> xp = x;
  for (grove::index i = 0; i < x.size(); ++i) {
    check(
        g.input.data()[i],
        [&](double step) {
          xp.data()[i] = x.data()[i] + step;
          auto out = reference_forward(p.view(), c.top_k, c.lambda, xp, adjugates);
          xp.data()[i] = x.data()[i];
          return out;
        },
        "x", i, checked, skipped);
  }
  CHECK(checked > 0);
  total_checked += checked;
  total_skipped += skipped;
  // Perturbations of 1e-5 rarely change a selection: most entries are checked.
  CHECK(total_skipped * 20 < total_checked);
}

const layer_case fd_cases[] = {
    // name, {H, E, G, I, Ia}, k, λ, bias, T
    {"general, bias", {6, 8, 4, 5, 3}, 3, 0.25, true, 9}, {"group size 1", {5, 4, 4, 4, 3}, 2, 0.5, false, 6},
    {"one group", {5, 6, 1, 4, 3}, 3, 0.15, true, 6},     {"k = 1", {5, 6, 3, 4, 2}, 1, 0.3, true, 6},
    {"k = E", {4, 4, 2, 3, 2}, 4, 0.25, false, 5},        {"lambda = 0", {5, 6, 2, 4, 3}, 2, 0.0, true, 6},
};

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  using S = std::remove_cv_t<std::remove_reference_t<decltype(*a.begin())>>;
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](S u, S v) { return std::memcmp(&u, &v, sizeof(S)) == 0; });
}

template <class S>
bool same_bits(const row_matrix<S>& a, const row_matrix<S>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         same_bits(std::span<const S>(a.data(), std::size_t(a.size())),
                   std::span<const S>(b.data(), std::size_t(b.size())));
}

}  // namespace

TEST_SUITE("training") {
  TEST_CASE("backward matches central finite differences on every tensor and on x") {
    std::uint64_t seed = 11;
    for (const auto& c : fd_cases) check_against_finite_differences(c, seed += 10);
  }

  TEST_CASE("once per pick: backward matches central finite differences of the once-per-pick forward") {
    // The forward evaluates each pick's adjugate on its own (weight λ·w_s); its gradients, the
    // router's through dw included, are those of that forward (fp64: the plain runner path).
    std::uint64_t seed = 511;
    for (const auto& c : fd_cases)
      check_against_finite_differences(c, seed += 10, grove::adjugate_mode::once_per_pick);
  }

  TEST_CASE("the general case shares adjugates between picks, so the once-per-token path is exercised") {
    const auto& c = fd_cases[0];
    auto p = case_parameters(c, 21);
    const auto x = random_matrix<double>(c.tokens, c.dims.hidden, 22);
    const auto plan = grove::route(p.view(), {c.top_k, c.lambda}, x);
    CHECK(plan.adjugate_evaluations() < plan.tokens * plan.top_k);
  }

  TEST_CASE_TEMPLATE("saved activations and recomputation give bit-identical gradients", S, float, double) {
    const layer_dims dims{16, 8, 4, 12, 6};
    auto p = layer_parameters<S>::random(dims, 5, 0.3);
    grove::detail::normal_generator gen(6);
    for (S& b : p.bias()) b = static_cast<S>(0.05 * gen.normal());
    const auto x = random_matrix<S>(40, dims.hidden, 7);
    const auto dy = random_matrix<S>(40, dims.hidden, 8);
    for (const auto mode : {grove::adjugate_mode::once_per_token, grove::adjugate_mode::once_per_pick}) {
      CAPTURE(static_cast<int>(mode));
      grove::routing_options options{3, 0.3};
      options.adjugates = mode;
      const auto plan = grove::route(p.view(), options, x);

      grove::saved_activations<S> saved;
      row_matrix<S> y(x.rows(), dims.hidden), y_core(x.rows(), dims.hidden);
      grove::forward_saving<S>(p.view(), plan, x, y, saved);
      grove::default_runner()->forward<S>(p.view(), plan, x, y_core);
      CHECK(saved.matches(plan, dims));
      // Once per pick also keeps one adjugate row per pick.
      const std::size_t pick_rows = mode == grove::adjugate_mode::once_per_pick ? 40 * 3 * 6 : 0;
      CHECK(saved.bytes() == sizeof(S) * std::size_t(2 * (40 * 3 * 12 + plan.adjugate_evaluations() * 6 + pick_rows)));
      // The training forward computes the same y as the inference kernel (up to rounding, since
      // that kernel may be optimised independently).
      CHECK((y - y_core).cwiseAbs().maxCoeff() <= S(1e-5) * (S(1) + y_core.cwiseAbs().maxCoeff()));

      const auto kept = grove::gradients<S>(p.view(), plan, x, dy, &saved);
      const auto recomputed = grove::gradients<S>(p.view(), plan, x, dy);
      CHECK(same_bits(kept.weights.values(), recomputed.weights.values()));
      CHECK(same_bits(kept.input, recomputed.input));
      CHECK(kept.input.cwiseAbs().maxCoeff() > 0);

      // Activations saved for another plan are refused, and so are those of another adjugate mode.
      const auto other_x = random_matrix<S>(40, dims.hidden, 9);
      const auto other_plan = grove::route(p.view(), options, other_x);
      CHECK_THROWS_AS((void)grove::gradients<S>(p.view(), other_plan, other_x, dy, &saved), grove::error);
      auto other_mode = plan;
      other_mode.adjugates = mode == grove::adjugate_mode::once_per_pick ? grove::adjugate_mode::once_per_token
                                                                         : grove::adjugate_mode::once_per_pick;
      CHECK(!saved.matches(other_mode, dims));
      CHECK_THROWS_AS((void)grove::gradients<S>(p.view(), other_mode, x, dy, &saved), grove::error);
    }
  }

  TEST_CASE("float gradients agree with double gradients to 1e-4 relative, tensor by tensor") {
    const layer_dims dims{16, 8, 4, 12, 6};
    const auto pd0 = layer_parameters<double>::random(dims, 31, 0.3);
    // The same numbers in both precisions: round to float first.
    layer_parameters<float> pf(dims);
    layer_parameters<double> pd(dims);
    for (std::size_t i = 0; i < pd0.values().size(); ++i) {
      pf.values()[i] = static_cast<float>(pd0.values()[i]);
      pd.values()[i] = double(pf.values()[i]);
    }
    for (grove::index e = 0; e < dims.experts; ++e) {
      pf.bias()[std::size_t(e)] = static_cast<float>(0.01 * double(e % 3));
      pd.bias()[std::size_t(e)] = double(pf.bias()[std::size_t(e)]);
    }
    const auto xf = random_matrix<float>(48, dims.hidden, 32);
    const auto dyf = random_matrix<float>(48, dims.hidden, 33);
    const row_matrix<double> xd = xf.cast<double>(), dyd = dyf.cast<double>();
    const auto plan_f = grove::route(pf.view(), {3, 0.25}, xf);
    const auto plan_d = grove::route(pd.view(), {3, 0.25}, xd);
    REQUIRE(plan_f.topk_ids == plan_d.topk_ids);

    const auto gf = grove::gradients<float>(pf.view(), plan_f, xf, dyf);
    const auto gd = grove::gradients<double>(pd.view(), plan_d, xd, dyd);
    std::vector<std::pair<std::string, grove::index>> tensors;
    gd.weights.view().for_each_tensor([&](const grove::tensor_info& info, const double* const&) {
      if (info.role != grove::tensor_role::selection_bias) tensors.emplace_back(info.name, info.size());
    });
    std::size_t at = 0;
    for (const auto& tensor : tensors) {
      const std::string& name = tensor.first;
      double scale = 0, diff = 0;
      for (grove::index i = 0; i < tensor.second; ++i, ++at) {
        scale = std::max(scale, std::abs(gd.weights.values()[at]));
        diff = std::max(diff, std::abs(double(gf.weights.values()[at]) - gd.weights.values()[at]));
      }
      CAPTURE(name);
      CHECK(diff <= 1e-4 * scale + 1e-30);
    }
    const double scale = gd.input.cwiseAbs().maxCoeff();
    CHECK((gf.input.cast<double>() - gd.input).cwiseAbs().maxCoeff() <= 1e-4 * scale);
  }

  TEST_CASE("gradients accumulate: two micro-batches sum to the gradient of the whole batch") {
    const layer_dims dims{8, 6, 3, 5, 4};
    auto p = layer_parameters<double>::random(dims, 41, 0.4);
    const auto x = random_matrix<double>(20, dims.hidden, 42);
    const auto dy = random_matrix<double>(20, dims.hidden, 43);
    const grove::routing_options o{2, 0.3};

    const auto whole = grove::gradients<double>(p.view(), grove::route(p.view(), o, x), x, dy);
    layer_parameters<double> sum(dims);
    row_matrix<double> dx = row_matrix<double>::Zero(20, dims.hidden);
    for (grove::index first : {grove::index(0), grove::index(12)}) {
      const grove::index n = first == 0 ? 12 : 8;
      const row_matrix<double> xb = x.middleRows(first, n), dyb = dy.middleRows(first, n);
      row_matrix<double> dxb = row_matrix<double>::Zero(n, dims.hidden);
      grove::backward<double>(p.view(), grove::route(p.view(), o, xb), xb, dyb, sum.span(), dxb);
      dx.middleRows(first, n) = dxb;
    }
    double worst = 0;
    for (std::size_t i = 0; i < sum.values().size(); ++i)
      worst = std::max(worst, std::abs(sum.values()[i] - whole.weights.values()[i]));
    CHECK(worst < 1e-12);
    CHECK((dx - whole.input).cwiseAbs().maxCoeff() < 1e-12);

    // dx accumulates too: a second backward into the same buffer doubles it.
    row_matrix<double> twice = whole.input;
    layer_parameters<double> scratch(dims);
    grove::backward<double>(p.view(), grove::route(p.view(), o, x), x, dy, scratch.span(), twice);
    CHECK((twice - 2 * whole.input).cwiseAbs().maxCoeff() < 1e-12);
  }

  TEST_CASE("router backward sums in its documented order: tokens ascending for dW_r, experts ascending for dx") {
    const layer_dims dims{37, 6, 3, 8, 4};
    const auto params = layer_parameters<float>::random(dims, 81, 0.3);
    const auto x = random_matrix<float>(19, dims.hidden, 82);
    row_matrix<float> dl = random_matrix<float>(19, dims.experts, 83);
    for (grove::index t = 0; t < dl.rows(); ++t) dl(t, t % dims.experts) = 0.0f;  // skipped terms
    const row_matrix<float> dx0 = random_matrix<float>(19, dims.hidden, 84);
    layer_parameters<float> grads(dims);
    for (float& v : grads.values()) v = 0.5f;
    row_matrix<float> dx = dx0;
    grove::router_backward<float>(params.view(), x, dl, grads.span(), dx);
    // The order, written out: what an expert-parallel run reproduces by gathering rows in token order.
    for (grove::index e = 0; e < dims.experts; ++e)
      for (grove::index c = 0; c < dims.hidden; ++c) {
        float sum = 0.0f;
        for (grove::index t = 0; t < x.rows(); ++t)
          if (dl(t, e) != 0.0f) sum += dl(t, e) * x(t, c);
        CHECK(std::bit_cast<std::uint32_t>(grads.view().router()(e, c)) == std::bit_cast<std::uint32_t>(0.5f + sum));
      }
    for (grove::index t = 0; t < x.rows(); ++t)
      for (grove::index c = 0; c < dims.hidden; ++c) {
        float v = dx0(t, c);
        for (grove::index e = 0; e < dims.experts; ++e)
          if (dl(t, e) != 0.0f) v += dl(t, e) * params.view().router()(e, c);
        CHECK(std::bit_cast<std::uint32_t>(dx(t, c)) == std::bit_cast<std::uint32_t>(v));
      }
  }

  TEST_CASE("layer overloads: forward_for_training and backward agree with the free functions") {
    const layer_dims dims{8, 8, 4, 6, 3};
    auto params = layer_parameters<float>::random(dims, 51, 0.3);
    const auto x = random_matrix<float>(16, dims.hidden, 52);
    const auto dy = random_matrix<float>(16, dims.hidden, 53);
    grove::layer l(grove::dynamic_config<float>(dims, 2, 0.25), params);
    for (bool keep : {true, false}) {
      const auto f = grove::forward_for_training(l, x, keep);
      CHECK(f.saved.empty() == !keep);
      CHECK((f.y - l.forward(x)).cwiseAbs().maxCoeff() < 1e-5f);
      layer_parameters<float> g(dims);
      row_matrix<float> dx = row_matrix<float>::Zero(16, dims.hidden);
      grove::backward(l, f, x, dy, g.span(), dx);
      const auto ref = grove::gradients<float>(l.weights(), f.plan, x, dy);
      CHECK(same_bits(g.values(), ref.weights.values()));
      CHECK(same_bits(dx, ref.input));
    }
    // Gradient buffers of another shape are refused.
    layer_parameters<float> wrong(layer_dims{8, 8, 4, 6, 2});
    row_matrix<float> dx = row_matrix<float>::Zero(16, dims.hidden);
    CHECK_THROWS_AS(grove::backward(l, grove::forward_for_training(l, x), x, dy, wrong.span(), dx), grove::error);
  }

  // ------------------------------------------------------------------------------------------
  // Load balancing
  // ------------------------------------------------------------------------------------------

  TEST_CASE("normalized bias update: b -= alpha (F - Q) / ||F - Q||, by hand") {
    // E = 4, counts {6, 2, 2, 2}: F = {1/2, 1/6, 1/6, 1/6}, Q = 1/4, F - Q = {1/4, -1/12, -1/12, -1/12},
    // ||F - Q|| = sqrt(1/16 + 3/144) = 1/(2 sqrt 3), so the direction is {sqrt3/2, -1/(2 sqrt3), ...}.
    std::vector<double> bias{0.0, 0.0, 0.0, 0.5};
    const std::vector<grove::index> counts{6, 2, 2, 2};
    CHECK(grove::update_selection_bias(std::span<double>(bias), counts, {0.1, grove::bias_update_rule::normalized}));
    CHECK(bias[0] == doctest::Approx(-0.1 * std::sqrt(3.0) / 2).epsilon(1e-14));
    CHECK(bias[1] == doctest::Approx(0.1 / (2 * std::sqrt(3.0))).epsilon(1e-14));
    CHECK(bias[2] == doctest::Approx(0.1 / (2 * std::sqrt(3.0))).epsilon(1e-14));
    CHECK(bias[3] == doctest::Approx(0.5 + 0.1 / (2 * std::sqrt(3.0))).epsilon(1e-14));
  }

  TEST_CASE("sign bias update, and no update (no division by zero) when the load is exactly even") {
    std::vector<float> bias{0.f, 0.f, 0.f, 0.f};
    // counts {3, 3, 4, 2}, total 12: F - Q = {0, 0, +1/12, -1/12} -> sign {0, 0, +1, -1}.
    CHECK(grove::update_selection_bias(std::span<float>(bias), std::vector<grove::index>{3, 3, 4, 2},
                                       {0.01, grove::bias_update_rule::sign}));
    CHECK(bias == std::vector<float>{0.f, 0.f, -0.01f, 0.01f});

    for (auto rule : {grove::bias_update_rule::normalized, grove::bias_update_rule::sign}) {
      std::vector<float> b{0.25f, -0.5f, 0.f, 1.f};
      const auto before = b;
      CHECK_FALSE(
          grove::update_selection_bias(std::span<float>(b), std::vector<grove::index>{5, 5, 5, 5}, {0.1, rule}));
      CHECK_FALSE(
          grove::update_selection_bias(std::span<float>(b), std::vector<grove::index>{0, 0, 0, 0}, {0.1, rule}));
      CHECK(b == before);
    }
    // Odd totals still decide balance exactly: 3 experts, 7 picks each.
    std::vector<double> b3{0, 0, 0};
    CHECK_FALSE(grove::update_selection_bias(std::span<double>(b3), std::vector<grove::index>{7, 7, 7}, {0.1}));
    std::vector<double> b4{0, 0};
    CHECK_THROWS_AS(grove::update_selection_bias(std::span<double>(b4), std::vector<grove::index>{7, 7, 7}, {0.1}),
                    grove::error);
  }

  TEST_CASE("expert load from plans: counter, activation_stats and the plan-based update agree") {
    const layer_dims dims{8, 8, 4, 4, 2};
    auto p = layer_parameters<float>::random(dims, 61, 0.5);
    const auto x = random_matrix<float>(30, dims.hidden, 62);
    const auto plan = grove::route(p.view(), {2, 0.25}, x);
    const auto stats = grove::compute_activation_stats(plan, dims);

    grove::expert_load_counter load(dims.experts);
    load.add(plan);
    load.add(stats);
    CHECK(load.total() == 2 * 30 * 2);
    std::vector<grove::index> by_hand(8, 0);
    for (grove::index t = 0; t < 30; ++t)
      for (grove::index s = 0; s < 2; ++s) by_hand[std::size_t(plan.topk_ids(t, s))] += 2;
    CHECK(std::vector<grove::index>(load.counts().begin(), load.counts().end()) == by_hand);
    const auto f = load.fractions();
    CHECK(std::accumulate(f.begin(), f.end(), 0.0) == doctest::Approx(1.0));

    std::vector<float> b1(8, 0.f), b2(8, 0.f);
    grove::update_selection_bias(std::span<float>(b1), plan, {0.01});
    grove::update_selection_bias(std::span<float>(b2), load, {0.01});
    CHECK(b1 == b2);  // doubling every count leaves F unchanged

    const auto spread = grove::measure_load_spread(std::vector<grove::index>{2, 4, 6, 0});
    CHECK(spread.max_over_mean == doctest::Approx(2.0));
    CHECK(spread.coefficient_of_variation == doctest::Approx(std::sqrt(5.0) / 3.0));
    CHECK(spread.min == 0);
    CHECK(spread.max == 6);
  }

  TEST_CASE("repeated bias updates even out a skewed routing of a fixed batch") {
    const layer_dims dims{8, 8, 4, 4, 2};
    auto p = layer_parameters<float>::random(dims, 65, 0.3);
    // Skew the router: experts 0 and 1 see every token.
    for (grove::index h = 0; h < dims.hidden; ++h) p.span().router()(0, h) += 0.5f, p.span().router()(1, h) += 0.4f;
    const auto x = random_matrix<float>(200, dims.hidden, 66).cwiseAbs().eval();
    auto cv_now = [&]() {
      grove::expert_load_counter load(dims.experts);
      load.add(grove::route(p.view(), {2, 0.25}, x));
      return grove::measure_load_spread(load.counts()).coefficient_of_variation;
    };
    const double before = cv_now();
    for (int i = 0; i < 300; ++i) grove::update_selection_bias(p.bias(), grove::route(p.view(), {2, 0.25}, x), {0.01});
    const double after = cv_now();
    CAPTURE(before);
    CAPTURE(after);
    CHECK(before > 1.0);
    CHECK(after < 0.25 * before);
  }

  TEST_CASE("Switch auxiliary loss: hand-computed values as load_balancing_loss_func computes them") {
    // Token 0: logits (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4); token 1: (0, 0, ln 3) -> p = (1/5, 1/5, 3/5).
    // P = (0.35, 0.225, 0.425).
    row_matrix<double> l(2, 3);
    l << std::log(2.0), 0, 0, 0, 0, std::log(3.0);
    // k = 1: picks e0, e2 -> f = (1/2, 0, 1/2); L = 3 (0.5·0.35 + 0.5·0.425) = 1.1625.
    CHECK(grove::load_balancing_loss<double>(l, 1) == doctest::Approx(1.1625).epsilon(1e-14));
    // k = 2: picks {e0, e1 (tie with e2, lower grove::index)}, {e2, e0 (tie with e1)}: f = (1, 1/2, 1/2);
    // L = 3 (0.35 + 0.1125 + 0.2125) = 2.025.
    CHECK(grove::load_balancing_loss<double>(l, 2) == doctest::Approx(2.025).epsilon(1e-14));
    // Perfectly even routing gives k: two tokens, one pick each on different experts, p uniform in the mean.
    row_matrix<double> even(2, 2);
    even << 1, 0, 0, 1;
    CHECK(grove::load_balancing_loss<double>(even, 1) == doctest::Approx(1.0).epsilon(1e-14));

    // Gradient by hand for k = 1: ∂L/∂p_te = E f_e / N = 3 f_e / 2 = (3/4, 0, 3/4) =: a.
    // Token 0: p = (1/2, 1/4, 1/4), Σ p a = 3/8 + 3/16 = 9/16; dl = coefficient · p ⊙ (a − 9/16).
    row_matrix<double> dl = row_matrix<double>::Zero(2, 3);
    (void)grove::load_balancing_loss<double>(l, 1, 2.0, &dl);  // coefficient 2
    CHECK(dl(0, 0) == doctest::Approx(2 * 0.5 * (3.0 / 4 - 9.0 / 16)).epsilon(1e-14));
    CHECK(dl(0, 1) == doctest::Approx(2 * 0.25 * (0 - 9.0 / 16)).epsilon(1e-14));
    CHECK(dl(0, 2) == doctest::Approx(2 * 0.25 * (3.0 / 4 - 9.0 / 16)).epsilon(1e-14));
    CHECK(dl.row(1).sum() == doctest::Approx(0.0));  // softmax gradients sum to zero per row
  }

  TEST_CASE("Switch auxiliary loss gradient matches finite differences through the router and x") {
    const layer_dims dims{6, 8, 4, 3, 2};
    auto p = layer_parameters<double>::random(dims, 71, 0.5);
    auto x = random_matrix<double>(12, dims.hidden, 72);
    const grove::routing_options o{3, 0.25};
    const auto plan = grove::route(p.view(), o, x);
    layer_parameters<double> g(dims);
    row_matrix<double> dx = row_matrix<double>::Zero(12, dims.hidden);
    const double coefficient = 0.7;
    const double value = grove::add_load_balancing_loss<double>(p.view(), plan, x, coefficient, g.span(), dx);
    CHECK(value == doctest::Approx(grove::load_balancing_loss<double>(plan.logits, 3)));
    // Only the router gets a gradient from the auxiliary loss.
    for (grove::index e = 0; e < dims.experts; ++e) CHECK(g.view().expert(e).gate.cwiseAbs().maxCoeff() == 0.0);

    auto loss_and_picks = [&](const row_matrix<double>& xx) {
      const auto pl = grove::route(p.view(), o, xx);
      return std::pair{coefficient * grove::load_balancing_loss<double>(pl.logits, 3), pl.topk_ids};
    };
    const double h = 1e-6;
    int checked = 0;
    auto check = [&](double analytic, auto&& at) {
      const auto [lp, ip] = at(+h);
      const auto [lm, im] = at(-h);
      if (ip != plan.topk_ids || im != plan.topk_ids) return;
      ++checked;
      CHECK((lp - lm) / (2 * h) == doctest::Approx(analytic).epsilon(1e-6).scale(1e-3));
    };
    double* router = p.span().router().data();
    for (grove::index i = 0; i < dims.experts * dims.hidden; ++i) {
      const double keep = router[i];
      check(g.view().router().data()[i], [&](double step) {
        router[i] = keep + step;
        auto r = loss_and_picks(x);
        router[i] = keep;
        return r;
      });
    }
    for (grove::index i = 0; i < x.size(); ++i) {
      const double keep = x.data()[i];
      check(dx.data()[i], [&](double step) {
        x.data()[i] = keep + step;
        auto r = loss_and_picks(x);
        x.data()[i] = keep;
        return r;
      });
    }
    CHECK(checked > 100);
  }

  // ------------------------------------------------------------------------------------------
  // Upcycling
  // ------------------------------------------------------------------------------------------

  TEST_CASE("upcycling keeps router and experts, zeroes adjugate down projections, draws gate/up") {
    // A plain MoE described as a layer with one tiny, unused adjugate.
    const layer_dims plain_dims{8, 8, 1, 6, 1};
    auto plain = layer_parameters<float>::random(plain_dims, 81, 0.3);
    for (std::size_t e = 0; e < 8; ++e) plain.bias()[e] = 0.01f * float(e);
    const grove::upcycle_options options{4, 5, 7, 0.006};
    const auto grove_params = grove::upcycle(plain.view(), options);
    const layer_dims want{8, 8, 4, 6, 5};
    REQUIRE(grove_params.dims() == want);

    const auto g = grove_params.view();
    const auto q = plain.view();
    CHECK(g.router() == q.router());
    for (grove::index e = 0; e < 8; ++e) {
      CHECK(g.expert(e).gate == q.expert(e).gate);
      CHECK(g.expert(e).up == q.expert(e).up);
      CHECK(g.expert(e).down == q.expert(e).down);
      CHECK(g.bias()[e] == q.bias()[e]);
    }
    double sum2 = 0;
    grove::index n = 0;
    for (grove::index j = 0; j < 4; ++j) {
      CHECK(g.adjugate(j).down.cwiseAbs().maxCoeff() == 0.0f);
      for (const auto& m : {g.adjugate(j).gate, g.adjugate(j).up}) {
        sum2 += double(m.squaredNorm());
        n += m.size();
      }
    }
    CHECK(std::sqrt(sum2 / double(n)) == doctest::Approx(0.006).epsilon(0.15));

    // The same seed gives the same layer; through a name lookup as the CLI would use.
    std::map<std::string, const float*> by_name;
    plain.view().for_each_tensor(
        [&](const grove::tensor_info& info, const float* const& ptr) { by_name[info.name] = ptr; });
    const auto again = grove::upcycle<float>(
        8, 8, 6,
        [&](const grove::tensor_info& info) -> const float* {
          auto it = by_name.find(info.name);
          return it == by_name.end() ? nullptr : it->second;
        },
        options);
    CHECK(same_bits(again.values(), grove_params.values()));
    CHECK(same_bits(again.bias(), grove_params.bias()));
    auto other = options;
    other.seed = 8;
    CHECK_FALSE(same_bits(grove::upcycle(plain.view(), other).values(), grove_params.values()));
    // A missing expert tensor is named.
    CHECK_THROWS_WITH_AS((void)grove::upcycle<float>(
                             8, 8, 6,
                             [&](const grove::tensor_info& info) -> const float* {
                               return info.name == "experts.5.up_proj.weight" ? nullptr : by_name[info.name];
                             },
                             options),
                         doctest::Contains("experts.5.up_proj.weight"), grove::error);
  }

  TEST_CASE("an upcycled layer's output is bit-for-bit the plain MoE's at step 0") {
    const layer_dims plain_dims{16, 8, 1, 12, 1};
    auto plain = layer_parameters<float>::random(plain_dims, 91, 0.3);
    for (std::size_t e = 0; e < 8; ++e) plain.bias()[e] = 0.02f * float(e % 4);
    const auto params = grove::upcycle(plain.view(), {4, 8, 3, 0.006});
    const auto x = random_matrix<float>(64, 16, 92);

    // The Grove layer, λ = 0.25 (= G / E), with the adjugates really evaluated.
    grove::layer grove_layer(grove::dynamic_config<float>(params.dims(), 3, 0.25), params);
    const auto result = grove_layer.forward(x, grove::forward_request{true, true});
    REQUIRE(result.statistics->adjugate_evaluations > 0);

    // (1) The plain MoE by the same kernel: the same plan with the adjugates left out.
    auto plan = *result.routing;
    plan.adjugates = grove::adjugate_mode::none;
    row_matrix<float> y_plain(64, 16);
    grove::default_runner()->forward<float>(params.view(), plan, x, y_plain);
    CHECK(same_bits(result.y, y_plain));

    // (2) The same layer with λ = 0.
    grove::layer no_adjugates(grove::dynamic_config<float>(params.dims(), 3, 0.0), params);
    CHECK(same_bits(result.y, no_adjugates.forward(x)));

    // (3) An independent scalar plain MoE (router + experts of the original weights), in double.
    const auto ref = reference_forward(plain.view(), 3, 0.0, x.cast<double>(), grove::adjugate_mode::none);
    CHECK((result.y.cast<double>() - ref.y).cwiseAbs().maxCoeff() < 1e-5);
    CHECK(ref.y.cwiseAbs().maxCoeff() > 0.01);

    // After one gradient step the adjugates start to matter: their down gradient is nonzero.
    const auto dy = random_matrix<float>(64, 16, 93);
    const auto g = grove::gradients<float>(params.view(), *result.routing, x, dy);
    CHECK(g.weights.view().adjugate(0).down.cwiseAbs().maxCoeff() > 0.0f);
    // … while gate and up get exactly zero (dh = Dᵀ do with D = 0) until the down projections move.
    for (grove::index j = 0; j < 4; ++j) {
      CHECK(g.weights.view().adjugate(j).gate.cwiseAbs().maxCoeff() == 0.0f);
      CHECK(g.weights.view().adjugate(j).up.cwiseAbs().maxCoeff() == 0.0f);
    }
  }

  // ------------------------------------------------------------------------------------------
  // AdamW, RMSNorm
  // ------------------------------------------------------------------------------------------

  TEST_CASE("AdamW: one step by hand, a second against the bias-corrected formula") {
    grove::adamw_options o;
    o.learning_rate = 0.1;
    o.weight_decay = 0.1;
    grove::adamw<double> opt(o);
    std::vector<double> theta{1.0, -2.0, 0.0};
    const std::vector<double> g1{0.5, 0.0, -3.0};
    opt.step(theta, g1);
    // Step 1: m̂ = g, v̂ = g², so θ ← θ (1 − lr·wd) − lr · g / (|g| + ε).
    CHECK(theta[0] == doctest::Approx(0.99 - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-15));
    CHECK(theta[0] == doctest::Approx(0.890000002).epsilon(1e-12));
    CHECK(theta[1] == doctest::Approx(-1.98).epsilon(1e-15));  // zero gradient: decay only
    CHECK(theta[2] == doctest::Approx(0.1 * 3.0 / (3.0 + 1e-8)).epsilon(1e-15));

    const std::vector<double> g2{-1.0, 2.0, 1.0};
    std::vector<double> expect(3);
    for (std::size_t i = 0; i < 3; ++i) {
      const double m = 0.9 * 0.1 * g1[i] + 0.1 * g2[i];
      const double v = 0.999 * 0.001 * g1[i] * g1[i] + 0.001 * g2[i] * g2[i];
      const double mhat = m / (1 - 0.81), vhat = v / (1 - 0.999 * 0.999);
      expect[i] = theta[i] * 0.99 - 0.1 * mhat / (std::sqrt(vhat) + 1e-8);
    }
    opt.step(theta, g2);
    CHECK(opt.steps() == 2);
    for (std::size_t i = 0; i < 3; ++i) CHECK(theta[i] == doctest::Approx(expect[i]).epsilon(1e-13));

    std::vector<double> wrong(4);
    CHECK_THROWS_AS(opt.step(wrong, std::vector<double>(4)), grove::error);
  }

  TEST_CASE("AdamW over layer_parameters updates every weight and leaves the bias alone") {
    const layer_dims dims{4, 4, 2, 3, 2};
    auto p = layer_parameters<float>::random(dims, 101, 0.3);
    p.bias()[1] = 0.5f;
    layer_parameters<float> g(dims);
    for (float& v : g.values()) v = 1.0f;
    const auto before = std::vector<float>(p.values().begin(), p.values().end());
    grove::adamw<float> opt({0.01, 0.9, 0.999, 1e-8, 0.0});
    opt.step(p, g);
    for (std::size_t i = 0; i < before.size(); ++i)
      CHECK(p.values()[i] == doctest::Approx(before[i] - 0.01f).epsilon(1e-5));
    CHECK(p.bias()[1] == 0.5f);
  }

  TEST_CASE("RMSNorm backward matches finite differences") {
    const grove::index T = 5, H = 7;
    auto x = random_matrix<double>(T, H, 111);
    std::vector<double> gain(H);
    for (grove::index i = 0; i < H; ++i) gain[std::size_t(i)] = 0.5 + 0.1 * double(i);
    const auto R = random_matrix<double>(T, H, 112);
    const double eps = 1e-6;
    row_matrix<double> y(T, H);
    grove::rms_norm<double>(x, gain, eps, y);
    // Row 0 by hand.
    const double r0 = 1.0 / std::sqrt(x.row(0).squaredNorm() / H + eps);
    CHECK(y(0, 3) == doctest::Approx(x(0, 3) * r0 * gain[3]));

    row_matrix<double> dx = row_matrix<double>::Zero(T, H);
    std::vector<double> dgain(H, 0.0);
    grove::rms_norm_backward<double>(x, gain, eps, R, dx, dgain);
    auto loss = [&]() {
      grove::rms_norm<double>(x, gain, eps, y);
      return inner(R, y);
    };
    const double h = 1e-6;
    for (grove::index i = 0; i < x.size(); ++i) {
      const double keep = x.data()[i];
      x.data()[i] = keep + h;
      const double lp = loss();
      x.data()[i] = keep - h;
      const double lm = loss();
      x.data()[i] = keep;
      CHECK((lp - lm) / (2 * h) == doctest::Approx(dx.data()[i]).epsilon(1e-6));
    }
    for (grove::index i = 0; i < H; ++i) {
      double& gi = gain[std::size_t(i)];
      const double keep = gi;
      gi = keep + h;
      const double lp = loss();
      gi = keep - h;
      const double lm = loss();
      gi = keep;
      CHECK((lp - lm) / (2 * h) == doctest::Approx(dgain[std::size_t(i)]).epsilon(1e-6));
    }
  }

}  // TEST_SUITE
