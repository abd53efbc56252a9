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
#include "grove/kernels/cpu/format_kernels.hpp"
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
  index first_row = 0; ///< the schedule's number of its first row (rows of all items, in item order)
  std::int32_t id = 0;
  bool adjugate = false;
};

/// The items of one group, in the order of the canonical sum (plan/combine.hpp): its routed
/// experts by ascending id, each followed by its per-pick adjugate item in once_per_pick mode,
/// then its adjugate in once_per_token mode. `rows` are the group's rows: its distinct tokens in
/// ascending order (the plan's rows_of_adjugate(group)), the rows of its partial p(t, g); each
/// item row knows its place among them (expert_schedule::group_slots).
struct group_span {
  std::int32_t group = 0;
  std::int32_t item_begin = 0, item_end = 0;
  const dispatch_row<float>* rows = nullptr;
  index row_count = 0;
  index first_row = 0;  ///< the plan's group-row number of rows[0] (its adjugate_offsets[group])
};

/// (item, rows [row_begin, row_end), intermediate columns [col_begin, col_end)) of the gate/up
/// phase. Tiles write disjoint parts of h, so they may run in any order on any thread.
struct gate_up_tile {
  std::int32_t item;
  std::int32_t row_begin, row_end;
  std::int32_t col_begin, col_end;
};

