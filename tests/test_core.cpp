// Core layer tests: configuration checks, routing, the forward pass against a plain scalar
// reference written here independently of the library, invariants and every error path.
#include <doctest/doctest.h>

#include <grove/grove.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

namespace {

using Index = grove::index;
using grove::layer_dims;

// ---------------------------------------------------------------------------------------------
// The reference: one token at a time, double precision, straight from docs/math.md. It reads
// the parameters from the flat buffer with its own offset arithmetic (router, experts, adjugates
// in checkpoint order), so it also checks the library's layout.
// ---------------------------------------------------------------------------------------------
struct reference_output {
  std::vector<double> y;                    // [T*H]
  std::vector<double> logits;               // [T*E]
  std::vector<std::vector<int>> ids;        // [T][k]
  std::vector<std::vector<double>> weights; // [T][k]
  std::vector<int> distinct_groups;         // [T]
};

template <class Scalar>
struct reference_layer {
  layer_dims d;
  const Scalar* values;  // flat trainable buffer
  const Scalar* bias;    // [E] or nullptr
  Index k;
  double lambda;
  bool with_adjugates = true;

  [[nodiscard]] double w(Index offset) const { return static_cast<double>(values[offset]); }

  // One SwiGLU MLP whose gate/up/down start at `base`, intermediate size `inter`.
  void mlp(Index base, Index inter, const std::vector<double>& x, double scale, std::vector<double>& y) const {
    const Index H = d.hidden;
    const Index gate = base, up = base + inter * H, down = base + 2 * inter * H;
    std::vector<double> h(static_cast<std::size_t>(inter));
    for (Index i = 0; i < inter; ++i) {
      double g = 0, u = 0;
      for (Index c = 0; c < H; ++c) {
        g += w(gate + i * H + c) * x[c];
        u += w(up + i * H + c) * x[c];
      }
      h[i] = g / (1.0 + std::exp(-g)) * u;
    }
    for (Index r = 0; r < H; ++r) {
      double o = 0;
      for (Index i = 0; i < inter; ++i) o += w(down + r * inter + i) * h[i];
      y[r] += scale * o;
    }
  }

  reference_output run(const std::vector<Scalar>& xs, Index T) const {
    const Index H = d.hidden, E = d.experts, I = d.expert_intermediate, Ia = d.adjugate_intermediate;
    const Index group_size = E / d.groups;
    const Index expert_base = E * H, adjugate_base = expert_base + E * 3 * I * H;
    const bool use_bias = bias && std::any_of(bias, bias + E, [](Scalar b) { return b != 0; });
    reference_output out;
    out.y.assign(static_cast<std::size_t>(T * H), 0.0);
    for (Index t = 0; t < T; ++t) {
      std::vector<double> x(xs.begin() + t * H, xs.begin() + (t + 1) * H);
      std::vector<double> logits(E), score(E);
      for (Index e = 0; e < E; ++e) {
        double l = 0;
        for (Index c = 0; c < H; ++c) l += w(e * H + c) * x[c];
        logits[e] = l;
        score[e] = use_bias ? 1.0 / (1.0 + std::exp(-l)) + double(bias[e]) : l;
        out.logits.push_back(l);
      }
      std::vector<int> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
      std::vector<int> ids(order.begin(), order.begin() + k);
      double top = -std::numeric_limits<double>::infinity(), sum = 0;
      for (int e : ids) top = std::max(top, logits[e]);
      std::vector<double> wts;
      for (int e : ids) sum += std::exp(logits[e] - top);
      for (int e : ids) wts.push_back(std::exp(logits[e] - top) / sum);

      std::vector<double> y(H, 0.0), c(d.groups, 0.0);
      for (Index s = 0; s < k; ++s) {
        mlp(expert_base + ids[s] * 3 * I * H, I, x, wts[s], y);
        c[ids[s] / group_size] += wts[s];
      }
      int distinct = 0;
      for (Index j = 0; j < d.groups; ++j)
        if (c[j] > 0) {
          ++distinct;
          if (with_adjugates) mlp(adjugate_base + j * 3 * Ia * H, Ia, x, lambda * c[j], y);
        }
      std::copy(y.begin(), y.end(), out.y.begin() + t * H);
      out.ids.push_back(ids);
      out.weights.push_back(wts);
      out.distinct_groups.push_back(distinct);
    }
    return out;
  }
};

template <class Scalar>
std::vector<Scalar> random_tokens(Index T, Index H, std::uint64_t seed, double stddev = 1.0) {
  grove::detail::normal_generator gen(seed);
  std::vector<Scalar> x(static_cast<std::size_t>(T * H));
  for (auto& v : x) v = static_cast<Scalar>(stddev * gen.normal());
  return x;
}

template <class Scalar>
grove::matrix_map<const Scalar> as_rows(const std::vector<Scalar>& x, Index T, Index H) {
  return grove::matrix_map<const Scalar>(x.data(), T, H);
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double a : v) m = std::max(m, std::abs(a));
  return m;
}

