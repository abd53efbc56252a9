// Fast CPU expert pass (grove::cpu_runner: grove/runners/cpu_runner.hpp, grove/kernels/cpu/, grove/simd/): every instruction-set
// level and weight format against a plain scalar reference written here, bitwise determinism
// across thread counts, runs and tile shapes, the schedule, the workspace, the SIMD helpers.
// g++ 12 with -march=native (AVX-512) reports its own intrinsics' `__m512 __Y = __Y;` as
// uninitialised wherever Eigen's AVX-512 packet math is inlined (GCC bug 105593); the headers
// are system headers but the report lands on this file. Nothing here reads an uninitialised value.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <doctest/doctest.h>

#include "support/test_support.hpp"

#include <grove/grove.hpp>
#include <grove/weights/layer_parameters.hpp>
#include <grove/kernels/cpu/expert_backward.hpp>
#include <grove/runners/cpu_runner.hpp>
#include <grove/runners/default_runner.hpp>
#include <grove/kernels/cpu/expert_forward.hpp>
#include <grove/simd/batch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using grove_test::same_bits;

using Index = grove::index;
using grove::layer_dims;
using grove::row_matrix;
using grove::simd::isa;

// ---------------------------------------------------------------------------------------------
// Reference: token by token from the plan's per-token view (picks, weights, distinct groups),
// double precision, plain loops over the weight maps; only_group >= 0: just that group's terms
// (its partial p(t, g)). Optionally rounds x and h to bf16 the way
// the vdpbf16ps path does (round to nearest even), so that path can be checked tightly.
// ---------------------------------------------------------------------------------------------
double round_bf16(double v) {
  const auto bits = std::bit_cast<std::uint32_t>(static_cast<float>(v));
  const std::uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return static_cast<double>(std::bit_cast<float>(rounded));
}
double as_double(float v) { return v; }
double as_double(grove::bf16 v) { return static_cast<double>(static_cast<float>(v)); }

struct reference_result {
  std::vector<double> y;      // [T*H]
  std::vector<double> scale;  // [T*H]: Σ of |terms|, the natural size of rounding errors
};

template <class W>
reference_result reference_forward(const grove::weights_view<W>& w, const grove::routing_plan<float>& plan,
                                   const row_matrix<float>& x, bool round_activations, Index only_group = -1) {
  const layer_dims& d = w.dims();
  const Index H = d.hidden, T = x.rows();
  reference_result out{std::vector<double>(static_cast<std::size_t>(T * H), 0.0),
                       std::vector<double>(static_cast<std::size_t>(T * H), 0.0)};
  std::vector<double> in(static_cast<std::size_t>(H));
  auto add_mlp = [&](const grove::swiglu_weights<const W>& mlp, Index t, double weight) {
    const Index inter = mlp.gate.rows();
    std::vector<double> h(static_cast<std::size_t>(inter));
    for (Index i = 0; i < inter; ++i) {
      double g = 0, u = 0;
      for (Index c = 0; c < H; ++c) {
        g += as_double(mlp.gate(i, c)) * in[static_cast<std::size_t>(c)];
        u += as_double(mlp.up(i, c)) * in[static_cast<std::size_t>(c)];
      }
      const double v = g / (1.0 + std::exp(-g)) * u;
      h[static_cast<std::size_t>(i)] = round_activations ? round_bf16(v) : v;
    }
    for (Index c = 0; c < H; ++c) {
      double o = 0, a = 0;
      for (Index i = 0; i < inter; ++i) {
        o += as_double(mlp.down(c, i)) * h[static_cast<std::size_t>(i)];
        a += std::abs(as_double(mlp.down(c, i)) * h[static_cast<std::size_t>(i)]);
      }
      out.y[static_cast<std::size_t>(t * H + c)] += weight * o;
      out.scale[static_cast<std::size_t>(t * H + c)] += std::abs(weight) * a;
    }
  };
  for (Index t = 0; t < T; ++t) {
    for (Index c = 0; c < H; ++c) {
      const double v = x(t, c);
      in[static_cast<std::size_t>(c)] = round_activations ? round_bf16(v) : v;
    }
    for (Index s = 0; s < plan.top_k; ++s) {
      if (only_group >= 0 && plan.topk_ids(t, s) / d.group_size() != only_group) continue;
      add_mlp(w.expert(plan.topk_ids(t, s)), t, plan.topk_weights(t, s));
      if (plan.adjugates == grove::adjugate_mode::once_per_pick)
        add_mlp(w.adjugate(plan.topk_ids(t, s) / d.group_size()), t, plan.scale * plan.topk_weights(t, s));
    }
    if (plan.adjugates == grove::adjugate_mode::once_per_token)
      for (Index g = 0; g < plan.groups_per_token[static_cast<std::size_t>(t)]; ++g)
        if (only_group < 0 || plan.token_groups(t, g) == only_group)
          add_mlp(w.adjugate(plan.token_groups(t, g)), t, plan.scale * plan.group_weights(t, g));
  }
  return out;
}

/// Largest |y - ref| / (scale + floor), the floor keeping near-empty sums from dominating.
double relative_error(const row_matrix<float>& y, const reference_result& ref) {
  double worst = 0, floor = 0;
  for (double s : ref.scale) floor = std::max(floor, s);
  floor = 1e-3 * floor + 1e-30;
  for (Index t = 0; t < y.rows(); ++t)
    for (Index c = 0; c < y.cols(); ++c) {
      const auto at = static_cast<std::size_t>(t * y.cols() + c);
      worst = std::max(worst, std::abs(double(y(t, c)) - ref.y[at]) / (ref.scale[at] + floor));
    }
  return worst;
}


struct layer_case {
  const char* name;
  layer_dims dims;
  Index top_k;
  Index tokens;
};

// Shapes: odd sizes (not multiples of any SIMD width), group size 1, one group, k = 1, k = E,
// T = 0 and 1, items with more than one row tile (> 64 rows) and more than one column tile.
const layer_case cases[] = {
    {"general", {40, 8, 4, 24, 12}, 3, 37},
    {"group size 1", {33, 6, 6, 20, 9}, 2, 19},
    {"one group", {48, 5, 1, 16, 8}, 2, 23},
    {"k = 1", {35, 4, 2, 17, 5}, 1, 13},
    {"k = E", {31, 4, 2, 13, 7}, 4, 9},
    {"T = 1", {70, 8, 4, 40, 20}, 2, 1},
    {"T = 0", {24, 4, 2, 8, 4}, 2, 0},
    {"many rows per item", {64, 2, 1, 72, 66}, 2, 150},
    {"full vectors", {256, 8, 4, 96, 32}, 2, 40},
};

struct prepared {
  grove::layer_parameters<float> params;
  row_matrix<float> x;
  grove::routing_plan<float> plan;
};

prepared prepare(const layer_case& c, std::uint64_t seed) {
  prepared p{grove::layer_parameters<float>::random(c.dims, seed, 0.3), row_matrix<float>(c.tokens, c.dims.hidden), {}};
  grove::detail::normal_generator gen(seed + 99);
  for (Index i = 0; i < p.x.size(); ++i) p.x.data()[i] = static_cast<float>(gen.normal());
  // λ = G/E, the paper's largest, so that adjugates weigh as much as they can.
  const double lambda = double(c.dims.groups) / double(c.dims.experts);
  p.plan = grove::route(p.params.view(), {c.top_k, lambda}, p.x);
  return p;
}

std::vector<isa> levels() {
  std::vector<isa> out;
  for (int l = 0; l < grove::simd::isa_count; ++l)
    if (grove::simd::supported(static_cast<isa>(l))) out.push_back(static_cast<isa>(l));
  return out;
}

grove::cpu_runner make_engine(isa level, int threads, grove::schedule_shape shape = {}) {
  grove::cpu_runner_options options;
  options.threads = threads;
  options.isa = level;
  options.shape = shape;
  return grove::cpu_runner(options);
}

}  // namespace

TEST_CASE("fast_cpu: the machine's instruction-set levels") {
  // Not an assertion about this machine, a record in the test log of what was exercised.
  std::string found;
  for (isa l : levels()) found += std::string(grove::simd::isa_name(l)) + " ";
  MESSAGE("levels tested here: " << found);
  CHECK(grove::simd::supported(isa::scalar));
  CHECK(grove::simd::supported(grove::simd::best_isa()));
  // Each level implies the ones below it.
  for (int l = 1; l < grove::simd::isa_count; ++l)
    if (grove::simd::supported(static_cast<isa>(l))) CHECK(grove::simd::supported(static_cast<isa>(l - 1)));
}

TEST_CASE("fast_cpu: fp32 weights match the scalar reference on every shape and level") {
  std::uint64_t seed = 1;
  for (const layer_case& c : cases) {
    const prepared p = prepare(c, seed++);
    const reference_result ref = reference_forward(p.params.view(), p.plan, p.x, false);
    for (isa level : levels()) {
      CAPTURE(c.name);
      CAPTURE(grove::simd::isa_name(level));
      auto engine = make_engine(level, 2);
      row_matrix<float> y = row_matrix<float>::Constant(c.tokens, c.dims.hidden, 123.0f);  // must be overwritten
      engine.forward(p.params.view(), p.plan, p.x, y);
      CHECK(relative_error(y, ref) < 1e-5);
    }
  }
}

