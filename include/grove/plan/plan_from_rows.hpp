#pragma once

// A routing plan rebuilt from picks alone. Under expert parallelism a process receives the picks
// (routed_row, global expert ids) that other processes routed to its groups; from them it builds
// the plan its local runner executes. The per-expert dispatch is exactly grove::route's for the
// same picks, so that a sharded layer computes what the single-process one does, bit for bit.

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "grove/config/dynamic.hpp"
#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/plan/build_dispatch.hpp"
#include "grove/plan/dispatch.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

/// Builds into `plan` (reusing its storage) the plan of the picks `rows`, which may come in any
/// order and need not cover every (token, slot): topk_ids / topk_weights hold -1 / 0 where no
/// row has that slot. The distinct groups, c_j and the expert and adjugate rows are computed as
/// grove::route computes them, so for the complete set of a routed plan's picks every field but
/// the logits equals the routed plan's, bit for bit. The logits are not known here: they stay
/// empty (0x0). Throws grove::error naming the first bad row: token outside [0, T), slot outside
/// [0, k), expert outside [0, E), non-finite weight, a (token, slot) given twice, or a token that
/// picks one expert in two slots; `plan` is then left unspecified.
template <class Scalar>
void plan_from_rows_into(routing_plan<Scalar>& plan, const layer_dims& dims, index tokens, index top_k, double scale,
                         std::type_identity_t<std::span<const routed_row<Scalar>>> rows,
                         adjugate_mode adjugates = adjugate_mode::once_per_token) {
  dims.validate();
  detail::require(tokens >= 0, "grove: plan_from_rows: token count T = ", tokens, " must not be negative");
  detail::require(top_k >= 1 && top_k <= dims.experts, "grove: plan_from_rows: top-k k = ", top_k,
                  " must lie in [1, E = ", dims.experts, "]");

  plan.tokens = tokens;
  plan.experts = dims.experts;
  plan.groups = dims.groups;
  plan.group_size = dims.group_size();
  plan.top_k = top_k;
  plan.scale = scale;
  plan.adjugates = adjugates;
  plan.logits.resize(0, 0);

  // -1 marks a slot no row filled yet; it also finds a (token, slot) given twice.
  plan.topk_ids.setConstant(tokens, top_k, -1);
  plan.topk_weights.setZero(tokens, top_k);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const routed_row<Scalar>& row = rows[i];
    detail::require(row.token >= 0 && row.token < tokens, "grove: routed row ", i, " has token ", row.token,
                    " outside [0, T = ", tokens, ")");
    detail::require(row.slot >= 0 && row.slot < top_k, "grove: routed row ", i, " has slot ", row.slot,
                    " outside [0, k = ", top_k, ")");
    detail::require(row.expert >= 0 && row.expert < dims.experts, "grove: routed row ", i, " has expert ",
                    row.expert, " outside [0, E = ", dims.experts, ")");
    detail::require(std::isfinite(row.weight), "grove: routed row ", i, " (token ", row.token, ", slot ", row.slot,
                    ") has a non-finite weight");
    detail::require(plan.topk_ids(row.token, row.slot) < 0, "grove: routed row ", i, " repeats (token ", row.token,
                    ", slot ", row.slot, ")");
    plan.topk_ids(row.token, row.slot) = row.expert;
    plan.topk_weights(row.token, row.slot) = row.weight;
  }
  // route never picks an expert twice for a token; a plan that did would run it twice and count
  // its weight twice in c_j.
  for (index t = 0; t < tokens; ++t)
    for (index s = 1; s < top_k; ++s) {
      const std::int32_t expert = plan.topk_ids(t, s);
      if (expert < 0) continue;
      for (index earlier = 0; earlier < s; ++earlier)
        detail::require(plan.topk_ids(t, earlier) != expert, "grove: token ", t, " picks expert ", expert,
                        " twice (slots ", earlier, " and ", s, ")");
    }

  detail::collect_token_groups(plan);

  // route_into's counting sort, with one extra bucket E after the experts for the empty slots:
  // they sort to the end, where they are cut off, and every expert keeps route's row order.
  detail::counting_sort<Scalar>(
      plan.tokens, plan.top_k, plan.experts + 1, nullptr,
      [&](index t, index s) {
        const std::int32_t expert = plan.topk_ids(t, s);
        return expert < 0 ? plan.experts : static_cast<index>(expert);
      },
      [&](index t, index s) { return plan.topk_weights(t, s); }, plan.expert_offsets, plan.expert_rows,
      plan.scratch.cursor);
  plan.expert_offsets.pop_back();
  plan.expert_rows.resize(static_cast<std::size_t>(plan.expert_offsets.back()));

  detail::sort_group_rows(plan);
}

/// plan_from_rows_into on a new plan.
template <class Scalar>
routing_plan<Scalar> plan_from_rows(const layer_dims& dims, index tokens, index top_k, double scale,
                                    std::span<const routed_row<Scalar>> rows,
                                    adjugate_mode adjugates = adjugate_mode::once_per_token) {
  routing_plan<Scalar> plan;
  plan_from_rows_into(plan, dims, tokens, top_k, scale, rows, adjugates);
  return plan;
}

GROVE_END_NAMESPACE
