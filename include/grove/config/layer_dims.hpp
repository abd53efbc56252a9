#pragma once

#include <span>
#include <string>
#include <string_view>

#include "grove/config/dynamic.hpp"
#include "grove/error.hpp"

GROVE_BEGIN_NAMESPACE

/// The tensor sizes of one Grove MoE layer: everything a checkpoint's shapes determine.
/// See docs/config.md; the symbols follow docs/math.md (H, E, G, I, Ia).
struct layer_dims {
  index hidden = 0;                  ///< H
  index experts = 0;                 ///< E, routed experts
  index groups = 0;                  ///< G, groups = adjugate experts
  index expert_intermediate = 0;     ///< I, routed expert intermediate size
  index adjugate_intermediate = 0;   ///< Ia, adjugate intermediate size

  /// E / G consecutive experts share one adjugate; expert e belongs to group e / group_size().
  [[nodiscard]] GROVE_HOST_DEVICE constexpr index group_size() const { return groups > 0 ? experts / groups : 0; }
  /// SwiGLU MLPs of the layer, E + G, numbered as plan/dispatch.hpp's mlp_numbering does: routed
  /// expert e is MLP e, the adjugate of group j is MLP E + j.
  [[nodiscard]] GROVE_HOST_DEVICE constexpr index mlps() const { return experts + groups; }
  /// Intermediate size of MLP m: I for a routed expert, Ia for an adjugate.
  [[nodiscard]] GROVE_HOST_DEVICE constexpr index intermediate(index m) const {
    return m < experts ? expert_intermediate : adjugate_intermediate;
  }

  /// Throws grove::error naming the first size that cannot describe a Grove layer.
  void validate() const {
    auto positive = [](index v, const char* what) {
      detail::require(v > 0, std::string("grove: ") + what + " must be positive, got " +
                                 std::to_string(v));
    };
    positive(hidden, "hidden size H");
    positive(experts, "expert count E");
    positive(groups, "group count G");
    positive(expert_intermediate, "expert intermediate size I");
    positive(adjugate_intermediate, "adjugate intermediate size Ia");
    detail::require(experts % groups == 0,
                    "grove: group count G = " + std::to_string(groups) +
                        " does not divide expert count E = " + std::to_string(experts));
  }

  friend bool operator==(const layer_dims&, const layer_dims&) = default;
};

/// Parameters read per token: the router, k routed experts and n_g adjugates (docs/math.md).
[[nodiscard]] inline index activated_parameters(const layer_dims& d, index top_k,
                                                index distinct_groups) {
  return d.experts * d.hidden + top_k * 3 * d.hidden * d.expert_intermediate +
         distinct_groups * 3 * d.hidden * d.adjugate_intermediate;
}

/// All parameters of the layer (router, every expert, every adjugate; the selection bias,
/// a buffer, is not counted).
[[nodiscard]] inline index total_parameters(const layer_dims& d) {
  return d.experts * d.hidden + d.experts * 3 * d.hidden * d.expert_intermediate +
         d.groups * 3 * d.hidden * d.adjugate_intermediate;
}

namespace detail {

/// Checks a list of whole groups (a shard of a layer: restrict_to_groups, layer_weights::
/// only_groups). Sorted and without repeats, so that membership is a binary search and two
/// shards built from one list agree on the order; each in [0, G). `what` names the caller.
inline void require_group_list(std::span<const index> groups, index group_count, std::string_view what) {
  for (std::size_t i = 0; i < groups.size(); ++i) {
    detail::require(groups[i] >= 0 && groups[i] < group_count, "grove: ", what, ": group ", groups[i], " (entry ", i,
                    ") lies outside [0, G = ", group_count, ")");
    if (i > 0)
      detail::require(groups[i] > groups[i - 1], "grove: ", what, ": group ", groups[i], " (entry ", i,
                      ") does not follow group ", groups[i - 1],
                      "; the groups must be sorted ascending without repeats");
  }
}

}  // namespace detail

GROVE_END_NAMESPACE