TEST_CASE("fast_cpu: bf16 weights match a reference that rounds the weights to bf16 first") {
  std::uint64_t seed = 100;
  for (const layer_case& c : cases) {
    const prepared p = prepare(c, seed++);
    const grove::layer_parameters<grove::bf16> w = grove::layer_parameters<grove::bf16>::from(p.params.view());
    // Route with the bf16 router (widened to fp32), as a BF16 checkpoint would.
    const auto plan = grove::route(w.routing_view(), {c.top_k, p.plan.scale}, p.x);
    const reference_result exact = reference_forward(w.view(), plan, p.x, false);
    const reference_result rounded = reference_forward(w.view(), plan, p.x, true);
    for (isa level : levels()) {
      CAPTURE(c.name);
      CAPTURE(grove::simd::isa_name(level));
      auto engine = make_engine(level, 2);
      row_matrix<float> y(c.tokens, c.dims.hidden);
      engine.forward(w.view(), plan, p.x, y);
      if (level == isa::avx512_bf16) {
        // vdpbf16ps: x and h are rounded to bf16 as in `rounded`; an h element whose fp32 and
        // double values round to neighbouring bf16 numbers may differ by one bf16 ulp (2^-8).
        CHECK(relative_error(y, rounded) < 4e-3);
        // And the rounding of activations is the only approximation: close to exact as well.
        CHECK(relative_error(y, exact) < 3e-2);
      } else {
        // Weights widened to fp32, activations fp32: as accurate as the fp32 path.
        CHECK(relative_error(y, exact) < 1e-5);
      }
    }
  }
}

TEST_CASE("fast_cpu: results are bitwise identical for 1 to 4 threads, repeated runs and tile shapes") {
  const layer_case c{"determinism", {72, 8, 4, 40, 24}, 3, 90};
  const prepared p = prepare(c, 7);
  const grove::layer_parameters<grove::bf16> w = grove::layer_parameters<grove::bf16>::from(p.params.view());
  const grove::schedule_shape odd_shape{3, 5, 7};
  for (isa level : levels()) {
    CAPTURE(grove::simd::isa_name(level));
    row_matrix<float> first(c.tokens, c.dims.hidden), first_bf16(c.tokens, c.dims.hidden);
    make_engine(level, 1).forward(p.params.view(), p.plan, p.x, first);
    make_engine(level, 1).forward(w.view(), p.plan, p.x, first_bf16);
    for (int threads = 1; threads <= 4; ++threads) {
      CAPTURE(threads);
      auto engine = make_engine(level, threads);
      for (int run = 0; run < 2; ++run) {
        row_matrix<float> y(c.tokens, c.dims.hidden), yb(c.tokens, c.dims.hidden);
        engine.forward(p.params.view(), p.plan, p.x, y);
        engine.forward(w.view(), p.plan, p.x, yb);
        CHECK(same_bits(y, first));
        CHECK(same_bits(yb, first_bf16));
      }
      // Tiles change which thread computes what and in which blocks, never the sums.
      auto odd = make_engine(level, threads, odd_shape);
      row_matrix<float> y(c.tokens, c.dims.hidden);
      odd.forward(p.params.view(), p.plan, p.x, y);
      CHECK(same_bits(y, first));
    }
  }
}

TEST_CASE("fast_cpu: the default runner is a default cpu_runner and agrees with forward_experts_simple") {
  const layer_case c{"integration", {48, 8, 4, 32, 16}, 2, 21};
  const prepared p = prepare(c, 11);
  row_matrix<float> fast(c.tokens, c.dims.hidden), simple(c.tokens, c.dims.hidden), engine_y(c.tokens, c.dims.hidden);
  grove::default_runner()->forward(p.params.view(), p.plan, p.x, fast);
  grove::cpu::forward_experts_simple(p.params.view(), p.plan, p.x, simple);
  grove::cpu_runner fresh;  // hardware_concurrency() threads, the best instruction set
  fresh.forward(p.params.view(), p.plan, p.x, engine_y);
  CHECK(same_bits(fast, engine_y));
  CHECK((fast - simple).cwiseAbs().maxCoeff() <= 1e-5 * (1.0 + simple.cwiseAbs().maxCoeff()));
  // The layer calls it.
  grove::layer layer(grove::dynamic_config<float>(c.dims, c.top_k, p.plan.scale), grove::layer_parameters<float>(p.params));
  const row_matrix<float> y = layer.forward(p.x);
  CHECK(same_bits(y, fast));
  // bf16 overload of the integration point.
  const grove::layer_parameters<grove::bf16> w = grove::layer_parameters<grove::bf16>::from(p.params.view());
  row_matrix<float> yb(c.tokens, c.dims.hidden), yb_engine(c.tokens, c.dims.hidden);
  grove::default_runner()->forward(w.view(), p.plan, p.x, yb);
  fresh.forward(w.view(), p.plan, p.x, yb_engine);
  CHECK(same_bits(yb, yb_engine));
  // double has no fused pass: the CPU runner runs the simple version.
  const auto pd = grove::layer_parameters<double>::random(c.dims, 3, 0.3);
  const row_matrix<double> xd = p.x.cast<double>();
  const auto plan_d = grove::route(pd.view(), {c.top_k, 0.5}, xd);
  row_matrix<double> yd1(c.tokens, c.dims.hidden), yd2(c.tokens, c.dims.hidden);
  grove::default_runner()->forward(pd.view(), plan_d, xd, yd1);
  grove::cpu::forward_experts_simple(pd.view(), plan_d, xd, yd2);
  CHECK(yd1 == yd2);
}

TEST_CASE("fast_cpu: x and y may be the same matrix") {
  const layer_case c{"in place", {40, 4, 2, 24, 8}, 2, 17};
  const prepared p = prepare(c, 12);
  row_matrix<float> expected(c.tokens, c.dims.hidden);
  auto engine = make_engine(grove::simd::best_isa(), 2);
  engine.forward(p.params.view(), p.plan, p.x, expected);
  row_matrix<float> xy = p.x;
  engine.forward(p.params.view(), p.plan, xy, xy);
  CHECK(same_bits(xy, expected));
}

TEST_CASE("fast_cpu: the schedule covers every row and column of every item exactly once") {
  const layer_case c{"schedule", {40, 8, 4, 70, 20}, 3, 100};
  const prepared p = prepare(c, 13);
  grove::detail::expert_schedule<float> schedule;
  const grove::schedule_shape shape{16, 32, 64};
  schedule.build(p.params.view(), p.plan, shape);
  const auto items = schedule.items();
  // Items: group by group, the group's routed experts by Index then its adjugate, only those
  // with rows; h keeps the plan's layout (expert rows, then adjugate rows).
  std::size_t at = 0;
  const Index expert_h = static_cast<Index>(p.plan.expert_rows.size()) * c.dims.expert_intermediate;
  const Index gs = c.dims.group_size();
  std::size_t group_at = 0;
  for (Index j = 0; j < c.dims.groups; ++j) {
    if (p.plan.rows_of_adjugate(j).empty()) continue;
    REQUIRE(group_at < schedule.groups().size());
    const auto& group = schedule.groups()[group_at++];
    CHECK(group.group == j);
    CHECK(group.item_begin == static_cast<std::int32_t>(at));
    CHECK(group.row_count == static_cast<Index>(p.plan.rows_of_adjugate(j).size()));
    CHECK(group.first_row == p.plan.adjugate_offsets[static_cast<std::size_t>(j)]);
    for (Index e = j * gs; e < (j + 1) * gs; ++e)
      if (p.plan.expert_load(e) > 0) {
        REQUIRE(at < items.size());
        CHECK(!items[at].adjugate);
        CHECK(items[at].id == e);
        CHECK(items[at].row_count == p.plan.expert_load(e));
        CHECK(items[at].inter == c.dims.expert_intermediate);
        CHECK(items[at].h_offset == p.plan.expert_offsets[static_cast<std::size_t>(e)] * c.dims.expert_intermediate);
        // Each row's group slot names its own token among the group's rows.
        for (Index r = 0; r < items[at].row_count; ++r)
          CHECK(group.rows[schedule.group_slots()[items[at].first_row + r]].token == items[at].rows[r].token);
        ++at;
      }
    REQUIRE(at < items.size());
    CHECK(items[at].adjugate);
    CHECK(items[at].id == j);
    CHECK(items[at].inter == c.dims.adjugate_intermediate);
    CHECK(items[at].h_offset == expert_h + group.first_row * c.dims.adjugate_intermediate);
    ++at;
    CHECK(group.item_end == static_cast<std::int32_t>(at));
  }
  CHECK(at == items.size());
  CHECK(group_at == schedule.groups().size());
  const Index h_offset =
      expert_h + static_cast<Index>(p.plan.adjugate_rows.size()) * c.dims.adjugate_intermediate;
  CHECK(schedule.h_elements() == h_offset);
  // Tiles partition each item's [rows, inter] exactly.
  std::vector<int> covered(static_cast<std::size_t>(h_offset), 0);
  // Adjugates once per token: every item is its own gate/up span.
  REQUIRE(schedule.gate_up_spans().size() == items.size());
  for (const auto& tile : schedule.gate_up_tiles()) {
    const auto& item = items[static_cast<std::size_t>(tile.item)];
    CHECK(tile.row_end - tile.row_begin <= shape.gate_up_rows);
    CHECK(tile.col_end - tile.col_begin <= shape.gate_up_cols);
    for (Index r = tile.row_begin; r < tile.row_end; ++r)
      for (Index col = tile.col_begin; col < tile.col_end; ++col)
        ++covered[static_cast<std::size_t>(item.h_offset + r * item.inter + col)];
  }
  CHECK(std::all_of(covered.begin(), covered.end(), [](int n) { return n == 1; }));
  CHECK(schedule.down_tiles() == (c.dims.hidden + 63) / 64);
}