struct shape_case {
  const char* name;
  layer_dims dims;
  Index k;
  double lambda;
  bool bias;
};

// Compares the library's forward (routing included) with the reference on one case.
template <class Scalar>
void check_against_reference(const shape_case& c, Index T, double tolerance) {
  CAPTURE(c.name);
  auto params = grove::layer_parameters<Scalar>::random(c.dims, 1234 + c.dims.experts, 0.3);
  if (c.bias) {
    grove::detail::normal_generator gen(99);
    for (auto& b : params.bias()) b = static_cast<Scalar>(0.2 * gen.normal());
  }
  const std::vector<Scalar> x = random_tokens<Scalar>(T, c.dims.hidden, 42 + T);
  const reference_layer<Scalar> ref{c.dims, params.values().data(), params.bias().data(), c.k, c.lambda};
  const reference_output want = ref.run(x, T);

  grove::layer layer(grove::dynamic_config<Scalar, grove::unchecked_scale_bound>(c.dims, c.k, c.lambda), params);
  const auto got = layer.forward(as_rows(x, T, c.dims.hidden), {.routing = true, .statistics = true});

  const double scale = std::max(1.0, max_abs(want.y));
  for (Index t = 0; t < T; ++t) {
    CAPTURE(t);
    for (Index s = 0; s < c.k; ++s) {
      REQUIRE(got.routing->topk_ids(t, s) == want.ids[t][s]);
      CHECK(double(got.routing->topk_weights(t, s)) == doctest::Approx(want.weights[t][s]).epsilon(tolerance));
    }
    for (Index e = 0; e < c.dims.experts; ++e)
      CHECK(double(got.routing->logits(t, e)) ==
            doctest::Approx(want.logits[t * c.dims.experts + e]).epsilon(tolerance).scale(scale));
    for (Index h = 0; h < c.dims.hidden; ++h)
      CHECK(std::abs(double(got.y(t, h)) - want.y[t * c.dims.hidden + h]) <= tolerance * scale);
    CHECK(got.routing->groups_per_token[t] == want.distinct_groups[t]);
  }
}

const shape_case shape_cases[] = {
    {"general", {16, 8, 4, 12, 6}, 3, 0.05, false},
    {"group size 1 (E = G)", {12, 6, 6, 8, 4}, 2, 0.2, false},
    {"one group", {10, 6, 1, 7, 5}, 3, 0.1, false},
    {"k = 1", {9, 8, 2, 5, 3}, 1, 0.05, false},
    {"k = E", {11, 6, 3, 4, 3}, 6, 0.3, false},
    {"nonzero bias", {14, 12, 4, 6, 4}, 4, 0.05, true},
    {"odd sizes", {13, 10, 5, 9, 7}, 5, 0.5, true},
    {"lambda = 0", {8, 4, 2, 6, 3}, 2, 0.0, false},
    {"large lambda (opt-out)", {8, 4, 2, 6, 3}, 3, 2.0, false},
};

}  // namespace

