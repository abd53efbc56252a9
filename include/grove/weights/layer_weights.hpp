#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/formats/weight_format.hpp"
#include "grove/weights/tensor_types.hpp"

GROVE_BEGIN_NAMESPACE

/// The three projections of one SwiGLU MLP, `down(silu(gate x) * up x)`, as maps in PyTorch's
/// [out, in] layout: gate and up are [intermediate, H], down is [H, intermediate].
template <class T>
struct swiglu_weights {
  matrix_map<T> gate;
  matrix_map<T> up;
  matrix_map<T> down;
};

/// Which tensor of a Grove layer a name refers to (docs/math.md, "Weights").
enum class tensor_role { router, expert_gate, expert_up, expert_down, adjugate_gate, adjugate_up,
                         adjugate_down, selection_bias };

/// One tensor of a layer as checkpoints name it: `name` is relative to the layer prefix
/// (`experts.3.up_proj.weight`), `owner` the expert or adjugate index (or -1).
struct tensor_info {
  std::string name;
  tensor_role role;
  index owner;
  index rows;
  index cols;  ///< 1 for the selection bias
  [[nodiscard]] index size() const { return rows * cols; }
};

/// The group a tensor belongs to (its expert's, or its adjugate's); -1 for the router and the
/// bias, which belong to no group: every shard of a layer holds them.
[[nodiscard]] inline index group_of_tensor(const tensor_info& info, index group_size) {
  switch (info.role) {
    case tensor_role::expert_gate:
    case tensor_role::expert_up:
    case tensor_role::expert_down: return info.owner / group_size;
    case tensor_role::adjugate_gate:
    case tensor_role::adjugate_up:
    case tensor_role::adjugate_down: return info.owner;
    case tensor_role::router:
    case tensor_role::selection_bias: break;
  }
  return -1;
}

/// Whether a shard of `held_groups` (sorted; empty: every group) holds the tensor `info`
/// describes: the router and the bias always, an expert or an adjugate when its group is held.
/// The one rule of layer_weights::holds and layer_parameters' buffers.
[[nodiscard]] inline bool holds_tensor(std::span<const index> held_groups, const tensor_info& info, index group_size) {
  const index group = group_of_tensor(info, group_size);
  return group < 0 || held_groups.empty() || std::binary_search(held_groups.begin(), held_groups.end(), group);
}

namespace detail {
/// Whether T is a block format's storage (q8, q4): its tensors have no Eigen view.
template <class T>
constexpr bool holds_blocks() {
  if constexpr (weight_storage<T>)
    return is_block_format<T>;
  else
    return false;
}
}  // namespace detail

/// The three tensors of one MLP as pointers to their first storage unit, with its intermediate
/// size: how kernels that address rows themselves (every format, the block ones included) see it.
template <class T>
struct mlp_tensors {
  T* gate;  ///< [inter, H]
  T* up;    ///< [inter, H]
  T* down;  ///< [H, inter]
  index inter;
};

/// Pointers to every tensor of one layer, with the sizes that give them shape. `T` is
/// `const Scalar` for a read-only view (`weights_view`) or `Scalar` for a writable one
/// (`weights_span`, for gradients and optimizers). The memory belongs to someone else:
/// the caller, or a `layer_parameters`.
template <class T>
class layer_weights {
 public:
  using scalar = std::remove_const_t<T>;

  layer_weights() = default;
  /// Every tensor unset; bind them with the set_ functions.
  explicit layer_weights(const layer_dims& dims)
      : dims_(dims), expert_ptrs_(3 * static_cast<std::size_t>(dims.experts), nullptr),
        adjugate_ptrs_(3 * static_cast<std::size_t>(dims.groups), nullptr) {
    dims_.validate();
  }

  /// A writable view converts to a read-only one.
  template <class U>
    requires(std::is_const_v<T> && std::is_same_v<U, std::remove_const_t<T>>)
  layer_weights(const layer_weights<U>& other)  // NOLINT(google-explicit-constructor)
      : dims_(other.dims_), router_(other.router_), bias_(other.bias_),
        expert_ptrs_(other.expert_ptrs_.begin(), other.expert_ptrs_.end()),
        adjugate_ptrs_(other.adjugate_ptrs_.begin(), other.adjugate_ptrs_.end()),
        held_groups_(other.held_groups_) {}

