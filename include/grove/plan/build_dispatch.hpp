#pragma once

// How a plan's dispatch is built from its per-token view: the distinct groups of each token with
// their weights c_j, and the counting sort that lists each expert's and each adjugate's rows with
// tokens ascending. grove::route (router/) and plan_from_rows (picks received from elsewhere)
// both build plans with these, so both give the same rows, bit for bit.

#include <cstdint>
#include <vector>

#include "grove/config/dynamic.hpp"
#include "grove/plan/dispatch.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// Distinct groups of each token and their weights c_j (docs/math.md, step 5), in order of first
/// pick, c_j summed over the token's picks in ascending slot order from zero (so a plan rebuilt
/// from the same picks, plan_from_rows, gets the same bits); slots with topk_ids -1 are skipped.
/// GroupSize: the group size when fixed at compile time (the division is then a shift for a
/// power of two), or `dynamic`.
template <int GroupSize = dynamic, class Scalar>
void collect_token_groups(routing_plan<Scalar>& plan) {
  const index max_groups = plan.max_groups();
  plan.token_groups.setConstant(plan.tokens, max_groups, -1);
  plan.group_weights.setZero(plan.tokens, max_groups);
  plan.groups_per_token.assign(static_cast<std::size_t>(plan.tokens), 0);
  for (index t = 0; t < plan.tokens; ++t) {
    std::int32_t count = 0;
    for (index s = 0; s < plan.top_k; ++s) {
      if (plan.topk_ids(t, s) < 0) continue;  // a hole: no pick arrived for this slot (plan_from_rows)
      std::int32_t group;
      if constexpr (GroupSize != dynamic)
        group = static_cast<std::int32_t>(static_cast<std::uint32_t>(plan.topk_ids(t, s)) / GroupSize);
      else
        group = static_cast<std::int32_t>(plan.topk_ids(t, s) / plan.group_size);
      index at = 0;
      while (at < count && plan.token_groups(t, at) != group) ++at;
      if (at == count) plan.token_groups(t, count++) = group;
      plan.group_weights(t, at) += plan.topk_weights(t, s);
    }
    plan.groups_per_token[static_cast<std::size_t>(t)] = count;
  }
}

/// Counting sort of (token, slot) pairs by the bucket each belongs to; stable, so each bucket
/// lists its tokens in ascending order (a fixed order the kernels' reductions rely on).
template <class Scalar, class BucketOf, class WeightOf>
void counting_sort(index tokens, index slots_per_token, index buckets, const std::vector<std::int32_t>* slot_counts,
                   BucketOf bucket_of, WeightOf weight_of, std::vector<index>& offsets,
                   std::vector<dispatch_row<Scalar>>& rows, std::vector<index>& cursor) {
  auto slots = [&](index t) {
    return slot_counts ? static_cast<index>((*slot_counts)[static_cast<std::size_t>(t)]) : slots_per_token;
  };
  offsets.assign(static_cast<std::size_t>(buckets) + 1, 0);
  for (index t = 0; t < tokens; ++t)
    for (index s = 0; s < slots(t); ++s) ++offsets[static_cast<std::size_t>(bucket_of(t, s)) + 1];
  for (index b = 0; b < buckets; ++b) offsets[static_cast<std::size_t>(b) + 1] += offsets[static_cast<std::size_t>(b)];
  rows.resize(static_cast<std::size_t>(offsets.back()));
  cursor.assign(offsets.begin(), offsets.end() - 1);
  for (index t = 0; t < tokens; ++t)
    for (index s = 0; s < slots(t); ++s) {
      auto& at = cursor[static_cast<std::size_t>(bucket_of(t, s))];
      rows[static_cast<std::size_t>(at++)] =
          dispatch_row<Scalar>{static_cast<std::int32_t>(t), static_cast<std::int32_t>(s), weight_of(t, s)};
    }
}

/// The adjugate rows (the group rows) from the per-token groups: each (token, group) once, weight
/// λ·c_j, grouped by adjugate with tokens ascending.
template <class Scalar>
void sort_group_rows(routing_plan<Scalar>& plan) {
  const auto lambda = static_cast<Scalar>(plan.scale);
  counting_sort<Scalar>(
      plan.tokens, 0, plan.groups, &plan.groups_per_token, [&](index t, index s) { return plan.token_groups(t, s); },
      [&](index t, index s) { return lambda * plan.group_weights(t, s); }, plan.adjugate_offsets,
      plan.adjugate_rows, plan.scratch.cursor);
}

}  // namespace detail
GROVE_END_NAMESPACE