TEST_CASE("fast_cpu: once per pick, a group's per-pick adjugate items share one gate/up span") {
  // The adjugate's gate and up weights then stream once per gate_up_rows rows of the whole group
  // (as often as for its experts together), not once per picked expert.
  const layer_case c{"per-pick spans", {40, 8, 4, 70, 20}, 3, 100};
  prepared p = prepare(c, 13);
  p.plan.adjugates = grove::adjugate_mode::once_per_pick;
  grove::detail::expert_schedule<float> schedule;
  const grove::schedule_shape shape{16, 32, 64};
  schedule.build(p.params.view(), p.plan, shape);
  const auto items = schedule.items();
  const auto spans = schedule.gate_up_spans();
  const Index gs = c.dims.group_size();
  Index experts_with_rows = 0, groups_with_rows = 0;
  for (Index e = 0; e < c.dims.experts; ++e) experts_with_rows += p.plan.expert_load(e) > 0;
  for (Index j = 0; j < c.dims.groups; ++j) groups_with_rows += !p.plan.rows_of_adjugate(j).empty();
  REQUIRE(groups_with_rows > 0);
  CHECK(static_cast<Index>(items.size()) == 2 * experts_with_rows);
  CHECK(static_cast<Index>(spans.size()) == experts_with_rows + groups_with_rows);
  for (const auto& group : schedule.groups()) {
    // The group's per-pick items, in item order, are its adjugate span's rows and h, back to back.
    const auto span = std::find_if(spans.begin(), spans.end(), [&](const auto& s) { return s.adjugate && s.id == group.group; });
    REQUIRE(span != spans.end());
    const Index begin = p.plan.expert_offsets[static_cast<std::size_t>(group.group * gs)];
    CHECK(span->row_count == p.plan.expert_offsets[static_cast<std::size_t>((group.group + 1) * gs)] - begin);
    Index row = 0;
    for (auto i = group.item_begin; i < group.item_end; ++i) {
      const auto& item = items[static_cast<std::size_t>(i)];
      if (!item.adjugate) continue;
      CHECK(item.gate == span->gate);
      CHECK(item.rows == span->rows + row);
      CHECK(item.h_offset == span->h_offset + row * c.dims.adjugate_intermediate);
      row += item.row_count;
    }
    CHECK(row == span->row_count);
  }
  // The tiles cover every row and column of h once, per-pick rows included.
  std::vector<int> covered(static_cast<std::size_t>(schedule.h_elements()), 0);
  for (const auto& tile : schedule.gate_up_tiles()) {
    const auto& span = spans[static_cast<std::size_t>(tile.item)];
    CHECK(tile.row_end - tile.row_begin <= shape.gate_up_rows);
    for (Index r = tile.row_begin; r < tile.row_end; ++r)
      for (Index col = tile.col_begin; col < tile.col_end; ++col)
        ++covered[static_cast<std::size_t>(span.h_offset + r * span.inter + col)];
  }
  // Once per pick, the group rows' block of h (the once_per_token adjugate rows) is not used.
  const Index expert_h = static_cast<Index>(p.plan.expert_rows.size()) * c.dims.expert_intermediate;
  const Index adjugate_h = static_cast<Index>(p.plan.adjugate_rows.size()) * c.dims.adjugate_intermediate;
  for (Index at = 0; at < schedule.h_elements(); ++at)
    CHECK(covered[static_cast<std::size_t>(at)] == (at >= expert_h && at < expert_h + adjugate_h ? 0 : 1));
}

TEST_CASE("fast_cpu: the workspace grows to the largest batch and is then reused") {
  const layer_case big{"big", {64, 8, 4, 32, 16}, 2, 60};
  const layer_case small{"small", {64, 8, 4, 32, 16}, 2, 20};
  const prepared pb = prepare(big, 21);
  prepared ps = prepare(small, 21);
  auto engine = make_engine(grove::simd::best_isa(), 2);
  row_matrix<float> yb(big.tokens, big.dims.hidden), ys(small.tokens, small.dims.hidden);
  engine.forward(pb.params.view(), pb.plan, pb.x, yb);
  const std::size_t allocations = engine.workspace_allocations();
  const std::size_t bytes = engine.workspace_bytes();
  CHECK(allocations > 0);
  // h alone: T·k·I + Σ n_g·Ia floats.
  CHECK(bytes >= sizeof(float) * static_cast<std::size_t>(big.tokens * big.top_k * big.dims.expert_intermediate));
  for (int run = 0; run < 3; ++run) {
    engine.forward(pb.params.view(), pb.plan, pb.x, yb);
    engine.forward(pb.params.view(), ps.plan, ps.x, ys);  // same weights, a smaller batch
  }
  CHECK(engine.workspace_allocations() == allocations);
  CHECK(engine.workspace_bytes() == bytes);
}

TEST_CASE("fast_cpu: errors name what is wrong") {
  const layer_case c{"errors", {40, 8, 4, 24, 12}, 2, 5};
  const prepared p = prepare(c, 31);
  auto engine = make_engine(isa::scalar, 1);
  row_matrix<float> wrong_y(c.tokens + 1, c.dims.hidden);
  CHECK_THROWS_WITH_AS(engine.forward(p.params.view(), p.plan, p.x, wrong_y),
                       doctest::Contains("output y is [6, 40]"), grove::error);
  row_matrix<float> wrong_x(c.tokens, c.dims.hidden - 1), y(c.tokens, c.dims.hidden);
  CHECK_THROWS_AS(engine.forward(p.params.view(), p.plan, wrong_x, y), grove::error);
  const auto other = grove::layer_parameters<float>::random({40, 4, 2, 24, 12}, 1, 0.1);
  CHECK_THROWS_WITH_AS(engine.forward(other.view(), p.plan, p.x, y), doctest::Contains("another layer"),
                       grove::error);
  for (int l = 0; l < grove::simd::isa_count; ++l)
    if (!grove::simd::supported(static_cast<isa>(l)))
      CHECK_THROWS_WITH_AS(engine.set_isa(static_cast<isa>(l)), doctest::Contains("does not support"), grove::error);
  CHECK_THROWS_AS(engine.set_shape({0, 32, 64}), grove::error);
  CHECK_THROWS_AS(engine.set_shape({16, 65, 64}), grove::error);
  CHECK_THROWS_WITH_AS(engine.set_shape({65, 32, 64}), doctest::Contains("gate_up_rows"), grove::error);
}

// ---------------------------------------------------------------------------------------------
// Backward (cpu_runner::backward) against a reference written here: token by token from the
// plan's per-token view, double precision, plain loops (docs/math.md, "Backward").
// ---------------------------------------------------------------------------------------------
namespace {

struct reference_gradients {
  grove::layer_parameters<double> weights;  // ∂L/∂W of the experts and adjugates (router untouched)
  std::vector<double> dx;                   // [T*H]
  std::vector<double> dw;                   // [T*k]
};

reference_gradients reference_backward(const grove::weights_view<float>& w, const grove::routing_plan<float>& plan,
                                       const row_matrix<float>& x, const row_matrix<float>& dy) {
  const layer_dims& d = w.dims();
  const Index H = d.hidden, T = x.rows(), K = plan.top_k;
  reference_gradients out{grove::layer_parameters<double>(d), std::vector<double>(static_cast<std::size_t>(T * H), 0.0),
                          std::vector<double>(static_cast<std::size_t>(T * K), 0.0)};
  const grove::weights_span<double> grads = out.weights.span();
  // One MLP on token t with routing weight `weight`; returns ⟨dy_t, MLP(x_t)⟩.
  auto run = [&](const grove::swiglu_weights<const float>& mlp, grove::swiglu_weights<double> g, Index t,
                 double weight) {
    const Index inter = mlp.gate.rows();
    std::vector<double> gate(static_cast<std::size_t>(inter)), up(gate.size()), r(gate.size());
    double dot = 0;
    for (Index i = 0; i < inter; ++i) {
      double a = 0, b = 0, c = 0;
      for (Index col = 0; col < H; ++col) {
        a += double(mlp.gate(i, col)) * x(t, col);
        b += double(mlp.up(i, col)) * x(t, col);
        c += double(mlp.down(col, i)) * dy(t, col);
      }
      gate[std::size_t(i)] = a;
      up[std::size_t(i)] = b;
      r[std::size_t(i)] = c;
    }
    for (Index i = 0; i < inter; ++i) {
      const double z = gate[std::size_t(i)], u = up[std::size_t(i)];
      const double sig = 1.0 / (1.0 + std::exp(-z)), s = z * sig, h = s * u;
      dot += r[std::size_t(i)] * h;
      const double dh = weight * r[std::size_t(i)];
      const double dg = dh * u * sig * (1.0 + z * (1.0 - sig)), du = dh * s;
      for (Index col = 0; col < H; ++col) {
        g.down(col, i) += weight * dy(t, col) * h;
        g.gate(i, col) += dg * x(t, col);
        g.up(i, col) += du * x(t, col);
        out.dx[std::size_t(t * H + col)] += dg * double(mlp.gate(i, col)) + du * double(mlp.up(i, col));
      }
    }
    return dot;
  };
  for (Index t = 0; t < T; ++t) {
    for (Index s = 0; s < K; ++s) {
      const Index e = plan.topk_ids(t, s);
      out.dw[std::size_t(t * K + s)] += run(w.expert(e), grads.expert(e), t, plan.topk_weights(t, s));
    }
    for (Index at = 0; at < plan.groups_per_token[std::size_t(t)]; ++at) {
      const Index j = plan.token_groups(t, at);
      const double dot = run(w.adjugate(j), grads.adjugate(j), t, plan.scale * plan.group_weights(t, at));
      for (Index s = 0; s < K; ++s)
        if (plan.topk_ids(t, s) / plan.group_size == j) out.dw[std::size_t(t * K + s)] += plan.scale * dot;
    }
  }
  return out;
}

struct backward_result {
  grove::layer_parameters<float> grads;
  row_matrix<float> dx, dw;
};

/// engine.backward into buffers that start from `start_grads` and `start_dx` (backward adds).
backward_result run_backward(grove::cpu_runner& engine, const prepared& p, const row_matrix<float>& dy,
                             const grove::saved_activations<float>* saved, const grove::layer_parameters<float>& start_grads,
                             const row_matrix<float>& start_dx) {
  backward_result r{start_grads, start_dx, {}};
  engine.backward(p.params.view(), p.plan, p.x, dy, saved, r.grads.span(), r.dx, r.dw);
  return r;
}

/// Largest |a - b| of each tensor (after subtracting `start` from a) over the tensor's largest
/// |b|, with its name.
template <class S>
std::pair<double, std::string> worst_tensor(const grove::layer_parameters<S>& a,
                                            const grove::layer_parameters<S>& start,
                                            const grove::layer_parameters<double>& b) {
  std::pair<double, std::string> worst{0.0, ""};
  std::size_t at = 0;
  b.view().for_each_tensor([&](const grove::tensor_info& info, const double* const&) {
    if (info.role == grove::tensor_role::selection_bias) return;
    double scale = 1e-30, diff = 0;
    for (Index i = 0; i < info.size(); ++i, ++at) {
      scale = std::max(scale, std::abs(b.values()[at]));
      diff = std::max(diff, std::abs(double(a.values()[at]) - double(start.values()[at]) - b.values()[at]));
    }
    if (diff / scale > worst.first) worst = {diff / scale, info.name};
  });
  return worst;
}

template <class S>
double worst_relative(const row_matrix<S>& a, const row_matrix<std::type_identity_t<S>>* start,
                      const std::vector<double>& b) {
  double scale = 1e-30, diff = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    scale = std::max(scale, std::abs(b[i]));
    diff = std::max(diff, std::abs(double(a.data()[i]) - (start ? double(start->data()[i]) : 0.0) - b[i]));
  }
  return diff / scale;
}