// =============================================================================================
TEST_SUITE("config") {
  TEST_CASE("compile-time configuration exposes its fixed values") {
    using inst = grove::grove_moe_inst_config<>;
    static_assert(inst::experts_at_compile_time == 128);
    static_assert(inst::groups_at_compile_time == 64);
    static_assert(inst::top_k_at_compile_time == 8);
    static_assert(inst::has_fixed_scale);
    const inst config(grove::grove_moe_inst_dims);
    CHECK(config.top_k() == 8);
    CHECK(config.scale() == doctest::Approx(0.05));
    CHECK(config.group_size() == 2);
    CHECK(config.hidden() == 2048);
  }

  TEST_CASE("layer_dims validation names the bad size") {
    CHECK_THROWS_WITH_AS(layer_dims({16, 8, 3, 4, 2}).validate(),
                         doctest::Contains("G = 3 does not divide expert count E = 8"), grove::error);
    CHECK_THROWS_WITH_AS(layer_dims({0, 8, 2, 4, 2}).validate(), doctest::Contains("hidden size H"), grove::error);
    CHECK_THROWS_WITH_AS(layer_dims({4, 8, 2, 4, 0}).validate(), doctest::Contains("adjugate intermediate size"),
                         grove::error);
    CHECK_NOTHROW(layer_dims({4, 8, 2, 4, 2}).validate());
  }

  TEST_CASE("runtime checks of a dynamic configuration") {
    const layer_dims d{16, 8, 4, 12, 6};
    CHECK_THROWS_WITH_AS(grove::dynamic_config<>(d, 9, 0.05), doctest::Contains("exceeds the expert count E = 8"),
                         grove::error);
    CHECK_THROWS_WITH_AS(grove::dynamic_config<>(d, 0, 0.05), doctest::Contains("at least 1"), grove::error);
    CHECK_THROWS_WITH_AS(grove::dynamic_config<>(d, 2, -0.1), doctest::Contains("must be finite and >= 0"),
                         grove::error);
    CHECK_THROWS_WITH_AS(grove::dynamic_config<>(d, 2, std::nan("")), doctest::Contains("finite"), grove::error);
    // The paper's bound: λ <= G / E = 0.5 here.
    CHECK_NOTHROW(grove::dynamic_config<>(d, 2, 0.5));
    CHECK_THROWS_WITH_AS(grove::dynamic_config<>(d, 2, 0.51), doctest::Contains("exceeds the paper's bound G / E"),
                         grove::error);
    CHECK_NOTHROW(grove::dynamic_config<float, grove::unchecked_scale_bound>(d, 2, 0.51));
    CHECK_THROWS_WITH_AS(grove::dynamic_config<>(layer_dims{16, 8, 3, 12, 6}, 2, 0.05),
                         doctest::Contains("does not divide"), grove::error);
  }

  TEST_CASE("fixed sizes must match the weights") {
    using cfg = grove::layer_config<8, 4, 2, grove::ratio<1, 10>>;
    CHECK_NOTHROW(cfg(layer_dims{16, 8, 4, 12, 6}));
    CHECK_THROWS_WITH_AS(cfg(layer_dims{16, 16, 4, 12, 6}), doctest::Contains("fixes E = 8 but the weights have E = 16"),
                         grove::error);
    CHECK_THROWS_WITH_AS(cfg(layer_dims{16, 8, 2, 12, 6}), doctest::Contains("fixes G = 4"), grove::error);
    CHECK_THROWS_WITH_AS(cfg(layer_dims{16, 8, 4, 12, 6}, 3, 0.1), doctest::Contains("fixes k = 2"), grove::error);
    CHECK_THROWS_WITH_AS(cfg(layer_dims{16, 8, 4, 12, 6}, 2, 0.2), doctest::Contains("fixes the scale"), grove::error);
  }
}

