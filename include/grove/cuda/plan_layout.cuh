// grove CUDA backend: a host routing plan (grove::routing_plan, from grove::route or
// plan_from_rows) in the device plan's layout, so that a cuda_runner runs the plans every other
// runner runs. The one conversion: everything it writes follows plan/dispatch.hpp's contract
// (dispatch rows, the MLP numbering, the adjugate modes) and the host plan's own rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/error.hpp"
#include "grove/plan/build_dispatch.hpp"
#include "grove/plan/dispatch.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace cuda {

/// Writes `plan`, a plan of a layer of `dims`, into `out` in the layout of device_plan (reusing
/// out's storage: no allocation once it has held a plan this large):
///   - rows: the plan's expert rows, then the adjugate rows of plan.adjugates: the plan's
///     adjugate rows (once_per_token), one row per pick that has an expert row, weight λ·w_s,
///     sorted by group with tokens and slots ascending (once_per_pick), or none;
///   - offsets and the schedule over the MLPs of grove::mlp_numbering;
///   - the inverse maps row_of_pick, row_of_group and pick_group_slot, -1 where a pick has no row
///     (a hole of plan_from_rows, or a group restrict_to_groups left out);
///   - the per-token view (picks, weights, groups); not the logits, which the experts never read.
/// A plan grove::route makes from some logits and the device router's plan for the same logits
/// agree field by field (tests/test_cuda.cu checks it).
inline void to_device_layout(const routing_plan<float>& plan, const layer_dims& dims, host_plan& out) {
  grove::detail::require(plan.experts == dims.experts && plan.groups == dims.groups && plan.group_size == dims.group_size(),
                  "grove::cuda: the routing plan was made for another layer (E or G differ)");
  const index T = plan.tokens, k = plan.top_k, max_groups = plan.max_groups();
  const mlp_numbering mlps{dims.experts, dims.groups};
  host_plan::layout_scratch& scratch = out.scratch;

  out.tokens = static_cast<int>(T);
  out.experts = static_cast<int>(dims.experts);
  out.groups = static_cast<int>(dims.groups);
  out.group_size = static_cast<int>(dims.group_size());
  out.top_k = static_cast<int>(k);
  out.max_groups = static_cast<int>(max_groups);
  out.scale = static_cast<float>(plan.scale);
  out.adjugates = plan.adjugates;
  out.logits.clear();
  const auto picks = static_cast<std::size_t>(T * k);
  const auto group_slots = static_cast<std::size_t>(T * max_groups);
  out.topk_ids.assign(plan.topk_ids.data(), plan.topk_ids.data() + picks);
  out.topk_weights.assign(plan.topk_weights.data(), plan.topk_weights.data() + picks);
  out.token_groups.assign(plan.token_groups.data(), plan.token_groups.data() + group_slots);
  out.group_weights.assign(plan.group_weights.data(), plan.group_weights.data() + group_slots);
  out.groups_per_token.assign(plan.groups_per_token.begin(), plan.groups_per_token.end());

  // Where each pick's expert row is: the inverse of the expert rows.
  out.row_of_pick.assign(picks, -1);
  for (std::size_t i = 0; i < plan.expert_rows.size(); ++i) {
    const dispatch_row& row = plan.expert_rows[i];
    out.row_of_pick[static_cast<std::size_t>(row.token * k + row.slot)] = static_cast<std::int32_t>(i);
  }

  // The adjugate rows of this mode, grouped by adjugate, and their offsets.
  const std::vector<dispatch_row>* adjugate_rows = &scratch.pick_rows;
  const std::vector<index>* adjugate_offsets = &scratch.offsets;
  switch (plan.adjugates) {
    case adjugate_mode::once_per_token:
      adjugate_rows = &plan.adjugate_rows;
      adjugate_offsets = &plan.adjugate_offsets;
      break;
    case adjugate_mode::once_per_pick: {
      // A counting sort of the picks that have an expert row by their group (route's sort, with
      // one extra bucket G for the picks without a row, cut off afterwards).
      const auto lambda = static_cast<float>(plan.scale);
      const index G = dims.groups;
      grove::detail::counting_sort<float>(
          T, k, G + 1, nullptr,
          [&](index t, index s) {
            return out.row_of_pick[static_cast<std::size_t>(t * k + s)] < 0 ? G : plan.topk_ids(t, s) / plan.group_size;
          },
          [&](index t, index s) { return lambda * plan.topk_weights(t, s); }, scratch.offsets, scratch.pick_rows,
          scratch.cursor);
      scratch.offsets.pop_back();
      scratch.pick_rows.resize(static_cast<std::size_t>(scratch.offsets.back()));
      break;
    }
    case adjugate_mode::none:
      scratch.pick_rows.clear();
      scratch.offsets.assign(static_cast<std::size_t>(dims.groups) + 1, 0);
      break;
  }

  // Rows per MLP in mlp_numbering's order, and the schedule's prefix arrays (offsets first).
  const auto mlp_count = static_cast<std::size_t>(mlps.count());
  scratch.rows_per_mlp.resize(mlp_count);
  for (index e = 0; e < dims.experts; ++e)
    scratch.rows_per_mlp[static_cast<std::size_t>(mlps.of_expert(e))] = static_cast<int>(plan.expert_load(e));
  for (index j = 0; j < dims.groups; ++j)
    scratch.rows_per_mlp[static_cast<std::size_t>(mlps.of_adjugate(j))] =
        static_cast<int>((*adjugate_offsets)[static_cast<std::size_t>(j) + 1] -
                         (*adjugate_offsets)[static_cast<std::size_t>(j)]);
  out.schedule.resize(detail::schedule_arrays<int>::arrays * (mlp_count + 1));
  detail::build_schedule(scratch.rows_per_mlp.data(), dims,
                         detail::schedule_arrays<int>::at(out.schedule.data(), static_cast<int>(mlp_count)));
  out.offsets.assign(out.schedule.begin(), out.schedule.begin() + static_cast<std::ptrdiff_t>(mlp_count + 1));

  // The rows: routed experts' (MLPs 0..E-1), then the adjugates' (MLPs E..E+G-1).
  out.rows.assign(plan.expert_rows.begin(), plan.expert_rows.end());
  out.rows.insert(out.rows.end(), adjugate_rows->begin(), adjugate_rows->end());
  const auto routed = static_cast<std::int32_t>(plan.expert_rows.size());
  out.row_of_group.assign(picks, -1);
  for (std::size_t i = 0; i < adjugate_rows->size(); ++i) {
    const dispatch_row& row = (*adjugate_rows)[i];
    out.row_of_group[static_cast<std::size_t>(row.token * k + row.slot)] = routed + static_cast<std::int32_t>(i);
  }

  // Which row_of_group entry holds each pick's adjugate row.
  out.pick_group_slot.assign(picks, -1);
  if (plan.adjugates == adjugate_mode::none) return;
  for (index t = 0; t < T; ++t)
    for (index s = 0; s < k; ++s) {
      const std::int32_t expert = plan.topk_ids(t, s);
      if (expert < 0) continue;  // a hole: no pick, no group
      std::int32_t slot = static_cast<std::int32_t>(s);
      if (plan.adjugates == adjugate_mode::once_per_token) {
        const auto group = static_cast<std::int32_t>(expert / plan.group_size);
        slot = 0;
        while (plan.token_groups(t, slot) != group) ++slot;
      }
      out.pick_group_slot[static_cast<std::size_t>(t * k + s)] = slot;
    }
}

}  // namespace cuda
GROVE_END_NAMESPACE