/// The same values in double (exact), to compare two float results with worst_tensor.
grove::layer_parameters<double> widened(const grove::layer_parameters<float>& p) {
  grove::layer_parameters<double> out(p.view().dims());
  for (std::size_t i = 0; i < p.values().size(); ++i) out.values()[i] = p.values()[i];
  return out;
}
std::vector<double> widened(const row_matrix<float>& m) { return {m.data(), m.data() + m.size()}; }

}  // namespace

TEST_CASE("fast_cpu: backward matches the reference on every shape and level, and adds to its buffers") {
  // The reference runs each picked group's adjugate once per token. Evaluating it once per pick
  // instead (weight λ·w_s for each pick) is the same function in exact arithmetic, so once per
  // pick must meet the same reference: its per-pick gradients, dx terms and dots add up to it.
  std::uint64_t seed = 200;
  for (const layer_case& c : cases) {
    prepared p = prepare(c, seed++);
    row_matrix<float> dy(c.tokens, c.dims.hidden);
    grove::detail::normal_generator gen(seed + 1000);
    for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = static_cast<float>(gen.normal());
    const reference_gradients ref = reference_backward(p.params.view(), p.plan, p.x, dy);
    // Gradients and dx start non-zero: backward adds to them.
    const auto start_grads = grove::layer_parameters<float>::random(c.dims, seed + 2000, 0.5);
    row_matrix<float> start_dx(c.tokens, c.dims.hidden);
    for (Index i = 0; i < start_dx.size(); ++i) start_dx.data()[i] = static_cast<float>(gen.normal());
    for (const auto mode : {grove::adjugate_mode::once_per_token, grove::adjugate_mode::once_per_pick}) {
      p.plan.adjugates = mode;
      for (isa level : levels()) {
        CAPTURE(c.name);
        CAPTURE(static_cast<int>(mode));
        CAPTURE(grove::simd::isa_name(level));
        auto engine = make_engine(level, 2);
        const backward_result r = run_backward(engine, p, dy, nullptr, start_grads, start_dx);
        const std::pair<double, std::string> tensor = worst_tensor(r.grads, start_grads, ref.weights);
        const double worst = tensor.first;
        const std::string name = tensor.second;
        CAPTURE(name);
        CHECK(worst < 2e-5);
        CHECK(worst_relative(r.dx, &start_dx, ref.dx) < 2e-5);
        CHECK(worst_relative(r.dw, nullptr, ref.dw) < 2e-5);
        // The router and the bias are not touched here.
        CHECK(std::memcmp(r.grads.view().router().data(), start_grads.view().router().data(),
                          sizeof(float) * static_cast<std::size_t>(c.dims.experts * c.dims.hidden)) == 0);
      }
    }
  }
}

TEST_CASE("fast_cpu: backward is bitwise identical for 1 to 4 threads, repeated runs, saved or recomputed g and u") {
  const layer_case c{"determinism", {72, 8, 4, 40, 24}, 3, 90};
  prepared p = prepare(c, 8);
  row_matrix<float> dy(c.tokens, c.dims.hidden);
  grove::detail::normal_generator gen(81);
  for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = static_cast<float>(gen.normal());
  const grove::layer_parameters<float> zero(c.dims);
  const row_matrix<float> zero_dx = row_matrix<float>::Zero(c.tokens, c.dims.hidden);
  // Once per pick, several items (one per picked expert of a group) add into one adjugate's
  // gradient: one tile runs them in item order, whatever the thread count.
  for (const auto mode : {grove::adjugate_mode::once_per_token, grove::adjugate_mode::once_per_pick}) {
    p.plan.adjugates = mode;
    for (isa level : levels()) {
      CAPTURE(static_cast<int>(mode));
      CAPTURE(grove::simd::isa_name(level));
      auto one = make_engine(level, 1);
      const backward_result first = run_backward(one, p, dy, nullptr, zero, zero_dx);
      // The saving forward gives the forward's y, and backward from what it saved the same bits.
      grove::saved_activations<float> saved;
      row_matrix<float> y_saving(c.tokens, c.dims.hidden), y(c.tokens, c.dims.hidden);
      one.forward_saving(p.params.view(), p.plan, p.x, y_saving, saved);
      one.forward(p.params.view(), p.plan, p.x, y);
      CHECK(same_bits(y_saving, y));
      // g and u of every row of h: expert rows, group rows and, once per pick, one row per pick.
      const Index pick_rows = mode == grove::adjugate_mode::once_per_pick ? c.tokens * c.top_k : 0;
      CHECK(saved.bytes() == 2 * sizeof(float) *
                                 static_cast<std::size_t>(c.tokens * c.top_k * c.dims.expert_intermediate +
                                                          (p.plan.adjugate_evaluations() + pick_rows) *
                                                              c.dims.adjugate_intermediate));
      for (int threads = 1; threads <= 4; ++threads) {
        CAPTURE(threads);
        auto engine = make_engine(level, threads);
        for (int run = 0; run < 2; ++run) {
          const backward_result r = run_backward(engine, p, dy, run == 0 ? nullptr : &saved, zero, zero_dx);
          CHECK(same_bits(r.grads.values(), first.grads.values()));
          CHECK(same_bits(r.dx, first.dx));
          CHECK(same_bits(r.dw, first.dw));
        }
      }
    }
  }
}

TEST_CASE("fast_cpu: the default runner's backward is the fused one and agrees with backward_experts_simple") {
  const layer_case c{"integration", {48, 8, 4, 32, 16}, 2, 21};
  const prepared p = prepare(c, 14);
  row_matrix<float> dy(c.tokens, c.dims.hidden);
  grove::detail::normal_generator gen(141);
  for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = static_cast<float>(gen.normal());
  grove::layer_parameters<float> fast(c.dims), simple(c.dims), engine_grads(c.dims);
  row_matrix<float> dx_fast = row_matrix<float>::Zero(c.tokens, c.dims.hidden), dx_simple = dx_fast,
                    dx_engine = dx_fast, dw_fast, dw_simple, dw_engine;
  grove::default_runner()->backward<float>(p.params.view(), p.plan, p.x, dy, nullptr, fast.span(), dx_fast, dw_fast);
  grove::cpu::backward_experts_simple<float>(p.params.view(), p.plan, p.x, dy, nullptr, simple.span(), dx_simple,
                                             dw_simple);
  grove::cpu_runner fresh;
  fresh.backward(p.params.view(), p.plan, p.x, dy, nullptr, engine_grads.span(), dx_engine, dw_engine);
  CHECK(same_bits(fast.values(), engine_grads.values()));
  CHECK(same_bits(dx_fast, dx_engine));
  CHECK(same_bits(dw_fast, dw_engine));
  double scale = 0, diff = 0;
  for (std::size_t i = 0; i < fast.values().size(); ++i) {
    scale = std::max(scale, double(std::abs(simple.values()[i])));
    diff = std::max(diff, double(std::abs(fast.values()[i] - simple.values()[i])));
  }
  CHECK(diff <= 1e-5 * scale);
  CHECK((dx_fast - dx_simple).cwiseAbs().maxCoeff() <= 1e-5f * dx_simple.cwiseAbs().maxCoeff());
  CHECK((dw_fast - dw_simple).cwiseAbs().maxCoeff() <= 1e-5f * dw_simple.cwiseAbs().maxCoeff());
  // Both backwards make the same input checks: the plain one refuses a dx that is x too.
  row_matrix<float> x_and_dx = p.x;
  CHECK_THROWS_WITH_AS(grove::cpu::backward_experts_simple<float>(p.params.view(), p.plan, x_and_dx, dy, nullptr,
                                                                  simple.span(), x_and_dx, dw_simple),
                       doctest::Contains("shares memory"), grove::error);
}