// =============================================================================================
TEST_SUITE("forward") {
  TEST_CASE("matches the scalar reference on many shapes (float)") {
    for (const auto& c : shape_cases)
      for (Index T : {1, 7, 33}) check_against_reference<float>(c, T, 2e-5);
  }

  TEST_CASE("matches the scalar reference on many shapes (double)") {
    for (const auto& c : shape_cases) check_against_reference<double>(c, 9, 1e-12);
  }

  TEST_CASE("an empty batch gives an empty output") {
    const layer_dims d{8, 4, 2, 6, 3};
    grove::layer layer(grove::dynamic_config<>(d, 2, 0.05), grove::layer_parameters<float>::random(d, 5, 0.3));
    grove::row_matrix<float> x(0, 8);
    const auto r = layer.forward(x, {.routing = true, .statistics = true});
    CHECK(r.y.rows() == 0);
    CHECK(r.routing->expert_rows.empty());
    CHECK(r.statistics->adjugate_evaluations == 0);
  }

  TEST_CASE("lambda = 0 is a plain MoE") {
    const layer_dims d{12, 8, 4, 10, 5};
    auto params = grove::layer_parameters<double>::random(d, 7, 0.3);
    const auto x = random_tokens<double>(6, d.hidden, 3);
    reference_layer<double> plain{d, params.values().data(), nullptr, 3, 0.0, /*with_adjugates=*/false};
    const auto want = plain.run(x, 6);
    grove::layer layer(grove::dynamic_config<double>(d, 3, 0.0), params);
    const auto y = layer.forward(as_rows(x, 6, d.hidden));
    for (Index t = 0; t < 6; ++t)
      for (Index h = 0; h < d.hidden; ++h) CHECK(y(t, h) == doctest::Approx(want.y[t * d.hidden + h]).epsilon(1e-12));
  }

  TEST_CASE("a fixed-size configuration computes what the dynamic one does") {
    const layer_dims d{16, 8, 4, 12, 6};
    auto params = grove::layer_parameters<float>::random(d, 11, 0.3);
    const auto x = random_tokens<float>(5, d.hidden, 8);
    grove::layer fixed(grove::layer_config<8, 4, 3, grove::ratio<1, 20>>(d), params);
    grove::layer dyn(grove::dynamic_config<>(d, 3, 0.05), params);
    const grove::row_matrix<float> a = fixed.forward(as_rows(x, 5, d.hidden));
    const grove::row_matrix<float> b = dyn.forward(as_rows(x, 5, d.hidden));
    CHECK(a == b);
  }

  TEST_CASE("routing with compile-time sizes gives the dynamic plan, bit for bit") {
    // Group sizes 2 (a shift) and 3 (a division); k fixed or not; a selection bias or none.
    auto same_plan = [](const grove::routing_plan<float>& a, const grove::routing_plan<float>& b) {
      CHECK(a.logits == b.logits);
      CHECK(a.topk_ids == b.topk_ids);
      CHECK(a.topk_weights == b.topk_weights);
      CHECK(a.token_groups == b.token_groups);
      CHECK(a.group_weights == b.group_weights);
      CHECK(a.groups_per_token == b.groups_per_token);
      CHECK(a.expert_offsets == b.expert_offsets);
      CHECK(a.adjugate_offsets == b.adjugate_offsets);
      REQUIRE(a.expert_rows.size() == b.expert_rows.size());
      REQUIRE(a.adjugate_rows.size() == b.adjugate_rows.size());
      for (std::size_t i = 0; i < a.expert_rows.size(); ++i) {
        CHECK(a.expert_rows[i].token == b.expert_rows[i].token);
        CHECK(a.expert_rows[i].slot == b.expert_rows[i].slot);
        CHECK(a.expert_rows[i].weight == b.expert_rows[i].weight);
      }
      for (std::size_t i = 0; i < a.adjugate_rows.size(); ++i) {
        CHECK(a.adjugate_rows[i].token == b.adjugate_rows[i].token);
        CHECK(a.adjugate_rows[i].weight == b.adjugate_rows[i].weight);
      }
    };
    const layer_dims by_two{16, 8, 4, 12, 6}, by_three{16, 12, 4, 12, 6};
    for (bool with_bias : {false, true}) {
      CAPTURE(with_bias);
      auto p2 = grove::layer_parameters<float>::random(by_two, 21, 0.3);
      auto p3 = grove::layer_parameters<float>::random(by_three, 22, 0.3);
      if (with_bias) {
        for (Index e = 0; e < 8; ++e) p2.bias()[static_cast<std::size_t>(e)] = 0.01f * static_cast<float>(e % 3);
        for (Index e = 0; e < 12; ++e) p3.bias()[static_cast<std::size_t>(e)] = -0.02f * static_cast<float>(e % 4);
      }
      const auto x = random_tokens<float>(37, 16, 23);
      const auto rows = as_rows(x, 37, 16);
      const grove::layer fixed2(grove::layer_config<8, 4, 3, grove::ratio<1, 20>>(by_two), p2);
      static_assert(decltype(fixed2)::sizes_at_compile_time::top_k == 3);
      static_assert(decltype(fixed2)::sizes_at_compile_time::group_size == 2);
      same_plan(fixed2.route(rows), grove::route(p2.view(), {3, 0.05}, rows));
      const grove::layer fixed3(grove::layer_config<12, 4, 5, grove::ratio<1, 20>>(by_three), p3);
      static_assert(decltype(fixed3)::sizes_at_compile_time::group_size == 3);
      same_plan(fixed3.route(rows), grove::route(p3.view(), {5, 0.05}, rows));
      // k fixed, the group size not (and the other way round), through route_into directly.
      grove::routing_plan<float> plan;
      grove::route_into<grove::routing_sizes<5>>(plan, p3.view(), {5, 0.05}, rows);
      same_plan(plan, grove::route(p3.view(), {5, 0.05}, rows));
      grove::route_into<grove::routing_sizes<grove::dynamic, 3>>(plan, p3.view(), {4, 0.05}, rows);
      same_plan(plan, grove::route(p3.view(), {4, 0.05}, rows));
    }
    // Sizes that disagree with the call are refused.
    const auto p = grove::layer_parameters<float>::random(by_two, 1, 0.3);
    const auto x = random_tokens<float>(2, 16, 2);
    grove::routing_plan<float> plan;
    const grove::routing_options k3{3, 0.05};
    auto fixed_k4 = [&] { grove::route_into<grove::routing_sizes<4>>(plan, p.view(), k3, as_rows(x, 2, 16)); };
    auto fixed_gs4 = [&] {
      grove::route_into<grove::routing_sizes<grove::dynamic, 4>>(plan, p.view(), k3, as_rows(x, 2, 16));
    };
    CHECK_THROWS_WITH_AS(fixed_k4(), "grove: routing_sizes fixes k = 4 but k = 3 was given", grove::error);
    CHECK_THROWS_WITH_AS(fixed_gs4(), "grove: routing_sizes fixes the group size E / G = 4 but the weights have 2",
                         grove::error);
  }

  TEST_CASE("a layer views caller-owned buffers without copying") {
    const layer_dims d{8, 4, 2, 6, 3};
    auto owned = grove::layer_parameters<float>::random(d, 21, 0.3);
    // The caller's own buffers: one per tensor, as another framework would hold them.
    std::vector<std::vector<float>> buffers;
    grove::weights_view<float> view(d);
    owned.view().for_each_tensor([&](const grove::tensor_info& info, const float* const& p) {
      if (info.role != grove::tensor_role::selection_bias) buffers.emplace_back(p, p + info.size());
    });
    std::size_t next = 0;
    view.for_each_tensor([&](const grove::tensor_info& info, const float*& p) {
      if (info.role != grove::tensor_role::selection_bias) p = buffers[next++].data();
    });
    grove::layer layer(grove::dynamic_config<>(d, 2, 0.05), view);
    CHECK(layer.weights().router().data() == buffers[0].data());
    CHECK(layer.weights().expert(3).down.data() == buffers[1 + 3 * 3 + 2].data());
    const auto x = random_tokens<float>(4, d.hidden, 1);
    grove::layer owning(grove::dynamic_config<>(d, 2, 0.05), owned);
    CHECK(layer.forward(as_rows(x, 4, 8)) == owning.forward(as_rows(x, 4, 8)));
    // The set_ functions bind the same way.
    grove::weights_view<float> manual(d);
    manual.set_router(buffers[0].data());
    CHECK_THROWS_WITH_AS(grove::layer(grove::dynamic_config<>(d, 2, 0.05), manual),
                         doctest::Contains("missing tensor 'experts.0.gate_proj.weight'"), grove::error);
    CHECK_THROWS_WITH_AS(manual.set_expert(4, nullptr, nullptr, nullptr), doctest::Contains("expert index 4 out of range"),
                         grove::error);
  }

  TEST_CASE("the forward is deterministic: same bits on every call") {
    const layer_dims d{16, 8, 4, 12, 6};
    grove::layer layer(grove::dynamic_config<>(d, 3, 0.05), grove::layer_parameters<float>::random(d, 2, 0.3));
    const auto x = random_tokens<float>(20, d.hidden, 4);
    const grove::row_matrix<float> a = layer.forward(as_rows(x, 20, 16));
    const grove::row_matrix<float> b = layer.forward(as_rows(x, 20, 16));
    CHECK(a == b);
  }
}

