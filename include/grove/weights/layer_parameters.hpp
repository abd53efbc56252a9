#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/formats/format_traits.hpp"
#include "grove/weights/huge_page_allocator.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/random.hpp"

GROVE_BEGIN_NAMESPACE

/// A layer's weights, owned, in any format of the format table (formats/weight_format.hpp):
/// `layer_parameters<float>`, `<double>`, `<bf16>`, `<q8_block>` or `<q4_block>`. The trainable tensors (router, experts,
/// adjugates) lie in one flat buffer in checkpoint order and PyTorch's [out, in] layout, so an
/// optimizer or a gradient accumulator treats them as one vector; gradients of a layer are a
/// layer_parameters too. The selection bias is a separate buffer in the routing type, because
/// it is not trained by gradients (docs/math.md, "Load balancing").
///
/// Routing reads the router and the bias in the activation type (fp32 for BF16, whose logits
/// are always fp32, docs/math.md step 1): routing_view() is them. For a format with the table's
/// `fp32_routing_copy`, an fp32 copy of the router (exact for BF16) is kept beside the tensors.
///
///   auto w = grove::layer_parameters<grove::bf16>::from(params.view());   // fp32 → bf16
///   auto plan = grove::route(w.routing_view(), {k, lambda}, x);
///   runner.forward(w.view(), plan, x, y);
///
/// A *shard* holds the router, the bias and some whole groups only (their experts and adjugates,
/// under their global ids): what one rank of an expert-parallel layer keeps, with the memory of
/// those groups alone (docs/distributed.md). Its views are those of layer_weights::only_groups.
///
///   auto mine = grove::layer_parameters<float>::shard(dims, placement.groups_of(rank));
///
/// A block format (q8, q4) keeps each tensor row as blocks of 32 values, in panels of 16 rows
/// (formats/quantized.hpp, "Panels"; panels_to_rows gives ggml's row layout back).
/// It is made from weights of another format (from(), io::load_layer), never trained, and
/// routes with an fp32 router copied from that source before quantizing: the picks are the
/// source's, bit for bit.
///
/// Large buffers are 2 MiB aligned and advised to use huge pages (huge_page_allocator).
template <weight_storage Storage>
class layer_parameters {
 public:
  using storage = Storage;
  /// The type of the router copy and the bias that routing reads: float for BF16.
  using routing_scalar = activation_t<Storage>;

  layer_parameters() = default;

  /// All tensors zero, bias zero.
  explicit layer_parameters(const layer_dims& dims)
      : dims_(dims), values_(units_for((dims.validate(), dims), {}), Storage{}),
        bias_(static_cast<std::size_t>(dims.experts), routing_scalar(0)) {
    if constexpr (has_routing_copy) router_.assign(static_cast<std::size_t>(dims.experts * dims.hidden), 0.0f);
  }

  /// A shard: the router, the bias and the listed whole groups, all zero. `groups`: sorted
  /// ascending, without repeats, each in [0, G), not empty.
  [[nodiscard]] static layer_parameters shard(const layer_dims& dims, std::span<const index> groups) {
    dims.validate();
    detail::require_group_list(groups, dims.groups, "layer_parameters::shard");
    detail::require(!groups.empty(), "grove: layer_parameters::shard: the group list is empty (a shard holds one group at least)");
    layer_parameters p;
    p.dims_ = dims;
    p.held_groups_.assign(groups.begin(), groups.end());
    p.values_.assign(units_for(dims, groups), Storage{});
    p.bias_.assign(static_cast<std::size_t>(dims.experts), routing_scalar(0));
    if constexpr (has_routing_copy) p.router_.assign(static_cast<std::size_t>(dims.experts * dims.hidden), 0.0f);
    return p;
  }

  /// Every trainable weight drawn from N(0, stddev²) with a fixed, portable generator (rounded
  /// to the format once); bias zero.
  static layer_parameters random(const layer_dims& dims, std::uint64_t seed, double stddev) {
    if constexpr (is_block_format<Storage>) {
      // The fp32 draws, quantized: the same draws as every other format's.
      return from(layer_parameters<float>::random(dims, seed, stddev).view());
    } else {
      layer_parameters p(dims);
      detail::normal_generator gen(seed);
      for (Storage& v : p.values_) v = format_traits<Storage>::from_float(stddev * gen.normal());
      p.refresh_routing();
      return p;
    }
  }