/// The work of one batch, built from a routing_plan (docs/performance.md, "Schedule"): the
/// items group by group in the order of the canonical sum (group_span), each over its rows in
/// the plan's ascending token order, the gate/up tiles, and the number of down tiles. The plan's
/// adjugate_mode says which adjugate items there are. Building reuses the storage of the previous
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
    const std::size_t capacities[] = {items_.capacity(), spans_.capacity(), tiles_.capacity(),
                                      groups_.capacity(), slots_.capacity(), pick_rows_.capacity()};
    shape_ = shape;
    hidden_ = d.hidden;
    tokens_ = plan.tokens;
    items_.clear();
    spans_.clear();
    tiles_.clear();
    groups_.clear();
    row_total_ = 0;
    max_rows_ = 0;
    max_group_rows_ = 0;
    const bool per_pick = plan.adjugates == adjugate_mode::once_per_pick;
    const bool per_token = plan.adjugates == adjugate_mode::once_per_token;
    const float lambda = static_cast<float>(plan.scale);
    // Per-pick adjugate rows: the expert rows with weight λ·w_s (sized before any item points in).
    if (per_pick) per_pick_adjugate_rows<float>(plan.expert_rows, lambda, pick_rows_);
    slots_.resize(plan.expert_rows.size() * (per_pick ? 2 : 1) + (per_token ? plan.adjugate_rows.size() : 0));
    // h keeps the plan's layout whatever the item order (saved_activations documents it): expert
    // rows at their plan offsets (I each), then adjugate rows (Ia each), then per-pick rows.
    const index I = d.expert_intermediate, Ia = d.adjugate_intermediate;
    const index expert_h = static_cast<index>(plan.expert_rows.size()) * I;
    const index adjugate_h = static_cast<index>(plan.adjugate_rows.size()) * Ia;
    h_elements_ = expert_h + adjugate_h + (per_pick ? static_cast<index>(plan.expert_rows.size()) * Ia : 0);
    for (index j = 0; j < d.groups; ++j) {
      const std::span<const dispatch_row<float>> group_rows = plan.rows_of_adjugate(j);
      if (group_rows.empty()) {
        detail::require(plan.expert_offsets[static_cast<std::size_t>(j * d.group_size())] ==
                            plan.expert_offsets[static_cast<std::size_t>((j + 1) * d.group_size())],
                        "grove: routing plan: group ", j, " has picks but no group rows (adjugate rows); set "
                        "plan.adjugates = adjugate_mode::none to leave the adjugates out");
        continue;
      }
      group_span span;
      span.group = static_cast<std::int32_t>(j);
      span.item_begin = static_cast<std::int32_t>(items_.size());
      span.rows = group_rows.data();
      span.row_count = static_cast<index>(group_rows.size());
      span.first_row = plan.adjugate_offsets[static_cast<std::size_t>(j)];
      max_group_rows_ = std::max(max_group_rows_, span.row_count);
      for (index e = j * d.group_size(); e < (j + 1) * d.group_size(); ++e) {
        const std::span<const dispatch_row<float>> rows = plan.rows_of_expert(e);
        if (rows.empty()) continue;
        const index first = row_total_;
        const auto at = static_cast<std::size_t>(rows.data() - plan.expert_rows.data());
        add(weights.expert_tensors(e), rows, e, false, shape, static_cast<index>(at) * I);
        place_in_group(group_rows, rows, first, j);
        if (per_pick) {
          const index first_pick = row_total_;
          add(weights.adjugate_tensors(j), std::span<const dispatch_row<float>>(pick_rows_).subspan(at, rows.size()), j, true,
              shape, expert_h + adjugate_h + static_cast<index>(at) * Ia, /*with_gate_up_tiles=*/false);
          std::copy_n(slots_.begin() + first, rows.size(), slots_.begin() + first_pick);
        }
      }
      if (per_pick) {
        // The group's per-pick adjugate items are consecutive in pick_rows_ and in h, so their
        // gate/up products run as one span: the adjugate's gate and up weights stream once per
        // 64 rows of the whole group, not once per picked expert (a row's h is the same either way).
        const auto begin = static_cast<std::size_t>(plan.expert_offsets[static_cast<std::size_t>(j * d.group_size())]);
        const auto end = static_cast<std::size_t>(plan.expert_offsets[static_cast<std::size_t>((j + 1) * d.group_size())]);
        add_gate_up_span(weights.adjugate_tensors(j), std::span<const dispatch_row<float>>(pick_rows_).subspan(begin, end - begin),
                         j, shape, expert_h + adjugate_h + static_cast<index>(begin) * Ia);
      }
      if (per_token) {
        const index first = row_total_;
        add(weights.adjugate_tensors(j), group_rows, j, true, shape, expert_h + span.first_row * Ia);
        for (index r = 0; r < span.row_count; ++r)
          slots_[static_cast<std::size_t>(first + r)] = static_cast<std::int32_t>(r);
      }
      span.item_end = static_cast<std::int32_t>(items_.size());
      groups_.push_back(span);
    }
    const std::size_t now[] = {items_.capacity(), spans_.capacity(), tiles_.capacity(), groups_.capacity(),
                               slots_.capacity(), pick_rows_.capacity()};
    for (std::size_t i = 0; i < std::size(now); ++i) allocations_ += now[i] != capacities[i];
  }

  [[nodiscard]] std::span<const item_type> items() const { return items_; }
  /// The gate/up tiles; each tile's `item` numbers gate_up_spans().
  [[nodiscard]] std::span<const gate_up_tile> gate_up_tiles() const { return tiles_; }
  /// What the gate/up tiles run over: every item, except that in once_per_pick mode a group's
  /// per-pick adjugate items are one span (their rows and h blocks are consecutive). Only the
  /// weights, rows, inter and h_offset of a span are meaningful.
  [[nodiscard]] std::span<const item_type> gate_up_spans() const { return spans_; }
  /// The groups with rows, ascending, each with its items.
  [[nodiscard]] std::span<const group_span> groups() const { return groups_; }
  /// For every item row (numbered by first_row), its place among its group's rows.
  [[nodiscard]] const std::int32_t* group_slots() const { return slots_.data(); }
  /// Rows of the largest group (the per-thread partial scratch of a down or dx tile).
  [[nodiscard]] index max_group_rows() const { return max_group_rows_; }
  /// Down tiles: column blocks of y, each summing every group in order.
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
    return (items_.capacity() + spans_.capacity()) * sizeof(item_type) + tiles_.capacity() * sizeof(gate_up_tile) +
           groups_.capacity() * sizeof(group_span) + slots_.capacity() * sizeof(std::int32_t) +
           pick_rows_.capacity() * sizeof(dispatch_row<float>);
  }
  /// Times build() had to grow its storage.
  [[nodiscard]] std::size_t allocations() const { return allocations_; }

 private:
  void add(const mlp_tensors<const W>& mlp, std::span<const dispatch_row<float>> rows, index id, bool adjugate,
           const schedule_shape& shape, index h_offset, bool with_gate_up_tiles = true) {
    detail::require(mlp.gate != nullptr && mlp.up != nullptr && mlp.down != nullptr,
                    "grove: the plan has rows for ", adjugate ? "adjugate " : "expert ", id,
                    " but the weights do not hold it (a weights view of other groups?)");
    item_type item;
    item.gate = reinterpret_cast<const weight_bits_t<W>*>(mlp.gate);
    item.up = reinterpret_cast<const weight_bits_t<W>*>(mlp.up);
    item.down = reinterpret_cast<const weight_bits_t<W>*>(mlp.down);
    item.inter = mlp.inter;
    item.rows = rows.data();
    item.row_count = static_cast<index>(rows.size());
    item.h_offset = h_offset;
    item.first_row = row_total_;
    row_total_ += item.row_count;
    item.id = static_cast<std::int32_t>(id);
    item.adjugate = adjugate;
    max_rows_ = std::max(max_rows_, item.row_count);
    items_.push_back(item);
    if (with_gate_up_tiles) add_tiles(item, shape);
  }

  /// A gate/up span that is not an item of its own (the per-pick adjugate rows of one group).
  void add_gate_up_span(const mlp_tensors<const W>& mlp, std::span<const dispatch_row<float>> rows, index group,
                        const schedule_shape& shape, index h_offset) {
    item_type span;
    span.gate = reinterpret_cast<const weight_bits_t<W>*>(mlp.gate);
    span.up = reinterpret_cast<const weight_bits_t<W>*>(mlp.up);
    span.down = reinterpret_cast<const weight_bits_t<W>*>(mlp.down);
    span.inter = mlp.inter;
    span.rows = rows.data();
    span.row_count = static_cast<index>(rows.size());
    span.h_offset = h_offset;
    span.id = static_cast<std::int32_t>(group);
    span.adjugate = true;
    add_tiles(span, shape);
  }

  void add_tiles(const item_type& span, const schedule_shape& shape) {
    const auto span_index = static_cast<std::int32_t>(spans_.size());
    spans_.push_back(span);
    for (index r = 0; r < span.row_count; r += shape.gate_up_rows)
      for (index c = 0; c < span.inter; c += shape.gate_up_cols)
        tiles_.push_back(gate_up_tile{span_index, static_cast<std::int32_t>(r),
                                      static_cast<std::int32_t>(std::min(r + shape.gate_up_rows, span.row_count)),
                                      static_cast<std::int32_t>(c),
                                      static_cast<std::int32_t>(std::min(c + shape.gate_up_cols, span.inter))});
  }

  /// Each row of an expert of group j: its place among the group's rows (both lists ascend by
  /// token, so one merge finds them all).
  void place_in_group(std::span<const dispatch_row<float>> group_rows, std::span<const dispatch_row<float>> rows,
                      index first, index j) {
    std::size_t at = 0;
    for (std::size_t r = 0; r < rows.size(); ++r) {
      while (at < group_rows.size() && group_rows[at].token < rows[r].token) ++at;
      detail::require(at < group_rows.size() && group_rows[at].token == rows[r].token, "grove: routing plan: token ",
                      rows[r].token, " has a pick in group ", j, " but is not among the group's rows");
      slots_[static_cast<std::size_t>(first) + r] = static_cast<std::int32_t>(at);
    }
  }

  std::vector<item_type> items_;
  std::vector<item_type> spans_;
  std::vector<gate_up_tile> tiles_;
  std::vector<group_span> groups_;
  std::vector<std::int32_t> slots_;
  std::vector<dispatch_row<float>> pick_rows_;
  schedule_shape shape_{};
  index hidden_ = 0;
  index tokens_ = 0;
  index h_elements_ = 0;
  index row_total_ = 0;
  index max_rows_ = 0;
  index max_group_rows_ = 0;
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