// =============================================================================================
TEST_SUITE("routing") {
  TEST_CASE("batch invariance: a token's logits and picks are the same bits in any batch, at any position") {
    // H = 67 and 130: a zero-padded last chunk on every SIMD width; E = 10 and 12: short expert
    // blocks (of 5 experts on AVX-512, of 8 for a lone token).
    // H = 1100, E = 70: a batch's chains run in steps of H (512, 512, then 76 with the padded
    // chunk) through memory while a lone token's run in one; two chunks of experts, one short.
    for (const layer_dims dims : {layer_dims{67, 10, 5, 8, 4}, layer_dims{130, 12, 4, 8, 4},
                                  layer_dims{1100, 70, 10, 8, 4}}) {
      CAPTURE(dims.hidden);
      const auto params = grove::layer_parameters<float>::random(dims, 71, 0.2);
      grove::detail::normal_generator gen(72);
      const Index T = 23;
      grove::row_matrix<float> x(T, dims.hidden);
      for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(gen.normal());
      const grove::routing_options options{3, 0.1};
      // One view of the router for the reference loop below (binding a view walks every tensor).
      const auto router = params.view().router();
      const auto whole = grove::route(params.view(), options, x);
      // Every token alone, and the batch reversed (positions change, neighbours change).
      grove::row_matrix<float> reversed = x.colwise().reverse();
      const auto backwards = grove::route(params.view(), options, reversed);
      for (Index t = 0; t < T; ++t) {
        CAPTURE(t);
        const auto alone = grove::route(params.view(), options, x.middleRows(t, 1));
        for (Index e = 0; e < dims.experts; ++e) {
          CHECK(std::bit_cast<std::uint32_t>(alone.logits(0, e)) == std::bit_cast<std::uint32_t>(whole.logits(t, e)));
          CHECK(std::bit_cast<std::uint32_t>(backwards.logits(T - 1 - t, e)) ==
                std::bit_cast<std::uint32_t>(whole.logits(t, e)));
        }
        // Every length of a batch's short last block of tokens (1 to 4 rows; blocks hold 5).
        for (const Index n : {Index{2}, Index{3}, Index{4}, Index{6}, Index{7}, Index{8}, Index{9}}) {
          if (t >= n) continue;
          const auto prefix = grove::route(params.view(), options, x.topRows(n));
          for (Index e = 0; e < dims.experts; ++e)
            CHECK(std::bit_cast<std::uint32_t>(prefix.logits(t, e)) == std::bit_cast<std::uint32_t>(whole.logits(t, e)));
        }
        for (Index s = 0; s < options.top_k; ++s) {
          CHECK(alone.topk_ids(0, s) == whole.topk_ids(t, s));
          CHECK(backwards.topk_ids(T - 1 - t, s) == whole.topk_ids(t, s));
        }
        // And they are the logits: a double dot product agrees to rounding.
        for (Index e = 0; e < dims.experts; ++e) {
          double dot = 0, size = 0;
          for (Index c = 0; c < dims.hidden; ++c) {
            dot += double(x(t, c)) * double(router(e, c));
            size += std::abs(double(x(t, c)) * double(router(e, c)));
          }
          CHECK(std::abs(double(whole.logits(t, e)) - dot) <= 1e-6 * size);
        }
      }
    }
  }

  TEST_CASE("ties go to the lower expert index") {
    // Experts 1, 3 and 5 share one router row, so their logits are bitwise equal.
    const layer_dims d{4, 6, 3, 3, 2};
    auto params = grove::layer_parameters<float>::random(d, 3, 0.3);
    auto router = params.span().router();
    router.row(0).setConstant(-5.0f);  // clearly last
    router.row(1).setConstant(1.0f);
    router.row(2).setConstant(2.0f);   // clearly first
    router.row(3) = router.row(1);
    router.row(4).setConstant(-1.0f);
    router.row(5) = router.row(1);
    grove::row_matrix<float> x = grove::row_matrix<float>::Constant(1, 4, 0.5f);
    grove::layer layer(grove::dynamic_config<>(d, 3, 0.05), params);
    const auto r = layer.forward(x, {.routing = true});
    CHECK(r.routing->topk_ids(0, 0) == 2);
    CHECK(r.routing->topk_ids(0, 1) == 1);
    CHECK(r.routing->topk_ids(0, 2) == 3);  // 5 ties with 1 and 3 but has the higher Index
    // Equal logits give equal weights.
    CHECK(r.routing->topk_weights(0, 1) == r.routing->topk_weights(0, 2));
  }

  TEST_CASE("without a bias, selection does not suffer from sigmoid saturation") {
    // Logits 20, 30, 25: sigmoid is exactly 1.0f for all three, but the order is clear.
    const layer_dims d{1, 3, 1, 2, 2};
    grove::layer_parameters<float> params(d);
    params.span().router()(0, 0) = 20;
    params.span().router()(1, 0) = 30;
    params.span().router()(2, 0) = 25;
    grove::layer layer(grove::dynamic_config<>(d, 2, 0.05), params);
    grove::row_matrix<float> x = grove::row_matrix<float>::Ones(1, 1);
    const auto r = layer.forward(x, {.routing = true});
    CHECK(r.routing->topk_ids(0, 0) == 1);
    CHECK(r.routing->topk_ids(0, 1) == 2);
  }

  TEST_CASE("the selection bias changes the picks but not the weights' formula") {
    const layer_dims d{1, 4, 2, 2, 2};
    grove::layer_parameters<double> params(d);
    auto router = params.span().router();
    router(0, 0) = 1.0;
    router(1, 0) = 0.5;
    router(2, 0) = 0.0;
    router(3, 0) = -0.5;
    params.bias()[3] = 0.9;  // sigmoid(-0.5) + 0.9 = 1.277 > sigmoid(1) = 0.731
    grove::layer layer(grove::dynamic_config<double>(d, 2, 0.05), params);
    grove::row_matrix<double> x = grove::row_matrix<double>::Ones(1, 1);
    const auto r = layer.forward(x, {.routing = true});
    CHECK(r.routing->topk_ids(0, 0) == 3);
    CHECK(r.routing->topk_ids(0, 1) == 0);
    // Weights are the softmax of the picked logits, bias or not.
    const double w3 = std::exp(-0.5) / (std::exp(-0.5) + std::exp(1.0));
    CHECK(r.routing->topk_weights(0, 0) == doctest::Approx(w3).epsilon(1e-14));
    CHECK(r.routing->topk_weights(0, 1) == doctest::Approx(1 - w3).epsilon(1e-14));
  }

  TEST_CASE("plan invariants hold on a larger batch") {
    const layer_dims d{16, 16, 4, 6, 3};  // group size 4
    const Index k = 6, T = 64;
    grove::layer layer(grove::dynamic_config<>(d, k, 0.05), grove::layer_parameters<float>::random(d, 8, 0.4));
    const auto x = random_tokens<float>(T, d.hidden, 17);
    const auto plan = layer.route(as_rows(x, T, d.hidden));
    const Index min_groups = (k + 3) / 4, max_groups = std::min<Index>(k, d.groups);
    Index total_groups = 0;
    for (Index t = 0; t < T; ++t) {
      CAPTURE(t);
      double sum = 0;
      std::set<int> picked, groups;
      for (Index s = 0; s < k; ++s) {
        sum += plan.topk_weights(t, s);
        picked.insert(plan.topk_ids(t, s));
        groups.insert(plan.topk_ids(t, s) / 4);
        if (s > 0) CHECK(plan.logits(t, plan.topk_ids(t, s - 1)) >= plan.logits(t, plan.topk_ids(t, s)));
      }
      CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
      CHECK(picked.size() == std::size_t(k));
      const Index n_g = plan.groups_per_token[t];
      CHECK(n_g == Index(groups.size()));
      CHECK(n_g >= min_groups);
      CHECK(n_g <= max_groups);
      // c_j of each distinct group is the sum of its picks' weights; together they sum to 1.
      double c_sum = 0;
      for (Index g = 0; g < n_g; ++g) c_sum += plan.group_weights(t, g);
      CHECK(c_sum == doctest::Approx(1.0).epsilon(1e-6));
      total_groups += n_g;
    }
    // Dispatch: every pick appears once under its expert, every (token, group) once under its adjugate.
    CHECK(Index(plan.expert_rows.size()) == T * k);
    CHECK(plan.adjugate_evaluations() == total_groups);
    std::set<std::pair<int, int>> adjugate_pairs;
    for (Index j = 0; j < d.groups; ++j) {
      int previous = -1;
      for (const auto& row : plan.rows_of_adjugate(j)) {
        CHECK(row.token > previous);  // ascending, hence no token twice
        previous = row.token;
        CHECK(plan.token_groups(row.token, row.slot) == j);
        CHECK(double(row.weight) == doctest::Approx(0.05 * plan.group_weights(row.token, row.slot)));
        adjugate_pairs.insert({row.token, int(j)});
      }
    }
    CHECK(Index(adjugate_pairs.size()) == total_groups);
    for (Index e = 0; e < d.experts; ++e)
      for (const auto& row : plan.rows_of_expert(e)) {
        CHECK(plan.topk_ids(row.token, row.slot) == e);
        CHECK(row.weight == plan.topk_weights(row.token, row.slot));
      }
  }

  TEST_CASE("activation statistics of a hand-made batch") {
    // E = 4 in G = 2 groups of 2, k = 2. Router rows make token 0 pick experts {0, 1} (one group)
    // and token 1 pick {0, 2} (two groups).
    const layer_dims d{2, 4, 2, 3, 2};
    grove::layer_parameters<float> params(d);
    auto router = params.span().router();
    router << 2, 0,  //
        1, -3,       //
        0, 1,        //
        -4, -4;
    grove::row_matrix<float> x(2, 2);
    x << 1, 0,  // logits 2, 1, 0, -4  -> picks 0, 1
        0.5, 1;  // logits 1, -2.5, 1, -6 -> picks 0, 2 (tie at 1: lower Index first)
    grove::layer layer(grove::dynamic_config<>(d, 2, 0.05), params);
    const auto r = layer.forward(x, {.routing = true, .statistics = true});
    CHECK(r.routing->topk_ids(0, 0) == 0);
    CHECK(r.routing->topk_ids(0, 1) == 1);
    CHECK(r.routing->topk_ids(1, 0) == 0);
    CHECK(r.routing->topk_ids(1, 1) == 2);
    const auto& s = *r.statistics;
    CHECK(s.min_groups == 1);
    CHECK(s.max_groups == 2);
    CHECK(s.mean_groups == doctest::Approx(1.5));
    CHECK(s.adjugate_evaluations == 3);
    CHECK(s.once_per_pick_evaluations == 4);
    CHECK(s.adjugate_evaluations_saved() == 1);
    CHECK(s.adjugate_saved_fraction() == doctest::Approx(0.25));
    // E·H + k·3·H·I + n_g·3·H·Ia = 8 + 36 + n_g·12
    CHECK(s.min_activated_parameters == 56);
    CHECK(s.max_activated_parameters == 68);
    CHECK(s.mean_activated_parameters == doctest::Approx(62));
    CHECK(s.expert_load == std::vector<Index>{2, 1, 1, 0});
  }
}