  /// `weights` in this format: each tensor converted once (rounded to nearest even into BF16,
  /// quantized row by row into a block format), the bias kept in the routing type. A view of
  /// some groups (only_groups) gives a shard of the same groups. A block format's fp32 routing
  /// copy is the source's router (exact from f32 and bf16), not its quantized one.
  template <weight_storage From>
  static layer_parameters from(const weights_view<From>& weights)
    requires(!is_block_format<From>)
  {
    weights.require_complete();
    layer_parameters out = weights.held_groups().empty() ? layer_parameters(weights.dims())
                                                         : shard(weights.dims(), weights.held_groups());
    std::size_t at = 0;
    std::vector<float> row;
    std::vector<Storage> rows_of_blocks;  // a block format's tensor in row layout, before its panels
    weights.for_each_tensor([&](const tensor_info& info, const From* const& p) {
      if (info.role == tensor_role::selection_bias) {
        if (p != nullptr) widen(p, static_cast<std::size_t>(info.rows), out.bias_.data());
        return;
      }
      if (!out.holds(info)) return;
      if constexpr (is_block_format<Storage>) {
        // Quantized row by row in ggml's layout, then repacked into panels (formats/quantized.hpp).
        const index units = units_per_row<Storage>(info.cols);
        row.resize(static_cast<std::size_t>(info.cols));
        rows_of_blocks.resize(static_cast<std::size_t>(info.rows * units));
        for (index r = 0; r < info.rows; ++r) {
          decode_row(p + r * info.cols, info.cols, row.data());
          encode_row(row.data(), info.cols, rows_of_blocks.data() + r * units);
          if (info.role == tensor_role::router)
            std::copy(row.begin(), row.end(), out.router_.begin() + r * info.cols);
        }
        rows_to_panels(rows_of_blocks.data(), info.rows, units, out.values_.data() + at);
        at += static_cast<std::size_t>(info.rows * units);
      } else {
        for (index i = 0; i < info.size(); ++i)
          out.values_[at + static_cast<std::size_t>(i)] =
              format_traits<Storage>::from_float(format_traits<From>::to_float(p[i]));
        at += static_cast<std::size_t>(info.size());
      }
    });
    out.refresh_routing();
    return out;
  }

  [[nodiscard]] const layer_dims& dims() const { return dims_; }
  /// The groups a shard holds, ascending; empty when every group is held.
  [[nodiscard]] std::span<const index> held_groups() const { return held_groups_; }

  /// Read-only view of every tensor; valid while this object lives (moving it keeps the
  /// buffers). For a format with an fp32 routing copy the bias is not in this view (it is not
  /// a tensor of this format): see routing_view().
  [[nodiscard]] weights_view<Storage> view() const { return bind<const Storage>(values_.data(), own_bias()); }
  /// Writable view (gradients, optimizers, loading a checkpoint in place). After writing the
  /// router of a format with a routing copy through it, call refresh_routing().
  [[nodiscard]] weights_span<Storage> span() { return bind<Storage>(values_.data(), own_bias()); }

  /// What grove::route reads: the router and the bias in the routing type. For f32 and f64 it
  /// is view() itself; for BF16 the fp32 router copy and the fp32 bias (expert tensors unset).
  [[nodiscard]] weights_view<routing_scalar> routing_view() const {
    if constexpr (has_routing_copy) {
      weights_view<routing_scalar> w(dims_);
      w.set_router(router_.data());
      w.set_bias(bias_.data());
      return w;
    } else {
      return view();
    }
  }

  /// Recomputes the routing copy of the router after the tensors were written through span();
  /// nothing to do for a format without one, nor for a block format, whose copy is the fp32
  /// source's (set by from() and the loaders through routing_router()).
  void refresh_routing() {
    if constexpr (has_routing_copy && !is_block_format<Storage>) {
      // The router is the first tensor in checkpoint order.
      widen(static_cast<const Storage*>(values_.data()), router_.size(), router_.data());
    }
  }

