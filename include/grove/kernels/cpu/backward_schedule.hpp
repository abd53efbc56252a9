#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/kernels/cpu/expert_schedule.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// Rows [begin, end) of one MLP's weight gradient: of ∂D (H rows of `inter`) when `down`,
/// otherwise of ∂G and ∂U together (`inter` rows of H). The MLP's items are
/// backward_schedule::gradient_items()[first, last): one item, except for an adjugate evaluated
/// once per pick (one item per picked expert of its group), whose items add into the gradient
/// one after the other in item order. Each tile owns its rows outright.
struct gradient_tile {
  std::int32_t first, last;
  std::int32_t begin, end;
  bool down;
};

/// Where an item's weight gradients live (the caller's buffers, accumulated into).
struct item_gradients {
  float* gate;
  float* up;
  float* down;
};

/// The tiles of the fused backward over an expert_schedule's items (docs/performance.md,
/// "Backward"): the same items in the same order as the forward (routed experts and adjugates
/// alike), in three kinds of tiles:
///   - dh tiles (item, ≤ dh_rows rows, ≤ dh_cols intermediate columns, run in blocks of
///     block_cols): r = Dᵀ dy and the
///     SwiGLU backward into dg, du and w·h;
///   - dx tiles (≤ dx_cols columns of dx, every item in order): dx += dg G + du U;
///   - gradient tiles (an MLP's items, rows of ∂D or of ∂G and ∂U): the weight gradients.
/// Every output element belongs to exactly one tile and is summed in a fixed order, so the
/// result is the same for every thread count. Storage is reused from batch to batch.
class backward_schedule {
 public:
  static constexpr index dh_rows = 32;
  static constexpr index dh_cols = 256;
  static constexpr index dx_cols = 256;
  /// Columns the dh and dx kernels work on at a time (tiles run their blocks in order).
  static constexpr index block_cols = 64;
  static constexpr index down_grad_rows = 64;
  static constexpr index gate_up_grad_rows = 24;
  /// Floats of the per-thread buffer into which dh and dx tiles pack chunks of weight panels.
  static constexpr index pack_floats = 4096;

  void build(const expert_schedule<float>& schedule, const weights_span<float>& grads) {
    const std::size_t capacities[] = {dh_tiles_.capacity(), gradient_tiles_.capacity(), grads_.capacity(),
                                      gradient_items_.capacity()};
    dh_tiles_.clear();
    gradient_tiles_.clear();
    grads_.clear();
    gradient_items_.clear();
    hidden_ = schedule.hidden();
    max_inter_ = 0;
    const auto items = schedule.items();
    for (std::size_t i = 0; i < items.size(); ++i) {
      const auto& item = items[i];
      swiglu_weights<float> g = item.adjugate ? grads.adjugate(item.id) : grads.expert(item.id);
      grads_.push_back(item_gradients{g.gate.data(), g.up.data(), g.down.data()});
      max_inter_ = std::max(max_inter_, item.inter);
      const auto n = static_cast<std::int32_t>(i);
      for (index r = 0; r < item.row_count; r += dh_rows)
        for (index c = 0; c < item.inter; c += dh_cols)
          dh_tiles_.push_back(gate_up_tile{n, narrow(r), narrow(std::min(r + dh_rows, item.row_count)), narrow(c),
                                           narrow(std::min(c + dh_cols, item.inter))});
    }
    // Gradient tiles: each routed expert's own, then its group's adjugate over all the group's
    // adjugate items (once per token one, once per pick one per picked expert), so that one
    // tile, not several racing ones, adds into each row of the adjugate's gradient.
    for (const group_span& group : schedule.groups()) {
      for (std::int32_t i = group.item_begin; i < group.item_end; ++i)
        if (!items[static_cast<std::size_t>(i)].adjugate) {
          const auto first = static_cast<std::int32_t>(gradient_items_.size());
          gradient_items_.push_back(i);
          add_gradient_tiles(items[static_cast<std::size_t>(i)].inter, first);
        }
      const auto first = static_cast<std::int32_t>(gradient_items_.size());
      for (std::int32_t i = group.item_begin; i < group.item_end; ++i)
        if (items[static_cast<std::size_t>(i)].adjugate) gradient_items_.push_back(i);
      if (static_cast<std::int32_t>(gradient_items_.size()) > first)
        add_gradient_tiles(items[static_cast<std::size_t>(gradient_items_.back())].inter, first);
    }
    const std::size_t now[] = {dh_tiles_.capacity(), gradient_tiles_.capacity(), grads_.capacity(),
                               gradient_items_.capacity()};
    for (std::size_t i = 0; i < std::size(now); ++i) allocations_ += now[i] != capacities[i];
  }

  [[nodiscard]] std::span<const gate_up_tile> dh_tiles() const { return dh_tiles_; }
  [[nodiscard]] std::span<const gradient_tile> gradient_tiles() const { return gradient_tiles_; }
  [[nodiscard]] std::span<const item_gradients> gradients() const { return grads_; }
  /// The items of each gradient tile's MLP (gradient_tile::first, last index into this).
  [[nodiscard]] std::span<const std::int32_t> gradient_items() const { return gradient_items_; }
  [[nodiscard]] index dx_tiles() const { return grads_.empty() ? 0 : (hidden_ + dx_cols - 1) / dx_cols; }
  /// Partial sums of ⟨r, h⟩ kept per row: one per block of 64 columns of the widest item.
  [[nodiscard]] index dot_blocks() const { return (max_inter_ + block_cols - 1) / block_cols; }
  [[nodiscard]] std::size_t bytes() const {
    return dh_tiles_.capacity() * sizeof(gate_up_tile) + gradient_tiles_.capacity() * sizeof(gradient_tile) +
           grads_.capacity() * sizeof(item_gradients) + gradient_items_.capacity() * sizeof(std::int32_t);
  }
  [[nodiscard]] std::size_t allocations() const { return allocations_; }

 private:
  static std::int32_t narrow(index v) { return static_cast<std::int32_t>(v); }

  /// The gradient tiles of the MLP whose items are gradient_items_[first, end): ∂D in blocks of
  /// down_grad_rows of its H rows, ∂G and ∂U in blocks of gate_up_grad_rows of its `inter` rows.
  void add_gradient_tiles(index inter, std::int32_t first) {
    const auto last = static_cast<std::int32_t>(gradient_items_.size());
    for (index r = 0; r < hidden_; r += down_grad_rows)
      gradient_tiles_.push_back(
          gradient_tile{first, last, narrow(r), narrow(std::min(r + down_grad_rows, hidden_)), true});
    for (index r = 0; r < inter; r += gate_up_grad_rows)
      gradient_tiles_.push_back(
          gradient_tile{first, last, narrow(r), narrow(std::min(r + gate_up_grad_rows, inter)), false});
  }

  std::vector<gate_up_tile> dh_tiles_;
  std::vector<gradient_tile> gradient_tiles_;
  std::vector<item_gradients> grads_;
  std::vector<std::int32_t> gradient_items_;
  index hidden_ = 0;
  index max_inter_ = 0;
  std::size_t allocations_ = 0;
};

}  // namespace detail
GROVE_END_NAMESPACE
