#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <vector>

#include <Eigen/Core>

#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

/// Tile sizes of the fused expert pass (docs/performance.md, "Schedule"). A gate/up tile is
/// (item, ≤ gate_up_rows of its rows, ≤ gate_up_cols of its intermediate columns); a down tile
/// is ≤ down_cols columns of y over every item. The defaults keep a tile's weight panel in L2.
/// The CPU runner takes gate_up_rows and gate_up_cols up to 64 (a tile's scratch is on the stack).
struct schedule_shape {
  index gate_up_rows = 64;
  index gate_up_cols = 32;
  index down_cols = 64;
};

namespace detail {

/// How the kernels see a weight element: float, or the bits of a bf16 (Eigen::bfloat16 is a
/// standard-layout wrapper of one unsigned short).
template <class W>
struct weight_bits {
  using type = W;
};
template <>
struct weight_bits<Eigen::bfloat16> {
  using type = std::uint16_t;
};
template <class W>
using weight_bits_t = typename weight_bits<W>::type;

/// One unit of expert work: a routed expert or an adjugate with the plan rows it processes.
/// Routed experts and adjugates are items of the same kind; only their sizes differ.
template <class W>
struct expert_item {
  const W* gate = nullptr;  ///< [inter, H]
  const W* up = nullptr;    ///< [inter, H]
  const W* down = nullptr;  ///< [H, inter]
  index inter = 0;          ///< I or Ia
  const dispatch_row<float>* rows = nullptr;
  index row_count = 0;
  index h_offset = 0;  ///< where this item's [row_count, inter] block of h starts in the workspace
  index first_row = 0; ///< the plan's row number of its first row (expert rows, then adjugate rows)
  std::int32_t id = 0;
  bool adjugate = false;
};

/// (item, rows [row_begin, row_end), intermediate columns [col_begin, col_end)) of the gate/up
/// phase. Tiles write disjoint parts of h, so they may run in any order on any thread.
struct gate_up_tile {
  std::int32_t item;
  std::int32_t row_begin, row_end;
  std::int32_t col_begin, col_end;
};

/// The work of one batch, built from a routing_plan (docs/performance.md, "Schedule"): the
/// items in the fixed order in which their outputs are summed into y (routed experts by index,
/// then adjugates by index, each over its rows in the plan's ascending token order), the
/// gate/up tiles, and the number of down tiles. Building reuses the storage of the previous
/// batch: no allocation once it has seen a batch as large.
template <class W>
class expert_schedule {
 public:
  using item_type = expert_item<weight_bits_t<W>>;