// =============================================================================================
TEST_SUITE("errors") {
  TEST_CASE("input of the wrong width") {
    const layer_dims d{8, 4, 2, 6, 3};
    grove::layer layer(grove::dynamic_config<>(d, 2, 0.05), grove::layer_parameters<float>::random(d, 1, 0.3));
    grove::row_matrix<float> x = grove::row_matrix<float>::Zero(3, 7);
    CHECK_THROWS_WITH_AS((void)layer.forward(x), doctest::Contains("input x has 7 columns but the layer's hidden size H is 8"),
                         grove::error);
  }

  TEST_CASE("weights and configuration of different shapes") {
    const layer_dims d{8, 4, 2, 6, 3};
    CHECK_THROWS_WITH_AS(grove::layer(grove::dynamic_config<>(layer_dims{8, 4, 2, 6, 4}, 2, 0.05),
                                      grove::layer_parameters<float>(d)),
                         doctest::Contains("(H, E, G, I, Ia) = (8, 4, 2, 6, 3)"), grove::error);
  }

  TEST_CASE("a plan from another layer or of another size is refused") {
    const layer_dims d{8, 4, 2, 6, 3};
    grove::layer a(grove::dynamic_config<>(d, 2, 0.05), grove::layer_parameters<float>::random(d, 1, 0.3));
    grove::layer b(grove::dynamic_config<>(d, 3, 0.05), grove::layer_parameters<float>::random(d, 1, 0.3));
    grove::row_matrix<float> x = grove::row_matrix<float>::Random(3, 8);
    grove::row_matrix<float> y(3, 8);
    const auto plan = a.route(x);
    CHECK_THROWS_WITH_AS(b.forward(plan, x, y), doctest::Contains("another top-k or scale"), grove::error);
    grove::row_matrix<float> short_y(2, 8);
    CHECK_THROWS_WITH_AS(a.forward(plan, x, short_y), doctest::Contains("output y is [2, 8] but the plan and layer expect [3, 8]"),
                         grove::error);
    grove::row_matrix<float> other_x = grove::row_matrix<float>::Random(4, 8);
    CHECK_THROWS_WITH_AS(a.forward(plan, other_x, y), doctest::Contains("input x is [4, 8]"), grove::error);
  }

  TEST_CASE("NaN in the weights is found by check_finite and by routing") {
    const layer_dims d{8, 4, 2, 6, 3};
    auto params = grove::layer_parameters<float>::random(d, 1, 0.3);
    CHECK_NOTHROW(grove::check_finite(params.view()));
    params.span().adjugate(1).up(2, 5) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(grove::check_finite(params.view()),
                         doctest::Contains("'chunk_experts.1.up_proj.weight' holds a non-finite value (inf) at row 2, column 5"),
                         grove::error);
    params.span().adjugate(1).up(2, 5) = 0;
    params.span().router()(3, 0) = std::numeric_limits<float>::quiet_NaN();
    grove::layer layer(grove::dynamic_config<>(d, 2, 0.05), params);
    grove::row_matrix<float> x = grove::row_matrix<float>::Ones(2, 8);
    CHECK_THROWS_WITH_AS((void)layer.forward(x), doctest::Contains("router logit of token 0 for expert 3 is NaN"),
                         grove::error);
  }

  TEST_CASE("route() checks k against E") {
    const layer_dims d{8, 4, 2, 6, 3};
    auto params = grove::layer_parameters<float>::random(d, 1, 0.3);
    grove::row_matrix<float> x = grove::row_matrix<float>::Ones(2, 8);
    CHECK_THROWS_WITH_AS(grove::route(params.view(), grove::routing_options{5, 0.05}, x),
                         doctest::Contains("top-k k = 5 must lie in [1, E = 4]"), grove::error);
  }
}