TEST_CASE("fast_cpu: backward reuses its workspace and refuses bad buffers") {
  const layer_case c{"backward workspace", {64, 8, 4, 32, 16}, 2, 30};
  const prepared p = prepare(c, 15);
  const row_matrix<float> dy = row_matrix<float>::Ones(c.tokens, c.dims.hidden);
  auto engine = make_engine(grove::simd::best_isa(), 2);
  grove::layer_parameters<float> grads(c.dims);
  row_matrix<float> dx = row_matrix<float>::Zero(c.tokens, c.dims.hidden), dw;
  engine.backward(p.params.view(), p.plan, p.x, dy, nullptr, grads.span(), dx, dw);
  const std::size_t allocations = engine.workspace_allocations();
  for (int run = 0; run < 3; ++run) engine.backward(p.params.view(), p.plan, p.x, dy, nullptr, grads.span(), dx, dw);
  CHECK(engine.workspace_allocations() == allocations);

  // dx may not be x or dy (backward reads them while it writes dx).
  row_matrix<float> x_and_dx = p.x;
  CHECK_THROWS_WITH_AS(engine.backward(p.params.view(), p.plan, x_and_dx, dy, nullptr, grads.span(), x_and_dx, dw),
                       doctest::Contains("shares memory"), grove::error);
  row_matrix<float> wrong_dy(c.tokens, c.dims.hidden + 1);
  CHECK_THROWS_WITH_AS(engine.backward(p.params.view(), p.plan, p.x, wrong_dy, nullptr, grads.span(), dx, dw),
                       doctest::Contains("output gradient dy"), grove::error);
  grove::layer_parameters<float> wrong_grads(layer_dims{64, 8, 4, 32, 8});
  CHECK_THROWS_WITH_AS(engine.backward(p.params.view(), p.plan, p.x, dy, nullptr, wrong_grads.span(), dx, dw),
                       doctest::Contains("gradient buffers"), grove::error);
  // Activations saved for another batch are refused.
  grove::saved_activations<float> saved;
  const prepared other = prepare({"other", c.dims, 2, 31}, 16);
  row_matrix<float> y(other.x.rows(), c.dims.hidden);
  engine.forward_saving(other.params.view(), other.plan, other.x, y, saved);
  CHECK_THROWS_WITH_AS(engine.backward(p.params.view(), p.plan, p.x, dy, &saved, grads.span(), dx, dw),
                       doctest::Contains("saved activations"), grove::error);
}

// ---------------------------------------------------------------------------------------------
// SIMD helpers. Batch functions carry their level's target attribute, so the code that calls
// them is compiled for that level too (as the kernels are) and runs only where supported.
// ---------------------------------------------------------------------------------------------
namespace {

std::vector<float> probe_values() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 3.14159f, 1e-30f, -1e-30f, 1e-40f, 65504.0f,
                          std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min()};
  // Exact ties between two bf16 values (low 16 bits 0x8000), with even and odd upper halves.
  for (std::uint32_t hi : {0x3F80u, 0x3F81u, 0xBF82u, 0x4B7Fu})
    v.push_back(std::bit_cast<float>((hi << 16) | 0x8000u));
  grove::detail::normal_generator gen(5);
  for (int i = 0; i < 200; ++i) v.push_back(static_cast<float>(gen.normal() * std::pow(10.0, gen.normal() * 3)));
  return v;
}

// The same checks for each level: the functions are defined inside a region compiled for the
// level (as the library's kernels are), so that the batch functions inline into them.
#define FAST_CPU_SIMD_CHECKS(Level)          \
  using B = grove::simd::batch<float, Level>; \
inline void check_bf16_rounding(const std::vector<float>& values) { \
  std::vector<std::uint16_t> out(values.size() + 1, 0xABCD); \
  std::size_t i = 0; \
  for (; i + B::size <= values.size(); i += B::size) B::load(values.data() + i).store_bf16(out.data() + i); \
  const int rest = static_cast<int>(values.size() - i); \
  if (rest > 0) B::load_partial(values.data() + i, rest).store_bf16_partial(out.data() + i, rest); \
  for (std::size_t j = 0; j < values.size(); ++j) { \
    CAPTURE(values[j]); \
    CHECK(out[j] == grove::simd::float_to_bf16_bits(values[j])); \
  } \
  CHECK(out[values.size()] == 0xABCD); \
 \
  std::vector<std::uint16_t> bits(out.begin(), out.end() - 1); \
  std::vector<float> back(values.size() + 1, 7.0f); \
  for (i = 0; i + B::size <= bits.size(); i += B::size) B::load_bf16(bits.data() + i).store(back.data() + i); \
  if (rest > 0) B::load_bf16_partial(bits.data() + i, rest).store_partial(back.data() + i, rest); \
  for (std::size_t j = 0; j < bits.size(); ++j) { \
    const float expected = grove::simd::bf16_bits_to_float(bits[j]); \
    CHECK(std::memcmp(&back[j], &expected, sizeof(float)) == 0); \
  } \
  CHECK(back[values.size()] == 7.0f); \
} \
 \
inline void check_exp_and_sum() { \
  float in[B::size], out[B::size]; \
  double worst = 0; \
  for (int step = 0; step <= 1000; ++step) { \
    for (int l = 0; l < B::size; ++l) in[l] = -87.0f + 175.0f * float(step * B::size + l) / float(1001 * B::size); \
    grove::simd::exp(B::load(in)).store(out); \
    for (int l = 0; l < B::size; ++l) { \
      const double exact = std::exp(double(in[l])); \
      worst = std::max(worst, std::abs(out[l] - exact) / exact); \
    } \
  } \
  CHECK(worst < 4e-7); \
 \
  for (int l = 0; l < B::size; ++l) in[l] = l % 2 ? 1000.0f : -1000.0f; \
  grove::simd::exp(B::load(in)).store(out); \
  for (int l = 0; l < B::size; ++l) { \
    CHECK(std::isfinite(out[l])); \
    if (l % 2 == 0) CHECK(out[l] < 1e-37f); \
  } \
  float total = 0; \
  for (int l = 0; l < B::size; ++l) total += (in[l] = float(l + 1)); \
  CHECK(grove::simd::reduce_add(B::load(in)) == total); \
  grove::detail::normal_generator gen(17); \
  std::vector<float> many(static_cast<std::size_t>(B::size * B::size)); \
  for (float& v : many) v = static_cast<float>(gen.normal() * std::pow(2.0, 20 * gen.normal())); \
  B batches[B::size]; \
  for (int i = 0; i < B::size; ++i) batches[i] = B::load(many.data() + i * B::size); \
  float sums[B::size]; \
  B::reduce_lanes(batches, sums); \
  for (int i = 0; i < B::size; ++i) { \
    const float one = grove::simd::reduce_add(batches[i]); \
    CHECK(std::memcmp(&sums[i], &one, sizeof(float)) == 0); \
  } \
} \
  static_assert(true, "")

namespace checks_scalar {
FAST_CPU_SIMD_CHECKS(grove::simd::scalar);
}
#if GROVE_SIMD_X86
GROVE_SIMD_SILENCE_BEGIN
GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX2)
namespace checks_avx2 {
FAST_CPU_SIMD_CHECKS(grove::simd::avx2);
}
GROVE_SIMD_END_REGION()
GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX512)
namespace checks_avx512 {
FAST_CPU_SIMD_CHECKS(grove::simd::avx512);
}
GROVE_SIMD_END_REGION()
GROVE_SIMD_SILENCE_END
#endif

}  // namespace

TEST_CASE("fast_cpu: SIMD bf16 rounding, widening, exp and lane sums on every level") {
  const std::vector<float> values = probe_values();
  // The scalar rule itself: round to nearest, ties to even, NaN stays NaN.
  CHECK(grove::simd::float_to_bf16_bits(std::bit_cast<float>(0x3F808000u)) == 0x3F80);  // tie, even: down
  CHECK(grove::simd::float_to_bf16_bits(std::bit_cast<float>(0x3F818000u)) == 0x3F82);  // tie, odd: up
  CHECK(grove::simd::float_to_bf16_bits(std::bit_cast<float>(0x3F808001u)) == 0x3F81);  // above the tie
  CHECK(std::isnan(grove::simd::bf16_bits_to_float(grove::simd::float_to_bf16_bits(std::nanf("")))));
  CHECK(grove::to_float(grove::to_bf16(1.0f)) == 1.0f);
  checks_scalar::check_bf16_rounding(values);
  checks_scalar::check_exp_and_sum();
#if GROVE_SIMD_X86
  if (grove::simd::supported(isa::avx2)) {
    checks_avx2::check_bf16_rounding(values);
    checks_avx2::check_exp_and_sum();
  }
  if (grove::simd::supported(isa::avx512)) {
    checks_avx512::check_bf16_rounding(values);
    checks_avx512::check_exp_and_sum();
  }
#endif
}

