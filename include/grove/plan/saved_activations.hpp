#pragma once

#include <cstddef>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

/// What a training forward keeps for backward: the SwiGLU pre-activations `g = G x` and
/// `u = U x` of every row the plan dispatched. Rows are in the plan's order, routed experts'
/// rows first (plan.expert_rows, I values each), then adjugates' rows (plan.adjugate_rows, Ia
/// values each), then, in adjugate_mode::once_per_pick, one adjugate row per pick
/// (plan.expert_rows again, Ia values each: pick s of expert e runs its group's adjugate), so an
/// item's rows form one contiguous [n, inter] block: the layout of the fast engine's h
/// workspace. Everything else backward needs (`silu(g)`, `h`) is an elementwise function of
/// these, recomputed with the same expressions, so keeping and recomputing give bit-identical
/// gradients (docs/training.md, "Saved activations or recomputation").
///
/// Memory: `2·(T·k·I + Σ n_g·Ia)` scalars, `2·T·k·Ia` more once per pick, against a
/// recomputation of the gate/up products.
template <class Scalar>
struct saved_activations {
  std::vector<Scalar> gate;  ///< g of every dispatched row
  std::vector<Scalar> up;    ///< u of every dispatched row
  index expert_intermediate = 0;
  index adjugate_intermediate = 0;
  /// The plan's adjugate mode when these were saved (once_per_pick adds the per-pick rows).
  adjugate_mode adjugates = adjugate_mode::once_per_token;
  /// The plan's dispatch offsets when these were saved: backward refuses another plan.
  std::vector<index> expert_offsets;
  std::vector<index> adjugate_offsets;

  /// Sizes the buffers for `plan` on a layer of dims `d` (reusing their storage).
  void reset(const layer_dims& d, const routing_plan<Scalar>& plan) {
    expert_intermediate = d.expert_intermediate;
    adjugate_intermediate = d.adjugate_intermediate;
    adjugates = plan.adjugates;
    expert_offsets = plan.expert_offsets;
    adjugate_offsets = plan.adjugate_offsets;
    const std::size_t n = elements();
    gate.resize(n);
    up.resize(n);
  }
  /// Scalars per buffer: every expert row with I, every adjugate row with Ia (and, once per
  /// pick, every per-pick row with Ia).
  [[nodiscard]] std::size_t elements() const {
    if (expert_offsets.empty()) return 0;
    const index picks = adjugates == adjugate_mode::once_per_pick ? expert_offsets.back() : 0;
    return static_cast<std::size_t>(expert_offsets.back() * expert_intermediate +
                                    ((adjugate_offsets.empty() ? 0 : adjugate_offsets.back()) + picks) *
                                        adjugate_intermediate);
  }
  /// Where the block of routed expert e's rows starts (its rows × I).
  [[nodiscard]] std::size_t expert_start(index e) const {
    return static_cast<std::size_t>(expert_offsets[static_cast<std::size_t>(e)] * expert_intermediate);
  }
  /// Where the block of adjugate j's rows starts (its rows × Ia).
  [[nodiscard]] std::size_t adjugate_start(index j) const {
    return static_cast<std::size_t>(expert_offsets.back() * expert_intermediate +
                                    adjugate_offsets[static_cast<std::size_t>(j)] * adjugate_intermediate);
  }

  /// Once per pick: where the block of the per-pick adjugate rows of expert e's picks starts
  /// (its rows × Ia).
  [[nodiscard]] std::size_t pick_start(index e) const {
    return static_cast<std::size_t>(expert_offsets.back() * expert_intermediate +
                                    (adjugate_offsets.back() + expert_offsets[static_cast<std::size_t>(e)]) *
                                        adjugate_intermediate);
  }

  [[nodiscard]] bool empty() const { return expert_offsets.empty(); }
  /// True when these activations were saved for a plan with this dispatch and adjugate mode on a
  /// layer of dims d.
  [[nodiscard]] bool matches(const routing_plan<Scalar>& plan, const layer_dims& d) const {
    return adjugates == plan.adjugates && expert_offsets == plan.expert_offsets &&
           adjugate_offsets == plan.adjugate_offsets &&
           expert_intermediate == d.expert_intermediate && adjugate_intermediate == d.adjugate_intermediate &&
           gate.size() == elements() && up.size() == elements();
  }
  [[nodiscard]] std::size_t bytes() const { return sizeof(Scalar) * (gate.size() + up.size()); }
};

GROVE_END_NAMESPACE
