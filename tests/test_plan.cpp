// Plan tests: a plan rebuilt from its picks (plan_from_rows) against grove::route, shards of a
// plan by whole groups (restrict_to_groups) against rows filtered here by hand, and weights views
// that hold some groups (layer_weights::only_groups).
#include <doctest/doctest.h>

#include "support/test_support.hpp"

#include <grove/grove.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <span>
#include <utility>
#include <vector>

namespace {

using Index = grove::index;
using grove::layer_dims;
using plan_t = grove::routing_plan<float>;
using row_t = grove::routed_row<float>;

// A routed batch: layer parameters, a plan routed by grove::route, and the options it used.
struct routed_batch {
  layer_dims dims;
  grove::layer_parameters<float> params;
  grove::routing_options options;
  plan_t plan;
};

routed_batch route_batch(const layer_dims& d, Index tokens, Index k, std::uint64_t seed, bool with_bias) {
  routed_batch b{d, grove::layer_parameters<float>::random(d, seed, 0.3), {k, 0.05}, {}};
  if (with_bias)
    for (Index e = 0; e < d.experts; ++e)
      b.params.bias()[static_cast<std::size_t>(e)] = 0.01f * static_cast<float>((e * 7) % 5) - 0.02f;
  const auto x = grove_test::random_matrix<float>(tokens, d.hidden, seed + 1);
  b.plan = grove::route(b.params.view(), b.options, x);
  return b;
}

// The picks of a plan as rows, in a shuffled order (a process receives them in any order).
// `keep(expert)` selects which picks travel.
template <class Keep>
std::vector<row_t> picks_of(const plan_t& plan, Keep keep, std::uint64_t seed) {
  std::vector<row_t> rows;
  for (Index t = 0; t < plan.tokens; ++t)
    for (Index s = 0; s < plan.top_k; ++s)
      if (keep(plan.topk_ids(t, s)))
        rows.push_back(row_t{static_cast<std::int32_t>(t), static_cast<std::int32_t>(s), plan.topk_ids(t, s),
                             plan.topk_weights(t, s)});
  std::mt19937_64 gen(seed);
  std::shuffle(rows.begin(), rows.end(), gen);
  return rows;
}
std::vector<row_t> picks_of(const plan_t& plan, std::uint64_t seed) {
  return picks_of(plan, [](std::int32_t) { return true; }, seed);
}

bool same_row(const grove::dispatch_row<float>& a, const grove::dispatch_row<float>& b) {
  return a.token == b.token && a.slot == b.slot && std::memcmp(&a.weight, &b.weight, sizeof(float)) == 0;
}

void check_same_rows(const std::vector<grove::dispatch_row<float>>& a,
                     const std::vector<grove::dispatch_row<float>>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CAPTURE(i);
    CHECK(same_row(a[i], b[i]));
  }
}

// Every field of the per-token view and of the dispatch, bit for bit (the logits aside).
void check_same_plan_but_logits(const plan_t& a, const plan_t& b) {
  CHECK(a.tokens == b.tokens);
  CHECK(a.experts == b.experts);
  CHECK(a.groups == b.groups);
  CHECK(a.group_size == b.group_size);
  CHECK(a.top_k == b.top_k);
  CHECK(a.scale == b.scale);
  CHECK(a.topk_ids == b.topk_ids);
  CHECK(grove_test::same_bits(a.topk_weights, b.topk_weights));
  CHECK(a.token_groups == b.token_groups);
  CHECK(grove_test::same_bits(a.group_weights, b.group_weights));
  CHECK(a.groups_per_token == b.groups_per_token);
  CHECK(a.expert_offsets == b.expert_offsets);
  check_same_rows(a.expert_rows, b.expert_rows);
  CHECK(a.adjugate_offsets == b.adjugate_offsets);
  check_same_rows(a.adjugate_rows, b.adjugate_rows);
}

// What expert e must process, straight from the per-token view: tokens ascending, the pick slot,
// its weight.
std::vector<grove::dispatch_row<float>> expected_expert_rows(const plan_t& plan, Index e) {
  std::vector<grove::dispatch_row<float>> rows;
  for (Index t = 0; t < plan.tokens; ++t)
    for (Index s = 0; s < plan.top_k; ++s)
      if (plan.topk_ids(t, s) == e)
        rows.push_back({static_cast<std::int32_t>(t), static_cast<std::int32_t>(s), plan.topk_weights(t, s)});
  return rows;
}