TEST_CASE("fast_cpu: layer_parameters<bf16> keeps every tensor in bf16 and routes with the widened router") {
  const layer_dims d{24, 4, 2, 8, 4};
  auto params = grove::layer_parameters<float>::random(d, 9, 0.5);
  params.bias()[1] = 0.25f;
  const grove::layer_parameters<grove::bf16> w = grove::layer_parameters<grove::bf16>::from(params.view());
  CHECK(w.bytes() == sizeof(grove::bf16) * static_cast<std::size_t>(grove::total_parameters(d)) +
                         sizeof(float) * static_cast<std::size_t>(d.experts * d.hidden + d.experts));
  const auto fw = params.view();
  const auto bw = w.view();
  for (Index e = 0; e < d.experts; ++e)
    for (Index i = 0; i < d.expert_intermediate; ++i)
      for (Index c = 0; c < d.hidden; ++c)
        CHECK(grove::to_float(bw.expert(e).gate(i, c)) == grove::to_float(grove::to_bf16(fw.expert(e).gate(i, c))));
  for (Index j = 0; j < d.groups; ++j)
    CHECK(grove::to_float(bw.adjugate(j).down(3, 1)) == grove::to_float(grove::to_bf16(fw.adjugate(j).down(3, 1))));
  const auto rv = w.routing_view();
  for (Index e = 0; e < d.experts; ++e)
    for (Index c = 0; c < d.hidden; ++c) CHECK(rv.router()(e, c) == grove::to_float(bw.router()(e, c)));
  REQUIRE(rv.bias() != nullptr);
  CHECK(rv.bias()[1] == 0.25f);
}

TEST_CASE("formats: one table row per format, and the owning template in each") {
  using grove::weight_format;
  // The run-time table and the compile-time side agree.
  CHECK(grove::weight_formats.size() == 5);  // f32, f64, bf16, q8, q4 (test_quantized has the last two)
  CHECK(grove::info_of<float>().format == weight_format::f32);
  CHECK(grove::info_of<double>().checkpoint_dtype == "F64");
  CHECK(grove::info_of<grove::bf16>().bits == 16);
  CHECK(grove::info_of<grove::bf16>().fp32_routing_copy);
  CHECK_FALSE(grove::info_of<grove::bf16>().trainable);
  CHECK(grove::info_of<float>().trainable);
  CHECK(grove::parse_weight_format("bf16") == weight_format::bf16);
  CHECK_THROWS_WITH_AS((void)grove::parse_weight_format("int3"),
                       "grove: unknown weight format 'int3' (grove holds f32, f64, bf16, q8, q4)", grove::error);
  static_assert(std::is_same_v<grove::activation_t<grove::bf16>, float>);
  static_assert(std::is_same_v<grove::activation_t<double>, double>);
  static_assert(!grove::weight_storage<int>);
  // bytes_for, reached from a run-time format (as `grove info` does), is what an object holds.
  const layer_dims d{24, 4, 2, 8, 4};
  const auto n = static_cast<std::size_t>(grove::total_parameters(d));
  CHECK(grove::visit_format(weight_format::f32, [&]<class S>() { return grove::layer_parameters<S>::bytes_for(d); }) ==
        4 * (n + 4));
  CHECK(grove::visit_format(weight_format::f64, [&]<class S>() { return grove::layer_parameters<S>::bytes_for(d); }) ==
        8 * (n + 4));
  CHECK(grove::visit_format(weight_format::bf16, [&]<class S>() { return grove::layer_parameters<S>::bytes_for(d); }) ==
        2 * n + 4 * (24 * 4 + 4));
  // random() in BF16 is the fp32 draw rounded once by the one rounding rule; from() converts
  // between any two formats (f64 → bf16 through fp32, as PyTorch's .to() of an fp32 tensor).
  const auto f32 = grove::layer_parameters<float>::random(d, 5, 0.7);
  const auto b16 = grove::layer_parameters<grove::bf16>::random(d, 5, 0.7);
  const auto rounded = grove::layer_parameters<grove::bf16>::from(f32.view());
  REQUIRE(b16.values().size() == n);
  CHECK(std::memcmp(b16.values().data(), rounded.values().data(), 2 * n) == 0);
  const auto widened = grove::layer_parameters<double>::from(b16.view());
  bool exact = true;
  for (std::size_t i = 0; i < n; ++i) exact = exact && widened.values()[i] == grove::to_float(b16.values()[i]);
  CHECK(exact);
  CHECK(b16.routing_view().router()(3, 5) == grove::to_float(b16.view().router()(3, 5)));
  // Writing the router through span() and refreshing keeps the routing copy in step.
  auto edited = grove::layer_parameters<grove::bf16>(b16);
  edited.span().router()(1, 2) = grove::to_bf16(1.5f);
  edited.refresh_routing();
  CHECK(edited.routing_view().router()(1, 2) == 1.5f);
}

template <class Layer>
concept has_training_forward = requires(const Layer& layer, grove::routing_plan<typename Layer::scalar> plan,
                                        row_matrix<typename Layer::scalar> m,
                                        grove::saved_activations<typename Layer::scalar> saved) {
  layer.forward_saving(plan, m, m, saved);
};

TEST_CASE("fast_cpu: a BF16 grove::layer routes in fp32 and runs the BF16 weights") {
  const layer_case c{"bf16 layer", {48, 8, 4, 32, 16}, 3, 19};
  const prepared p = prepare(c, 41);
  auto params = grove::layer_parameters<float>(p.params);
  params.bias()[2] = 0.25f;  // exact in bf16, so a caller-owned bf16 bias holds it too
  const auto w = grove::layer_parameters<grove::bf16>::from(params.view());
  using bf16_config = grove::dynamic_config<grove::bf16>;
  auto runner = std::make_shared<grove::cpu_runner>(grove::cpu_runner_options{2, grove::simd::best_isa(), {}});
  const grove::layer<bf16_config> layer(bf16_config(c.dims, c.top_k, p.plan.scale), grove::layer_parameters<grove::bf16>(w),
                                        runner);
  static_assert(std::is_same_v<decltype(layer)::scalar, float>);
  static_assert(std::is_same_v<decltype(layer)::weight_type, grove::bf16>);
  // No training forward for a format without a backward: it does not compile.
  static_assert(!has_training_forward<grove::layer<bf16_config>>);
  static_assert(has_training_forward<grove::layer<grove::dynamic_config<float>>>);
  const grove::forward_result<float> result = layer.forward(p.x, {.routing = true});
  REQUIRE(result.routing.has_value());
  // The picks are those of the fp32 router widened from bf16 (with the fp32 bias).
  const auto plan = grove::route(w.routing_view(), {c.top_k, p.plan.scale}, p.x);
  CHECK(result.routing->topk_ids == plan.topk_ids);
  CHECK(same_bits(result.routing->logits, plan.logits));
  // The output is the layer computed with the bf16 weights: against a double reference on the
  // widened weights, within the activation rounding of vdpbf16ps where the level uses it.
  const reference_result exact = reference_forward(w.view(), plan, p.x, false);
  const bool rounds_activations = grove::simd::best_isa() == isa::avx512_bf16;
  CHECK(relative_error(result.y, exact) < (rounds_activations ? 3e-2 : 1e-5));
  // And bit for bit what the runner gives on the same plan.
  row_matrix<float> direct(c.tokens, c.dims.hidden);
  runner->forward(w.view(), plan, p.x, direct);
  CHECK(same_bits(result.y, direct));
  // A layer over caller-owned bf16 buffers (the bias in bf16 too) keeps its own fp32 routing
  // copy and gives the same bits.
  std::vector<grove::bf16> bias(static_cast<std::size_t>(c.dims.experts), grove::to_bf16(0.0f));
  bias[2] = grove::to_bf16(0.25f);
  grove::weights_view<grove::bf16> caller = w.view();
  caller.set_bias(bias.data());
  const grove::layer<bf16_config> over_view(bf16_config(c.dims, c.top_k, p.plan.scale), caller, runner);
  CHECK(same_bits(over_view.forward(p.x), result.y));
  CHECK(over_view.routing_weights().bias()[2] == 0.25f);
  // The configuration checks the bf16 weights' sizes as for any format.
  CHECK_THROWS_WITH_AS(grove::layer<bf16_config>(bf16_config({48, 8, 4, 16, 16}, c.top_k, p.plan.scale),
                                                 grove::layer_parameters<grove::bf16>(w)),
                       doctest::Contains("the weights have (H, E, G, I, Ia) = (48, 8, 4, 32, 16)"), grove::error);
}