  /// The fp32 routing copy of the router, [E, H] row-major, for formats that keep one: what a
  /// loader of a block format fills from the checkpoint's router.
  [[nodiscard]] std::span<float> routing_router()
    requires(info_of<Storage>().fp32_routing_copy)
  {
    return router_;
  }

  /// The trainable weights as one vector (router, experts, adjugates, in checkpoint order).
  [[nodiscard]] std::span<Storage> values() { return values_; }
  [[nodiscard]] std::span<const Storage> values() const { return values_; }
  /// The selection bias b, [E], in the routing type.
  [[nodiscard]] std::span<routing_scalar> bias() { return bias_; }
  [[nodiscard]] std::span<const routing_scalar> bias() const { return bias_; }

  /// Bytes held: every tensor (of a shard: its groups' and the router), the routing copy and
  /// the bias.
  [[nodiscard]] std::size_t bytes() const { return bytes_for(dims_, held_groups_); }
  /// What bytes() is for a layer of these dims, or for a shard of the listed groups (empty:
  /// every group).
  [[nodiscard]] static std::size_t bytes_for(const layer_dims& dims, std::span<const index> groups = {}) {
    const auto experts = static_cast<std::size_t>(dims.experts);
    const std::size_t copy = has_routing_copy ? experts * static_cast<std::size_t>(dims.hidden) * sizeof(float) : 0;
    return units_for(dims, groups) * sizeof(Storage) + copy + experts * sizeof(routing_scalar);
  }

  /// Storage units of a tensor: rows × its row's units (values, or blocks for a block format).
  [[nodiscard]] static index units_of(const tensor_info& info) { return info.rows * units_per_row<Storage>(info.cols); }

  /// Sets every trainable weight to zero (gradients between steps); the bias is untouched.
  void zero_values() {
    std::fill(values_.begin(), values_.end(), Storage{});
    refresh_routing();
  }

 private:
  static constexpr bool has_routing_copy = info_of<Storage>().fp32_routing_copy;
  static_assert(!has_routing_copy || std::is_same_v<routing_scalar, float>,
                "GROVE_A_ROUTING_COPY_IS_FP32");

  /// The bias as a tensor of this format, or null when it is kept in another type.
  [[nodiscard]] Storage* own_bias() const {
    if constexpr (std::is_same_v<routing_scalar, Storage>)
      return const_cast<Storage*>(bias_.data());  // view() binds it read-only
    else
      return nullptr;
  }

  /// Whether a tensor's memory is here: the router, and every expert and adjugate of a held group.
  [[nodiscard]] bool holds(const tensor_info& info) const { return holds_tensor(held_groups_, info, dims_.group_size()); }

  /// The storage units of a layer of these dims, or of a shard of the listed groups.
  static std::size_t units_for(const layer_dims& dims, std::span<const index> groups) {
    index units = 0;
    weights_view<float>(dims).for_each_tensor([&](const tensor_info& info, const float* const&) {
      if (info.role != tensor_role::selection_bias && holds_tensor(groups, info, dims.group_size()))
        units += units_of(info);
    });
    return static_cast<std::size_t>(units);
  }

  template <class T>
  layer_weights<T> bind(T* values, T* bias) const {
    layer_weights<T> w(dims_);
    T* cursor = values;
    w.for_each_tensor([&](const tensor_info& info, T*& p) {
      if (info.role == tensor_role::selection_bias) {
        p = bias;
      } else if (holds(info)) {
        p = cursor;
        cursor += units_of(info);
      }
    });
    return held_groups_.empty() ? w : w.only_groups(held_groups_);
  }

  template <class T>
  using buffer = std::vector<T, detail::huge_page_allocator<T>>;

  layer_dims dims_{};
  std::vector<index> held_groups_;  // a shard's groups, ascending; empty: every group
  buffer<Storage> values_;
  std::vector<routing_scalar> bias_;
  std::vector<float> router_;  // the fp32 routing copy of the router, for formats that keep one
};

GROVE_END_NAMESPACE
