#pragma once

// The dispatch contract every backend shares (the CPU routing_plan, the CUDA device_plan): what a
// row of expert work is, how the MLPs of a layer are numbered and how adjugates enter a plan.
// Eigen-free, so that device code includes it too.

#include <cstdint>

#include "grove/config/dynamic.hpp"

GROVE_BEGIN_NAMESPACE

/// One row of work for an expert kernel: run `token` through the MLP and add `weight` times the
/// result to y[token]. `slot` says where the weight came from: the pick slot s for a routed
/// expert (weight w_s), the token's group slot for an adjugate evaluated once per token (weight
/// λ·c_j), or the pick slot for an adjugate evaluated once per pick (weight λ·w_s). Backward uses
/// the slot to send dw back to the right routing weight.
template <class Scalar>
struct dispatch_row {
  std::int32_t token;
  std::int32_t slot;
  Scalar weight;
};

/// One pick as it travels between processes: token `token` chose routed expert `expert` in pick
/// slot `slot` with weight w_s. The expert id is the layer's global one (not an index into a
/// shard), so that rows gathered from several processes build one plan (plan/plan_from_rows.hpp)
/// whose dispatch is what grove::route gives for the same picks.
template <class Scalar>
struct routed_row {
  std::int32_t token;
  std::int32_t slot;
  std::int32_t expert;
  Scalar weight;
};

/// How adjugates enter a plan.
enum class adjugate_mode {
  once_per_token,  ///< grove: each activated adjugate once per token with weight λ·c_j (docs/math.md, step 6)
  once_per_pick,   ///< the released code: A_{e_s / group_size} once per pick with weight λ·w_s (same y)
  none,            ///< a plain MoE: no adjugate rows (what the layer costs without its adjugates)
};

/// The MLPs of a layer in one numbering: routed expert e is MLP e, the adjugate of group j is
/// MLP E + j. A plan's rows are grouped by MLP in this order, each MLP's rows in ascending token
/// order.
struct mlp_numbering {
  index experts = 0;
  index groups = 0;

  [[nodiscard]] constexpr index count() const { return experts + groups; }
  [[nodiscard]] constexpr index of_expert(index e) const { return e; }
  [[nodiscard]] constexpr index of_adjugate(index j) const { return experts + j; }
  [[nodiscard]] constexpr bool is_adjugate(index mlp) const { return mlp >= experts; }
  /// The group an MLP belongs to: its adjugate's j, or a routed expert's e / (E / G).
  [[nodiscard]] constexpr index group_of(index mlp) const {
    return is_adjugate(mlp) ? mlp - experts : mlp / (experts / groups);
  }
};

GROVE_END_NAMESPACE