TEST_CASE("fast_cpu: group partials, combined in the canonical order, are y bit for bit; shards of groups too") {
  // Expert parallelism in one process: each shard of groups runs its restricted plan on a
  // weights view of its groups, its partials land in the full plan's group rows, and one
  // combine gives the single-process y, bit for bit, on every level and thread count.
  const layer_case shapes[] = {cases[0], cases[1], cases[5], cases[7], cases[8], {"wide", {96, 12, 4, 40, 24}, 5, 61}};
  for (const auto& c : shapes) {
    CAPTURE(c.name);
    const prepared p = prepare(c, 31);
    const Index T = c.tokens, H = c.dims.hidden, G = c.dims.groups;
    // Each group's share of y, in double: what its partials must be.
    std::vector<reference_result> group_refs;
    for (Index j = 0; j < G; ++j) group_refs.push_back(reference_forward(p.params.view(), p.plan, p.x, false, j));
    for (isa level : levels())
      for (int threads : {1, 3}) {
        CAPTURE(grove::simd::isa_name(level));
        CAPTURE(threads);
        auto engine = make_engine(level, threads, {16, 32, 24});
        row_matrix<float> y(T, H), partials(p.plan.group_row_count(), H);
        engine.forward(p.params.view(), p.plan, p.x, y);
        engine.forward_partials(p.params.view(), p.plan, p.x, partials);
        row_matrix<float> combined = row_matrix<float>::Zero(T, H);
        grove::combine_partials(p.plan, partials, combined);
        CHECK(same_bits(combined, y));
        // Each partial is its group's share of y: compare with a double reference of the group.
        for (Index j = 0; j < G && T > 0; ++j) {
          const reference_result& ref = group_refs[static_cast<std::size_t>(j)];
          row_matrix<float> shard_y = row_matrix<float>::Zero(T, H);
          for (const auto& row : p.plan.rows_of_adjugate(j))
            shard_y.row(row.token) =
                partials.row(static_cast<Index>(&row - p.plan.adjugate_rows.data()));
          CHECK(relative_error(shard_y, ref) < 1e-5);
        }
        // Two shards of groups, each on its own weights view.
        std::vector<Index> first_half, second_half;
        for (Index j = 0; j < G; ++j) (j < G / 2 ? first_half : second_half).push_back(j);
        row_matrix<float> gathered = row_matrix<float>::Constant(p.plan.group_row_count(), H, -1.0f);
        for (const auto* groups : {&first_half, &second_half}) {
          if (groups->empty()) continue;
          const std::span<const Index> held(*groups);
          const auto shard_plan = grove::restrict_to_groups(p.plan, held);
          const auto shard_weights = p.params.view().only_groups(held);
          row_matrix<float> shard_partials(shard_plan.group_row_count(), H);
          engine.forward_partials(shard_weights, shard_plan, p.x, shard_partials);
          for (Index j : *groups) {
            const Index from = shard_plan.adjugate_offsets[static_cast<std::size_t>(j)];
            const Index to = p.plan.adjugate_offsets[static_cast<std::size_t>(j)];
            const Index n = p.plan.adjugate_offsets[static_cast<std::size_t>(j) + 1] - to;
            gathered.middleRows(to, n) = shard_partials.middleRows(from, n);
          }
        }
        CHECK(same_bits(gathered, partials));
        row_matrix<float> sharded_y = row_matrix<float>::Zero(T, H);
        grove::combine_partials(p.plan, gathered, sharded_y);
        CHECK(same_bits(sharded_y, y));
      }
  }
}

TEST_CASE("fast_cpu: the adjugate modes once per token, once per pick and none, on every level") {
  for (const auto& c : cases) {
    CAPTURE(c.name);
    prepared p = prepare(c, 41);
    for (auto mode : {grove::adjugate_mode::once_per_token, grove::adjugate_mode::once_per_pick,
                      grove::adjugate_mode::none}) {
      CAPTURE(static_cast<int>(mode));
      p.plan.adjugates = mode;
      const reference_result ref = reference_forward(p.params.view(), p.plan, p.x, false);
      for (isa level : levels()) {
        CAPTURE(grove::simd::isa_name(level));
        auto engine = make_engine(level, 2);
        row_matrix<float> y(c.tokens, c.dims.hidden), partials(p.plan.group_row_count(), c.dims.hidden);
        engine.forward(p.params.view(), p.plan, p.x, y);
        CHECK(relative_error(y, ref) < 1e-5);
        engine.forward_partials(p.params.view(), p.plan, p.x, partials);
        row_matrix<float> combined = row_matrix<float>::Zero(c.tokens, c.dims.hidden);
        grove::combine_partials(p.plan, partials, combined);
        CHECK(same_bits(combined, y));
      }
      // The plain per-expert path agrees.
      row_matrix<float> simple(c.tokens, c.dims.hidden);
      grove::cpu::forward_experts_simple(p.params.view(), p.plan, p.x, simple);
      CHECK(relative_error(simple, ref) < 1e-5);
    }
    // Once per pick and once per token are the same y (docs/math.md), up to rounding.
    if (c.tokens > 0) {
      auto engine = make_engine(grove::simd::best_isa(), 2);
      row_matrix<float> a(c.tokens, c.dims.hidden), b(c.tokens, c.dims.hidden);
      p.plan.adjugates = grove::adjugate_mode::once_per_token;
      engine.forward(p.params.view(), p.plan, p.x, a);
      p.plan.adjugates = grove::adjugate_mode::once_per_pick;
      engine.forward(p.params.view(), p.plan, p.x, b);
      CHECK((a - b).cwiseAbs().maxCoeff() <= 1e-5f * (1.0f + a.cwiseAbs().maxCoeff()));
    }
  }
  const prepared p = prepare(cases[0], 42);
  auto engine = make_engine(grove::simd::best_isa(), 2);
  row_matrix<float> y(p.x.rows(), p.x.cols());
  // Partials of the wrong shape, and a plan whose picks have no group rows, are named.
  row_matrix<float> wrong(p.plan.group_row_count() + 1, p.x.cols());
  CHECK_THROWS_WITH_AS(engine.forward_partials(p.params.view(), p.plan, p.x, wrong),
                       doctest::Contains("group partials are"), grove::error);
  auto broken = p.plan;
  broken.adjugate_rows.clear();
  std::fill(broken.adjugate_offsets.begin(), broken.adjugate_offsets.end(), Index(0));
  CHECK_THROWS_WITH_AS(engine.forward(p.params.view(), broken, p.x, y), doctest::Contains("no group rows"),
                       grove::error);
  // A shard's weights cannot run another shard's rows.
  const std::vector<Index> held{0};
  CHECK_THROWS_WITH_AS(engine.forward(p.params.view().only_groups(held), p.plan, p.x, y),
                       doctest::Contains("do not hold"), grove::error);
}

TEST_CASE("fast_cpu: backward with the adjugates left out matches the plain per-expert backward") {
  const layer_case c = cases[0];
  prepared p = prepare(c, 43);
  p.plan.adjugates = grove::adjugate_mode::none;
  const row_matrix<float> dy = grove_test::random_matrix<float>(c.tokens, c.dims.hidden, 44);
  grove::layer_parameters<float> fast(c.dims), simple(c.dims);
  row_matrix<float> dx_fast = row_matrix<float>::Zero(c.tokens, c.dims.hidden), dx_simple = dx_fast, dw_fast,
                    dw_simple;
  auto engine = make_engine(grove::simd::best_isa(), 2);
  engine.backward(p.params.view(), p.plan, p.x, dy, nullptr, fast.span(), dx_fast, dw_fast);
  grove::cpu::backward_experts_simple<float>(p.params.view(), p.plan, p.x, dy, nullptr, simple.span(), dx_simple,
                                             dw_simple);
  double worst = 0, size = 0;
  for (std::size_t i = 0; i < fast.values().size(); ++i) {
    worst = std::max(worst, std::abs(double(fast.values()[i]) - double(simple.values()[i])));
    size = std::max(size, std::abs(double(simple.values()[i])));
  }
  CHECK(size > 0);
  CHECK(worst <= 1e-5 * (1.0 + size));
  CHECK((dx_fast - dx_simple).cwiseAbs().maxCoeff() <= 1e-5f * (1.0f + dx_simple.cwiseAbs().maxCoeff()));
  CHECK((dw_fast - dw_simple).cwiseAbs().maxCoeff() <= 1e-5f * (1.0f + dw_simple.cwiseAbs().maxCoeff()));
  // No adjugate gradient at all.
  for (Index j = 0; j < c.dims.groups; ++j) CHECK(fast.span().adjugate(j).down.cwiseAbs().maxCoeff() == 0.0f);
}

TEST_CASE("fast_cpu: once per pick, the fused backward agrees with backward_experts_simple and with once per token") {
  // Once per pick evaluates a group's adjugate for each pick with weight λ·w_s where once per
  // token evaluates it once with λ·c_g (c_g = Σ w_s): the same y, gradients, dx and dw in exact
  // arithmetic, so the two modes agree up to rounding.
  for (const layer_case& c : {cases[0], cases[1], cases[4], cases[7], cases[8]}) {
    CAPTURE(c.name);
    prepared p = prepare(c, 45);
    const row_matrix<float> dy = grove_test::random_matrix<float>(c.tokens, c.dims.hidden, 46);
    const grove::layer_parameters<float> zero(c.dims);
    const row_matrix<float> zero_dx = row_matrix<float>::Zero(c.tokens, c.dims.hidden);
    auto engine = make_engine(grove::simd::best_isa(), 2);
    p.plan.adjugates = grove::adjugate_mode::once_per_token;
    const backward_result per_token = run_backward(engine, p, dy, nullptr, zero, zero_dx);
    row_matrix<float> y_token(c.tokens, c.dims.hidden);
    engine.forward(p.params.view(), p.plan, p.x, y_token);

    p.plan.adjugates = grove::adjugate_mode::once_per_pick;
    const backward_result fused = run_backward(engine, p, dy, nullptr, zero, zero_dx);
    row_matrix<float> y_pick(c.tokens, c.dims.hidden);
    engine.forward(p.params.view(), p.plan, p.x, y_pick);
    // The plain backward, recomputing and from the plain training forward's saved g and u.
    backward_result simple{zero, zero_dx, {}}, simple_saved{zero, zero_dx, {}};
    grove::cpu::backward_experts_simple<float>(p.params.view(), p.plan, p.x, dy, nullptr, simple.grads.span(),
                                               simple.dx, simple.dw);
    grove::saved_activations<float> saved;
    row_matrix<float> y_simple(c.tokens, c.dims.hidden);
    grove::cpu::forward_experts_saving_simple<float>(p.params.view(), p.plan, p.x, y_simple, saved);
    CHECK(saved.matches(p.plan, c.dims));
    grove::cpu::backward_experts_simple<float>(p.params.view(), p.plan, p.x, dy, &saved, simple_saved.grads.span(),
                                               simple_saved.dx, simple_saved.dw);
    CHECK(same_bits(simple_saved.grads.values(), simple.grads.values()));
    CHECK(same_bits(simple_saved.dx, simple.dx));
    CHECK(same_bits(simple_saved.dw, simple.dw));
    if (c.tokens == 0) continue;

    for (const backward_result* other : std::initializer_list<const backward_result*>{&simple, &per_token}) {
      CAPTURE(other == &simple ? "fused vs simple" : "once per pick vs once per token");
      const std::pair<double, std::string> tensor = worst_tensor(fused.grads, zero, widened(other->grads));
      CAPTURE(tensor.second);
      CHECK(tensor.first < 1e-5);
      CHECK(worst_relative(fused.dx, nullptr, widened(other->dx)) < 1e-5);
      CHECK(worst_relative(fused.dw, nullptr, widened(other->dw)) < 1e-5);
    }
    CHECK(worst_relative(y_pick, nullptr, widened(y_token)) < 1e-5);
    CHECK(worst_relative(y_simple, nullptr, widened(y_pick)) < 1e-5);
    // Every adjugate that a pick reached has a gradient.
    for (Index j = 0; j < c.dims.groups; ++j)
      if (!p.plan.rows_of_adjugate(j).empty()) CHECK(fused.grads.view().adjugate(j).down.cwiseAbs().maxCoeff() > 0.0f);
  }
}