  void build(const layer_weights<const W>& weights, const routing_plan<float>& plan, const schedule_shape& shape) {
    const layer_dims& d = weights.dims();
    detail::require(plan.experts == d.experts && plan.groups == d.groups,
                    "grove: the routing plan was made for another layer (E or G differ)");
    detail::require(shape.gate_up_rows >= 1 && shape.gate_up_cols >= 1 && shape.down_cols >= 1,
                    "grove: schedule tile sizes must be positive");
    const std::size_t item_capacity = items_.capacity(), tile_capacity = tiles_.capacity();
    shape_ = shape;
    hidden_ = d.hidden;
    tokens_ = plan.tokens;
    items_.clear();
    tiles_.clear();
    h_elements_ = 0;
    row_total_ = 0;
    max_rows_ = 0;
    auto add = [&](const swiglu_weights<const W>& mlp, std::span<const dispatch_row<float>> rows, index id,
                   bool adjugate) {
      if (rows.empty()) return;
      item_type item;
      item.gate = reinterpret_cast<const weight_bits_t<W>*>(mlp.gate.data());
      item.up = reinterpret_cast<const weight_bits_t<W>*>(mlp.up.data());
      item.down = reinterpret_cast<const weight_bits_t<W>*>(mlp.down.data());
      item.inter = mlp.gate.rows();
      item.rows = rows.data();
      item.row_count = static_cast<index>(rows.size());
      item.h_offset = h_elements_;
      item.first_row = row_total_;
      row_total_ += item.row_count;
      item.id = static_cast<std::int32_t>(id);
      item.adjugate = adjugate;
      h_elements_ += item.row_count * item.inter;
      max_rows_ = std::max(max_rows_, item.row_count);
      const auto item_index = static_cast<std::int32_t>(items_.size());
      items_.push_back(item);
      for (index r = 0; r < item.row_count; r += shape.gate_up_rows)
        for (index c = 0; c < item.inter; c += shape.gate_up_cols)
          tiles_.push_back(gate_up_tile{item_index, static_cast<std::int32_t>(r),
                                        static_cast<std::int32_t>(std::min(r + shape.gate_up_rows, item.row_count)),
                                        static_cast<std::int32_t>(c),
                                        static_cast<std::int32_t>(std::min(c + shape.gate_up_cols, item.inter))});
    };
    for (index e = 0; e < d.experts; ++e) add(weights.expert(e), plan.rows_of_expert(e), e, false);
    for (index j = 0; j < d.groups; ++j) add(weights.adjugate(j), plan.rows_of_adjugate(j), j, true);
    allocations_ += (items_.capacity() != item_capacity) + (tiles_.capacity() != tile_capacity);
  }

  [[nodiscard]] std::span<const item_type> items() const { return items_; }
  [[nodiscard]] std::span<const gate_up_tile> gate_up_tiles() const { return tiles_; }
  /// Down tiles: column blocks of y, each summing every item in item order.
  [[nodiscard]] index down_tiles() const { return tokens_ == 0 ? 0 : (hidden_ + shape_.down_cols - 1) / shape_.down_cols; }
  [[nodiscard]] const schedule_shape& shape() const { return shape_; }
  [[nodiscard]] index hidden() const { return hidden_; }
  [[nodiscard]] index tokens() const { return tokens_; }
  /// Elements of h (the SwiGLU outputs of every row of every item).
  [[nodiscard]] index h_elements() const { return h_elements_; }
  [[nodiscard]] index max_item_rows() const { return max_rows_; }
  /// Rows of every item together (the plan's expert rows and adjugate rows).
  [[nodiscard]] index row_total() const { return row_total_; }
  /// Bytes of the schedule's own storage (its capacity).
  [[nodiscard]] std::size_t bytes() const {
    return items_.capacity() * sizeof(item_type) + tiles_.capacity() * sizeof(gate_up_tile);
  }
  /// Times build() had to grow its storage.
  [[nodiscard]] std::size_t allocations() const { return allocations_; }

 private:
  std::vector<item_type> items_;
  std::vector<gate_up_tile> tiles_;
  schedule_shape shape_{};
  index hidden_ = 0;
  index tokens_ = 0;
  index h_elements_ = 0;
  index row_total_ = 0;
  index max_rows_ = 0;
  std::size_t allocations_ = 0;
};

}  // namespace detail

namespace detail {

/// A 64-byte aligned buffer that only grows: get(n) returns storage for n elements, allocating
/// only when n exceeds what it already holds (and counting those allocations), so a workspace
/// sized by one batch serves every batch up to that size without touching the heap. Elements
/// are not initialised.
template <class T>
class growing_buffer {
 public:
  T* get(std::size_t n) {
    if (n > capacity_) {
      data_.reset(static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})));
      capacity_ = n;
      ++allocations_;
    }
    return data_.get();
  }
  [[nodiscard]] std::size_t bytes() const { return capacity_ * sizeof(T); }
  [[nodiscard]] std::size_t allocations() const { return allocations_; }

 private:
  struct aligned_delete {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<T, aligned_delete> data_;
  std::size_t capacity_ = 0;
  std::size_t allocations_ = 0;
};

}  // namespace detail
GROVE_END_NAMESPACE
