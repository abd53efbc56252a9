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

/// Rows [begin, end) of one item's weight gradient: of ∂D (H rows of `inter`) when `down`,
/// otherwise of ∂G and ∂U together (`inter` rows of H). Each tile owns its rows outright.
struct gradient_tile {
  std::int32_t item;
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
///   - gradient tiles (item, rows of ∂D or of ∂G and ∂U): the weight gradients.
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
    const std::size_t capacities[] = {dh_tiles_.capacity(), gradient_tiles_.capacity(), grads_.capacity()};
    dh_tiles_.clear();
    gradient_tiles_.clear();
    grads_.clear();
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
      for (index r = 0; r < hidden_; r += down_grad_rows)
        gradient_tiles_.push_back(gradient_tile{n, narrow(r), narrow(std::min(r + down_grad_rows, hidden_)), true});
      for (index r = 0; r < item.inter; r += gate_up_grad_rows)
        gradient_tiles_.push_back(
            gradient_tile{n, narrow(r), narrow(std::min(r + gate_up_grad_rows, item.inter)), false});
    }
    allocations_ += (dh_tiles_.capacity() != capacities[0]) + (gradient_tiles_.capacity() != capacities[1]) +
                    (grads_.capacity() != capacities[2]);
  }

  [[nodiscard]] std::span<const gate_up_tile> dh_tiles() const { return dh_tiles_; }
  [[nodiscard]] std::span<const gradient_tile> gradient_tiles() const { return gradient_tiles_; }
  [[nodiscard]] std::span<const item_gradients> gradients() const { return grads_; }
  [[nodiscard]] index dx_tiles() const { return grads_.empty() ? 0 : (hidden_ + dx_cols - 1) / dx_cols; }
  /// Partial sums of ⟨r, h⟩ kept per row: one per block of 64 columns of the widest item.
  [[nodiscard]] index dot_blocks() const { return (max_inter_ + block_cols - 1) / block_cols; }
  [[nodiscard]] std::size_t bytes() const {
    return dh_tiles_.capacity() * sizeof(gate_up_tile) + gradient_tiles_.capacity() * sizeof(gradient_tile) +
           grads_.capacity() * sizeof(item_gradients);
  }
  [[nodiscard]] std::size_t allocations() const { return allocations_; }

 private:
  static std::int32_t narrow(index v) { return static_cast<std::int32_t>(v); }

  std::vector<gate_up_tile> dh_tiles_;
  std::vector<gradient_tile> gradient_tiles_;
  std::vector<item_gradients> grads_;
  index hidden_ = 0;
  index max_inter_ = 0;
  std::size_t allocations_ = 0;
};

}  // namespace detail
GROVE_END_NAMESPACE
