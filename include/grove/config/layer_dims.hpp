#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <string>
#include <string_view>

#include "grove/config/dynamic.hpp"
#include "grove/error.hpp"

GROVE_BEGIN_NAMESPACE

namespace detail {

/// The most parameters a layer may hold (2^60): its bytes in any format, 8-byte double
/// included, still fit a signed 64-bit size.
inline constexpr index max_layer_parameters = index{1} << 60;

/// The product of non-negative `factors`, or -1 when it exceeds max_layer_parameters (checked
/// before each multiplication, so nothing wraps).
inline index bounded_product(std::initializer_list<index> factors) {
  index product = 1;
  for (index f : factors) {
    if (f != 0 && product > max_layer_parameters / f) return -1;
    product *= f;
  }
  return product;
}

}  // namespace detail

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
    // Sizes come from files and command lines. Each must fit an int (kernels count in int), and
    // every product below (parameter counts, then bytes in the widest format, 8-byte double)
    // must fit a signed 64-bit index: an overflow would size a buffer smaller than the loops
    // that fill it. The bound, detail::max_layer_parameters, is far beyond any memory.
    auto fits_int = [](index v, const char* what) {
      detail::require(v <= std::numeric_limits<std::int32_t>::max(), "grove: ", what, " = ", v,
                      " is too large (at most 2^31 - 1)");
    };
    fits_int(hidden, "hidden size H");
    fits_int(experts, "expert count E");
    fits_int(groups, "group count G");
    fits_int(expert_intermediate, "expert intermediate size I");
    fits_int(adjugate_intermediate, "adjugate intermediate size Ia");
    const index router = detail::bounded_product({experts, hidden});
    const index routed = detail::bounded_product({experts, 3, hidden, expert_intermediate});
    const index adjugates = detail::bounded_product({groups, 3, hidden, adjugate_intermediate});
    // The router, its fp32 copy (BF16 layers), the bias and the experts, each bounded, add up
    // without overflow.
    const bool fits = router >= 0 && routed >= 0 && adjugates >= 0 &&
                      2 * router + experts + routed + adjugates <= detail::max_layer_parameters;
    detail::require(fits, "grove: layer sizes H = ", hidden, ", E = ", experts, ", G = ", groups, ", I = ",
                    expert_intermediate, ", Ia = ", adjugate_intermediate, " are too large: ",
                    adjugates < 0 ? "the adjugates alone (G * 3 * H * Ia)"
                    : routed < 0  ? "the experts alone (E * 3 * H * I)"
                                  : "the layer",
                    " would hold more than 2^60 parameters, whose bytes a 64-bit size cannot count");
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