  [[nodiscard]] const layer_dims& dims() const { return dims_; }

  /// Router W_r, [E, H]. (Element formats only, as expert() and adjugate(): a block format's
  /// tensors are blocks in panels of 16 rows; see expert_tensors.)
  [[nodiscard]] matrix_map<T> router() const
    requires(!detail::holds_blocks<std::remove_const_t<T>>())
  {
    return {router_, dims_.experts, dims_.hidden};
  }
  /// Routed expert e.
  [[nodiscard]] swiglu_weights<T> expert(index e) const
    requires(!detail::holds_blocks<std::remove_const_t<T>>())
  {
    return mlp(&expert_ptrs_[3 * static_cast<std::size_t>(e)], dims_.expert_intermediate);
  }
  /// Adjugate expert j (of group j).
  [[nodiscard]] swiglu_weights<T> adjugate(index j) const
    requires(!detail::holds_blocks<std::remove_const_t<T>>())
  {
    return mlp(&adjugate_ptrs_[3 * static_cast<std::size_t>(j)], dims_.adjugate_intermediate);
  }
  /// Expert e's and adjugate j's tensors as pointers, in any format.
  [[nodiscard]] mlp_tensors<T> expert_tensors(index e) const {
    const auto at = 3 * static_cast<std::size_t>(e);
    return {expert_ptrs_[at], expert_ptrs_[at + 1], expert_ptrs_[at + 2], dims_.expert_intermediate};
  }
  [[nodiscard]] mlp_tensors<T> adjugate_tensors(index j) const {
    const auto at = 3 * static_cast<std::size_t>(j);
    return {adjugate_ptrs_[at], adjugate_ptrs_[at + 1], adjugate_ptrs_[at + 2], dims_.adjugate_intermediate};
  }
  /// The router's first unit (for a block format, its blocks in panels of 16 rows).
  [[nodiscard]] T* router_data() const { return router_; }
  /// Selection bias b, [E]; nullptr means all zeros (the released weights).
  [[nodiscard]] T* bias() const { return bias_; }

  void set_router(T* data) { router_ = data; }
  void set_bias(T* data) { bias_ = data; }
  void set_expert(index e, T* gate, T* up, T* down) { set3(expert_ptrs_, e, dims_.experts, "expert", gate, up, down); }
  void set_adjugate(index j, T* gate, T* up, T* down) { set3(adjugate_ptrs_, j, dims_.groups, "adjugate", gate, up, down); }

  /// Calls `fn(const tensor_info&, T*& pointer)` for every tensor in checkpoint order: router,
  /// experts 0..E-1 (gate, up, down), adjugates 0..G-1 (gate, up, down), then the bias.
  /// I/O, gradients and optimizers walk the layer through this one function.
  template <class Fn>
  void for_each_tensor(Fn&& fn) {
    walk(*this, fn);
  }
  template <class Fn>
  void for_each_tensor(Fn&& fn) const {
    walk(*this, fn);
  }

  /// A copy that holds only the listed whole groups (their routed experts and their adjugate),
  /// under their global ids: what one process of an expert-parallel layer keeps. The experts
  /// and adjugates of every other group are unbound (nullptr); the router and the bias stay, as
  /// every process routes. Runs with a plan restricted to the same groups (restrict_to_groups).
  /// `groups`: sorted ascending, no repeats, each in [0, G), not empty, and held by this view.
  [[nodiscard]] layer_weights only_groups(std::span<const index> groups) const {
    detail::require_group_list(groups, dims_.groups, "only_groups");
    // An empty list would read back as "all groups" (held_groups), so a shard holds one at least.
    detail::require(!groups.empty(), "grove: only_groups: the group list is empty (a view holds one group at least)");
    for (const index j : groups)
      detail::require(holds_group(j), "grove: only_groups: group ", j, " is not held by this weights view");
    layer_weights shard = *this;
    shard.held_groups_.assign(groups.begin(), groups.end());
    const index group_size = dims_.group_size();
    for (index j = 0; j < dims_.groups; ++j) {
      if (shard.holds_group(j)) continue;
      for (index e = j * group_size; e < (j + 1) * group_size; ++e) shard.set_expert(e, nullptr, nullptr, nullptr);
      shard.set_adjugate(j, nullptr, nullptr, nullptr);
    }
    return shard;
  }