// What adjugate j must process: each token that touches group j once, at its group slot, with
// weight λ·c_j.
std::vector<grove::dispatch_row<float>> expected_adjugate_rows(const plan_t& plan, Index j) {
  std::vector<grove::dispatch_row<float>> rows;
  for (Index t = 0; t < plan.tokens; ++t)
    for (Index at = 0; at < plan.groups_per_token[static_cast<std::size_t>(t)]; ++at)
      if (plan.token_groups(t, at) == j)
        rows.push_back({static_cast<std::int32_t>(t), static_cast<std::int32_t>(at),
                        static_cast<float>(plan.scale) * plan.group_weights(t, at)});
  return rows;
}

void check_rows_equal(std::span<const grove::dispatch_row<float>> got,
                      const std::vector<grove::dispatch_row<float>>& want) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(same_row(got[i], want[i]));
  }
}

}  // namespace

TEST_SUITE("plan") {
  TEST_CASE("a plan rebuilt from its shuffled picks equals the routed plan, bit for bit") {
    // Group sizes 3 and 2, with and without a selection bias, k below and above G.
    const layer_dims by_three{16, 12, 4, 12, 6}, by_two{16, 8, 4, 12, 6};
    for (const auto& shape : {std::pair{by_three, Index{4}}, std::pair{by_two, Index{3}}, std::pair{by_two, Index{6}}})
      for (bool with_bias : {false, true}) {
        // Named copies, not structured bindings: doctest's CAPTURE lambdas cannot capture those.
        const layer_dims d = shape.first;
        const Index k = shape.second;
        CAPTURE(d.experts);
        CAPTURE(k);
        CAPTURE(with_bias);
        const auto batch = route_batch(d, 41, k, 100 + static_cast<std::uint64_t>(d.experts + k), with_bias);
        const auto rows = picks_of(batch.plan, 7);
        REQUIRE(rows.size() == static_cast<std::size_t>(41 * k));
        const plan_t rebuilt =
            grove::plan_from_rows<float>(d, 41, k, batch.options.scale, std::span<const row_t>(rows));
        check_same_plan_but_logits(rebuilt, batch.plan);
        CHECK(rebuilt.logits.rows() == 0);
        CHECK(rebuilt.logits.cols() == 0);
        // The routed plan's dispatch is what the per-token view says (so the comparison above
        // is against the right thing, not just against the same code twice).
        for (Index e = 0; e < d.experts; ++e)
          check_rows_equal(rebuilt.rows_of_expert(e), expected_expert_rows(batch.plan, e));
        for (Index j = 0; j < d.groups; ++j)
          check_rows_equal(rebuilt.rows_of_adjugate(j), expected_adjugate_rows(batch.plan, j));
      }
  }

  TEST_CASE("plan_from_rows_into reuses a plan of another shape and gives the same plan") {
    const layer_dims d{16, 12, 4, 12, 6};
    const auto small = route_batch(d, 5, 2, 31, false);
    const auto large = route_batch(d, 29, 5, 32, true);
    plan_t plan;
    const auto large_rows = picks_of(large.plan, 1);
    const auto small_rows = picks_of(small.plan, 2);
    grove::plan_from_rows_into(plan, d, 29, 5, 0.05, large_rows);
    check_same_plan_but_logits(plan, large.plan);
    grove::plan_from_rows_into(plan, d, 5, 2, 0.05, small_rows);
    check_same_plan_but_logits(plan, small.plan);
    // Tokens with no picks at all, and no rows: empty dispatch, every slot absent.
    grove::plan_from_rows_into(plan, d, 3, 2, 0.05, std::span<const row_t>());
    CHECK(plan.tokens == 3);
    CHECK((plan.topk_ids.array() == -1).all());
    CHECK((plan.topk_weights.array() == 0.0f).all());
    CHECK(plan.groups_per_token == std::vector<std::int32_t>{0, 0, 0});
    CHECK(plan.expert_offsets == std::vector<Index>(13, 0));
    CHECK(plan.adjugate_offsets == std::vector<Index>(5, 0));
    CHECK(plan.expert_rows.empty());
    CHECK(plan.adjugate_rows.empty());
  }

  TEST_CASE("the picks of some groups give the routed plan restricted to those groups") {
    const layer_dims d{16, 12, 4, 12, 6};  // group size 3
    const auto batch = route_batch(d, 53, 5, 41, true);
    for (const std::vector<Index>& groups : {std::vector<Index>{0, 2}, std::vector<Index>{1}, std::vector<Index>{3},
                                             std::vector<Index>{0, 1, 3}}) {
      CAPTURE(groups.size());
      CAPTURE(groups.front());
      auto held = [&](std::int32_t expert) {
        return std::binary_search(groups.begin(), groups.end(), static_cast<Index>(expert / 3));
      };
      const auto rows = picks_of(batch.plan, held, 9);
      const plan_t from_rows = grove::plan_from_rows<float>(d, 53, 5, 0.05, std::span<const row_t>(rows));
      const plan_t shard = grove::restrict_to_groups(batch.plan, groups);

      // The picks that did not travel are absent in the per-token view, the others as routed.
      for (Index t = 0; t < 53; ++t)
        for (Index s = 0; s < 5; ++s) {
          const std::int32_t expert = batch.plan.topk_ids(t, s);
          CHECK(from_rows.topk_ids(t, s) == (held(expert) ? expert : -1));
          CHECK(from_rows.topk_weights(t, s) == (held(expert) ? batch.plan.topk_weights(t, s) : 0.0f));
        }

      // Expert dispatch: equal, and what the full plan has for the held experts, nothing else.
      CHECK(from_rows.expert_offsets == shard.expert_offsets);
      check_same_rows(from_rows.expert_rows, shard.expert_rows);
      for (Index e = 0; e < d.experts; ++e) {
        CAPTURE(e);
        const auto want = held(static_cast<std::int32_t>(e)) ? expected_expert_rows(batch.plan, e)
                                                             : std::vector<grove::dispatch_row<float>>{};
        check_rows_equal(shard.rows_of_expert(e), want);
      }

      // Adjugates: c_j sums only picks of group j, so the weights agree bit for bit. The group
      // slot may differ (a token's groups are numbered among the picks each plan knows), but it
      // names group j in each plan's own per-token view.
      CHECK(from_rows.adjugate_offsets == shard.adjugate_offsets);
      REQUIRE(from_rows.adjugate_rows.size() == shard.adjugate_rows.size());
      for (Index j = 0; j < d.groups; ++j) {
        CAPTURE(j);
        const bool in = std::binary_search(groups.begin(), groups.end(), j);
        const auto a = from_rows.rows_of_adjugate(j);
        const auto b = shard.rows_of_adjugate(j);
        const auto want = in ? expected_adjugate_rows(batch.plan, j) : std::vector<grove::dispatch_row<float>>{};
        check_rows_equal(b, want);
        REQUIRE(a.size() == b.size());
        for (std::size_t i = 0; i < a.size(); ++i) {
          CHECK(a[i].token == b[i].token);
          CHECK(std::memcmp(&a[i].weight, &b[i].weight, sizeof(float)) == 0);
          CHECK(from_rows.token_groups(a[i].token, a[i].slot) == j);
          CHECK(shard.token_groups(b[i].token, b[i].slot) == j);
        }
      }
    }
  }

  TEST_CASE("restricting a plan to every group keeps it; the shards of a partition hold each row once") {
    const layer_dims d{16, 8, 4, 12, 6};  // group size 2
    const auto batch = route_batch(d, 47, 3, 61, false);
    const std::vector<Index> all{0, 1, 2, 3};
    const plan_t whole = grove::restrict_to_groups(batch.plan, all);
    check_same_plan_but_logits(whole, batch.plan);
    CHECK(whole.logits == batch.plan.logits);

    const std::vector<std::vector<Index>> partition{{0, 3}, {1}, {2}};
    std::vector<plan_t> shards;
    for (const auto& part : partition) shards.push_back(grove::restrict_to_groups(batch.plan, part));
    Index expert_rows = 0, adjugate_rows = 0;
    for (const auto& shard : shards) {
      // Each shard keeps the per-token view and the numbering.
      CHECK(shard.experts == 8);
      CHECK(shard.groups == 4);
      CHECK(shard.topk_ids == batch.plan.topk_ids);
      CHECK(shard.token_groups == batch.plan.token_groups);
      CHECK(shard.expert_offsets.size() == 9);
      CHECK(shard.adjugate_offsets.size() == 5);
      expert_rows += static_cast<Index>(shard.expert_rows.size());
      adjugate_rows += static_cast<Index>(shard.adjugate_rows.size());
    }
    CHECK(expert_rows == 47 * 3);
    CHECK(adjugate_rows == batch.plan.adjugate_evaluations());
    for (Index e = 0; e < d.experts; ++e) {
      CAPTURE(e);
      const auto owner = static_cast<std::size_t>(e / 2 == 0 || e / 2 == 3 ? 0 : e / 2);
      for (std::size_t p = 0; p < shards.size(); ++p) {
        const auto want = p == owner ? std::vector<grove::dispatch_row<float>>(batch.plan.rows_of_expert(e).begin(),
                                                                               batch.plan.rows_of_expert(e).end())
                                     : std::vector<grove::dispatch_row<float>>{};
        check_rows_equal(shards[p].rows_of_expert(e), want);
      }
    }
    for (Index j = 0; j < d.groups; ++j) {
      CAPTURE(j);
      const auto owner = static_cast<std::size_t>(j == 3 ? 0 : j);
      for (std::size_t p = 0; p < shards.size(); ++p) {
        const auto want =
            p == owner ? expected_adjugate_rows(batch.plan, j) : std::vector<grove::dispatch_row<float>>{};
        check_rows_equal(shards[p].rows_of_adjugate(j), want);
      }
    }
    // No groups: no rows, offsets all empty ranges.
    const plan_t none = grove::restrict_to_groups(batch.plan, std::span<const Index>());
    CHECK(none.expert_rows.empty());
    CHECK(none.adjugate_rows.empty());
    CHECK(none.expert_offsets == std::vector<Index>(9, 0));
  }

  TEST_CASE("bad rows and bad group lists are refused with a message that names them") {
    const layer_dims d{16, 12, 4, 12, 6};
    auto build = [&](std::vector<row_t> rows, Index tokens = 4, Index k = 3) {
      return grove::plan_from_rows<float>(d, tokens, k, 0.05, std::span<const row_t>(rows));
    };
    CHECK_THROWS_WITH_AS(build({{1, 0, 5, 0.5f}, {2, 1, 4, 0.5f}, {1, 0, 6, 0.5f}}),
                         "grove: routed row 2 repeats (token 1, slot 0)", grove::error);
    CHECK_THROWS_WITH_AS(build({{0, 0, 12, 0.5f}}), doctest::Contains("has expert 12 outside [0, E = 12)"),
                         grove::error);
    CHECK_THROWS_WITH_AS(build({{0, 0, -1, 0.5f}}), doctest::Contains("has expert -1 outside [0, E = 12)"),
                         grove::error);
    CHECK_THROWS_WITH_AS(build({{4, 0, 1, 0.5f}}), doctest::Contains("has token 4 outside [0, T = 4)"), grove::error);
    CHECK_THROWS_WITH_AS(build({{0, 3, 1, 0.5f}}), doctest::Contains("has slot 3 outside [0, k = 3)"), grove::error);
    CHECK_THROWS_WITH_AS(build({{0, 1, 1, std::numeric_limits<float>::quiet_NaN()}}),
                         doctest::Contains("routed row 0 (token 0, slot 1) has a non-finite weight"), grove::error);
    CHECK_THROWS_WITH_AS(build({{3, 2, 7, 0.25f}, {3, 0, 7, 0.5f}}),
                         "grove: token 3 picks expert 7 twice (slots 0 and 2)", grove::error);
    CHECK_THROWS_WITH_AS(build({}, 4, 0), doctest::Contains("top-k k = 0 must lie in [1, E = 12]"), grove::error);
    CHECK_THROWS_WITH_AS(build({}, 4, 13), doctest::Contains("top-k k = 13"), grove::error);

    const auto batch = route_batch(d, 6, 3, 71, false);
    auto restrict_to = [&](std::vector<Index> groups) { return grove::restrict_to_groups(batch.plan, groups); };
    CHECK_THROWS_WITH_AS(restrict_to({0, 2, 1}),
                         "grove: restrict_to_groups: group 1 (entry 2) does not follow group 2; the groups must be "
                         "sorted ascending without repeats",
                         grove::error);
    CHECK_THROWS_WITH_AS(restrict_to({1, 1}), doctest::Contains("group 1 (entry 1) does not follow group 1"),
                         grove::error);
    CHECK_THROWS_WITH_AS(restrict_to({0, 4}), "grove: restrict_to_groups: group 4 (entry 1) lies outside [0, G = 4)",
                         grove::error);
    CHECK_THROWS_WITH_AS(restrict_to({-1}), doctest::Contains("group -1 (entry 0) lies outside [0, G = 4)"),
                         grove::error);
  }

  TEST_CASE("a weights view of some groups holds their experts and adjugates only") {
    const layer_dims d{16, 8, 4, 12, 6};  // group size 2: group j holds experts 2j, 2j + 1
    auto params = grove::layer_parameters<float>::random(d, 81, 0.3);
    const grove::weights_view<float> full = params.view();
    CHECK(full.held_groups().empty());
    for (Index j = 0; j < 4; ++j) CHECK(full.holds_group(j));
    CHECK_FALSE(full.holds_group(4));

    const std::vector<Index> groups{1, 3};
    const grove::weights_view<float> shard = full.only_groups(groups);
    CHECK(std::vector<Index>(shard.held_groups().begin(), shard.held_groups().end()) == groups);
    CHECK_FALSE(shard.holds_group(0));
    CHECK(shard.holds_group(1));
    CHECK_FALSE(shard.holds_group(2));
    CHECK(shard.holds_group(3));
    CHECK_FALSE(shard.holds_group(-1));
    CHECK(shard.router().data() == full.router().data());
    CHECK(shard.bias() == full.bias());
    for (Index e = 0; e < d.experts; ++e) {
      CAPTURE(e);
      const bool held = e / 2 == 1 || e / 2 == 3;
      CHECK(shard.expert(e).gate.data() == (held ? full.expert(e).gate.data() : nullptr));
      CHECK(shard.expert(e).up.data() == (held ? full.expert(e).up.data() : nullptr));
      CHECK(shard.expert(e).down.data() == (held ? full.expert(e).down.data() : nullptr));
    }
    for (Index j = 0; j < d.groups; ++j) {
      CAPTURE(j);
      const bool held = j == 1 || j == 3;
      CHECK(shard.adjugate(j).gate.data() == (held ? full.adjugate(j).gate.data() : nullptr));
      CHECK(shard.adjugate(j).down.data() == (held ? full.adjugate(j).down.data() : nullptr));
    }
    CHECK_NOTHROW(shard.require_complete());
    CHECK_NOTHROW(full.require_complete());
    // for_each_tensor still walks every tensor; those of other groups are unbound.
    int tensors = 0, unbound = 0;
    shard.for_each_tensor([&](const grove::tensor_info&, const float* const& p) {
      ++tensors;
      unbound += p == nullptr ? 1 : 0;
    });
    CHECK(tensors == 1 + 3 * 8 + 3 * 4 + 1);
    CHECK(unbound == 3 * 4 + 3 * 2);

    // A writable view restricted and converted to a read-only one keeps its groups.
    const grove::weights_view<float> converted = params.span().only_groups(groups);
    CHECK(std::vector<Index>(converted.held_groups().begin(), converted.held_groups().end()) == groups);
    CHECK(converted.expert(0).gate.data() == nullptr);
    // A held group's tensor that is missing is still reported.
    grove::weights_span<float> partial = params.span().only_groups(groups);
    partial.set_expert(6, nullptr, nullptr, nullptr);
    CHECK_THROWS_WITH_AS(partial.require_complete(),
                         "grove: missing tensor 'experts.6.gate_proj.weight' in layer weights",
                         grove::error);

    // Narrowing a shard further; bad lists are refused.
    const std::vector<Index> one{3};
    const grove::weights_view<float> narrower = shard.only_groups(one);
    CHECK(std::vector<Index>(narrower.held_groups().begin(), narrower.held_groups().end()) == one);
    CHECK(narrower.expert(2).gate.data() == nullptr);
    CHECK(narrower.expert(6).gate.data() == full.expert(6).gate.data());
    const std::vector<Index> zero{0}, unsorted{3, 1}, out{1, 4}, none{};
    CHECK_THROWS_WITH_AS((void)shard.only_groups(zero), "grove: only_groups: group 0 is not held by this weights view",
                         grove::error);
    CHECK_THROWS_WITH_AS((void)full.only_groups(unsorted),
                         doctest::Contains("only_groups: group 1 (entry 1) does not follow group 3"),
                         grove::error);
    CHECK_THROWS_WITH_AS((void)full.only_groups(out), "grove: only_groups: group 4 (entry 1) lies outside [0, G = 4)",
                         grove::error);
    CHECK_THROWS_WITH_AS((void)full.only_groups(none), doctest::Contains("the group list is empty"), grove::error);
  }
}