TEST_CASE("fast_cpu: once per pick, the fused backward matches central differences of the fp64 forward") {
  // A small layer, every weight entry, every x entry and every routing weight: the fp32 fused
  // backward and the fp64 runner's backward against central differences of L = ⟨dy, y⟩, y the
  // fp64 runner's once-per-pick forward of the same plan (picks fixed, routing weights inputs).
  const layer_dims dims{10, 6, 3, 5, 4};
  const Index T = 7, k = 3;
  const auto params = grove::layer_parameters<float>::random(dims, 61, 0.4);
  const row_matrix<float> x = grove_test::random_matrix<float>(T, dims.hidden, 62);
  const row_matrix<float> dy = grove_test::random_matrix<float>(T, dims.hidden, 63);
  grove::routing_options options{k, 0.5};
  options.adjugates = grove::adjugate_mode::once_per_pick;
  const auto plan = grove::route(params.view(), options, x);
  // Some token picks two experts of one group: two per-pick terms share an adjugate.
  REQUIRE(plan.adjugate_evaluations() < T * k);

  // The same layer, batch and plan in double (all widened exactly).
  grove::layer_parameters<double> pd = widened(params);
  std::vector<grove::routed_row<double>> picks;
  for (Index t = 0; t < T; ++t)
    for (Index s = 0; s < k; ++s)
      picks.push_back({static_cast<std::int32_t>(t), static_cast<std::int32_t>(s), plan.topk_ids(t, s),
                       double(plan.topk_weights(t, s))});
  grove::routing_plan<double> plan_d =
      grove::plan_from_rows<double>(dims, T, k, plan.scale, picks, grove::adjugate_mode::once_per_pick);
  const row_matrix<double> xd = x.cast<double>(), R = dy.cast<double>();
  row_matrix<double> xp = xd;

  grove::cpu_runner runner = make_engine(grove::simd::best_isa(), 2);
  row_matrix<double> y(T, dims.hidden);
  auto loss = [&] {
    runner.forward(pd.view(), plan_d, xp, y);
    return R.cwiseProduct(y).sum();
  };
  const double h = 1e-5;
  auto central = [&](double& v) {
    const double at = v;
    v = at + h;
    const double plus = loss();
    v = at - h;
    const double minus = loss();
    v = at;
    return (plus - minus) / (2 * h);
  };
  grove::layer_parameters<double> fd(dims);
  for (std::size_t i = 0; i < pd.values().size(); ++i) fd.values()[i] = central(pd.values()[i]);
  std::vector<double> fd_dx(static_cast<std::size_t>(xp.size())), fd_dw(static_cast<std::size_t>(T * k));
  for (Index i = 0; i < xp.size(); ++i) fd_dx[static_cast<std::size_t>(i)] = central(xp.data()[i]);
  // w_s enters through its expert row (the per-pick adjugate row is formed from it).
  for (auto& row : plan_d.expert_rows) fd_dw[static_cast<std::size_t>(row.token * k + row.slot)] = central(row.weight);

  const grove::layer_parameters<float> zero(dims);
  grove::layer_parameters<float> grads(dims);
  row_matrix<float> dx = row_matrix<float>::Zero(T, dims.hidden), dw;
  runner.backward(params.view(), plan, x, dy, nullptr, grads.span(), dx, dw);
  const std::pair<double, std::string> tensor = worst_tensor(grads, zero, fd);
  CAPTURE(tensor.second);
  CHECK(tensor.first < 1e-4);
  CHECK(worst_relative(dx, nullptr, fd_dx) < 1e-4);
  CHECK(worst_relative(dw, nullptr, fd_dw) < 1e-4);

  const grove::layer_parameters<double> zero_d(dims);
  grove::layer_parameters<double> grads_d(dims);
  row_matrix<double> dx_d = row_matrix<double>::Zero(T, dims.hidden), dw_d;
  runner.backward<double>(pd.view(), plan_d, xd, R, nullptr, grads_d.span(), dx_d, dw_d);
  const std::pair<double, std::string> tensor_d = worst_tensor(grads_d, zero_d, fd);
  CAPTURE(tensor_d.second);
  CHECK(tensor_d.first < 1e-7);
  CHECK(worst_relative(dx_d, nullptr, fd_dx) < 1e-7);
  CHECK(worst_relative(dw_d, nullptr, fd_dw) < 1e-7);
}

TEST_CASE("fast_cpu: backward over shards of groups adds up to the whole backward bit for bit") {
  // dx follows the canonical sum (plan/combine.hpp): group partials added to the caller's dx in
  // ascending group order. Shards of ascending groups, one after the other into one dx, give
  // the whole backward's dx; each MLP's gradient and each pick's dw come from its own group.
  const layer_case c = cases[0];
  prepared p = prepare(c, 47);
  const row_matrix<float> dy = grove_test::random_matrix<float>(c.tokens, c.dims.hidden, 48);
  const row_matrix<float> start_dx = grove_test::random_matrix<float>(c.tokens, c.dims.hidden, 49);
  const auto start_grads = grove::layer_parameters<float>::random(c.dims, 50, 0.5);
  const std::vector<Index> first_half{0, 1}, second_half{2, 3};
  for (const auto mode : {grove::adjugate_mode::once_per_token, grove::adjugate_mode::once_per_pick})
    for (isa level : levels()) {
      CAPTURE(static_cast<int>(mode));
      CAPTURE(grove::simd::isa_name(level));
      p.plan.adjugates = mode;
      auto engine = make_engine(level, 3);
      const backward_result whole = run_backward(engine, p, dy, nullptr, start_grads, start_dx);
      backward_result sharded{start_grads, start_dx, {}};
      for (const auto* groups : {&first_half, &second_half}) {
        const std::span<const Index> held(*groups);
        const auto shard_plan = grove::restrict_to_groups(p.plan, held);
        row_matrix<float> dw;
        engine.backward(p.params.view().only_groups(held), shard_plan, p.x, dy, nullptr, sharded.grads.span(),
                        sharded.dx, dw);
        for (Index t = 0; t < c.tokens; ++t)
          for (Index s = 0; s < c.top_k; ++s)
            if (std::binary_search(groups->begin(), groups->end(), Index(p.plan.topk_ids(t, s) / c.dims.group_size())))
              CHECK(std::bit_cast<std::uint32_t>(dw(t, s)) == std::bit_cast<std::uint32_t>(whole.dw(t, s)));
            else
              CHECK(dw(t, s) == 0.0f);  // another shard's pick: its dw comes from that shard
        // A plan received with holes (plan_from_rows, id -1 where a pick's expert is elsewhere):
        // a hole's dw is zero, whatever group its token's other picks are in.
        std::vector<grove::routed_row<float>> rows;
        for (Index t = 0; t < c.tokens; ++t)
          for (Index s = 0; s < c.top_k; ++s)
            if (std::binary_search(groups->begin(), groups->end(), Index(p.plan.topk_ids(t, s) / c.dims.group_size())))
              rows.push_back({static_cast<std::int32_t>(t), static_cast<std::int32_t>(s), p.plan.topk_ids(t, s),
                              p.plan.topk_weights(t, s)});
        const auto received = grove::plan_from_rows<float>(c.dims, c.tokens, c.top_k, p.plan.scale, rows, mode);
        auto scratch_grads = grove::layer_parameters<float>(start_grads);
        row_matrix<float> scratch_dx = start_dx, dw_received;
        engine.backward(p.params.view().only_groups(held), received, p.x, dy, nullptr, scratch_grads.span(), scratch_dx,
                        dw_received);
        for (Index t = 0; t < c.tokens; ++t)
          for (Index s = 0; s < c.top_k; ++s)
            if (received.topk_ids(t, s) < 0) CHECK(dw_received(t, s) == 0.0f);
      }
      CHECK(same_bits(sharded.grads.values(), whole.grads.values()));
      CHECK(same_bits(sharded.dx, whole.dx));
    }
}