  /// Whether group j's experts and adjugate belong to this view: every group of [0, G) unless
  /// the view was made by only_groups.
  [[nodiscard]] bool holds_group(index j) const {
    if (j < 0 || j >= dims_.groups) return false;
    return held_groups_.empty() || std::binary_search(held_groups_.begin(), held_groups_.end(), j);
  }
  /// The groups this view holds, ascending; empty when it holds all of them.
  [[nodiscard]] std::span<const index> held_groups() const { return held_groups_; }
  /// Whether the tensor `info` describes belongs to this view: the router and the bias always,
  /// an expert or an adjugate when its group is held.
  [[nodiscard]] bool holds(const tensor_info& info) const { return holds_tensor(held_groups_, info, dims_.group_size()); }

  /// Throws grove::error naming the first tensor that was never bound. A view made by
  /// only_groups needs only the tensors of the groups it holds (and the router).
  void require_complete() const {
    for_each_tensor([&](const tensor_info& info, T* const& p) {
      if (info.role == tensor_role::selection_bias || !holds(info)) return;
      detail::require(p != nullptr, "grove: missing tensor '" + info.name + "' in layer weights");
    });
  }

 private:
  template <class>
  friend class layer_weights;

  swiglu_weights<T> mlp(T* const* p, index inter) const {
    return {matrix_map<T>(p[0], inter, dims_.hidden), matrix_map<T>(p[1], inter, dims_.hidden),
            matrix_map<T>(p[2], dims_.hidden, inter)};
  }
  static void set3(std::vector<T*>& ptrs, index i, index count, const char* what, T* a, T* b, T* c) {
    detail::require(i >= 0 && i < count, std::string("grove: ") + what + " index " +
                                             std::to_string(i) + " out of range [0, " +
                                             std::to_string(count) + ")");
    auto at = 3 * static_cast<std::size_t>(i);
    ptrs[at] = a;
    ptrs[at + 1] = b;
    ptrs[at + 2] = c;
  }

  template <class Self, class Fn>
  static void walk(Self& self, Fn& fn) {
    const layer_dims& d = self.dims_;
    fn(tensor_info{"gate.weight", tensor_role::router, -1, d.experts, d.hidden}, self.router_);
    static constexpr const char* proj[3] = {"gate_proj", "up_proj", "down_proj"};
    auto walk_mlps = [&](auto& ptrs, const char* family, index count, index inter, tensor_role first) {
      for (index i = 0; i < count; ++i)
        for (int p = 0; p < 3; ++p) {
          const bool down = p == 2;
          fn(tensor_info{std::string(family) + "." + std::to_string(i) + "." + proj[p] + ".weight",
                         static_cast<tensor_role>(static_cast<int>(first) + p), i,
                         down ? d.hidden : inter, down ? inter : d.hidden},
             ptrs[3 * static_cast<std::size_t>(i) + static_cast<std::size_t>(p)]);
        }
    };
    walk_mlps(self.expert_ptrs_, "experts", d.experts, d.expert_intermediate, tensor_role::expert_gate);
    walk_mlps(self.adjugate_ptrs_, "chunk_experts", d.groups, d.adjugate_intermediate,
              tensor_role::adjugate_gate);
    fn(tensor_info{"expert_bias", tensor_role::selection_bias, -1, d.experts, 1}, self.bias_);
  }

  layer_dims dims_{};
  T* router_ = nullptr;
  T* bias_ = nullptr;
  std::vector<T*> expert_ptrs_;    // 3 per expert: gate, up, down
  std::vector<T*> adjugate_ptrs_;  // 3 per adjugate
  std::vector<index> held_groups_;  // ascending; empty: every group (see only_groups)
};

/// Read-only view of a layer's weights in memory someone else owns.
template <class Scalar>
using weights_view = layer_weights<const Scalar>;
/// Writable view: gradients, optimizer updates, in-place initialisation.
template <class Scalar>
using weights_span = layer_weights<Scalar>;

GROVE_END_NAMESPACE
