#pragma once

// A shard of a routing plan: the work of some whole groups. A group's routed experts and its
// adjugate are sharded together because c_j, the adjugate's weight, sums picks of that group
// only, so a process holding whole groups needs no other process's results to weight them.

#include <cstddef>
#include <span>
#include <vector>

#include "grove/config/dynamic.hpp"
#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/plan/dispatch.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

namespace detail {

/// Copies the rows of the buckets `keep` says yes to, in their order, and writes offsets in
/// which every other bucket is an empty range (so the plan's numbering stays the global one).
template <class Scalar, class Keep>
void keep_buckets(const std::vector<index>& offsets, const std::vector<dispatch_row<Scalar>>& rows, index buckets,
                  Keep keep, std::vector<index>& kept_offsets, std::vector<dispatch_row<Scalar>>& kept_rows) {
  kept_offsets.assign(static_cast<std::size_t>(buckets) + 1, 0);
  kept_rows.clear();
  for (index b = 0; b < buckets; ++b) {
    const auto begin = static_cast<std::size_t>(offsets[static_cast<std::size_t>(b)]);
    const auto end = static_cast<std::size_t>(offsets[static_cast<std::size_t>(b) + 1]);
    if (keep(b)) kept_rows.insert(kept_rows.end(), rows.begin() + static_cast<std::ptrdiff_t>(begin),
                                  rows.begin() + static_cast<std::ptrdiff_t>(end));
    kept_offsets[static_cast<std::size_t>(b) + 1] = static_cast<index>(kept_rows.size());
  }
}

}  // namespace detail

/// The part of `plan` that the listed groups compute: the same tokens, per-token view (logits,
/// picks, weights, distinct groups) and numbering (global token, expert and group ids), but
/// expert and adjugate rows only for the routed experts and adjugates of `groups`; every other
/// MLP's offsets give an empty range. A shard of a plan runs on a weights view that holds those
/// groups (layer_weights::only_groups), and the shards of a partition of the groups together
/// hold every row of the plan once. `groups`: sorted ascending, no repeats, each in [0, G);
/// grove::error names the first entry that is not.
template <class Scalar>
routing_plan<Scalar> restrict_to_groups(const routing_plan<Scalar>& plan, std::span<const index> groups) {
  detail::require_group_list(groups, plan.groups, "restrict_to_groups");
  std::vector<char> held(static_cast<std::size_t>(plan.groups), 0);
  for (const index j : groups) held[static_cast<std::size_t>(j)] = 1;

  // A copy of the whole plan, then its dispatch replaced: every per-token field and setting the
  // plan has (now or later) comes along without being listed here.
  routing_plan<Scalar> shard = plan;
  shard.scratch = {};
  detail::keep_buckets(
      plan.expert_offsets, plan.expert_rows, plan.experts,
      [&](index e) { return held[static_cast<std::size_t>(e / plan.group_size)] != 0; }, shard.expert_offsets,
      shard.expert_rows);
  detail::keep_buckets(
      plan.adjugate_offsets, plan.adjugate_rows, plan.groups,
      [&](index j) { return held[static_cast<std::size_t>(j)] != 0; }, shard.adjugate_offsets, shard.adjugate_rows);
  return shard;
}

GROVE_END_NAMESPACE
