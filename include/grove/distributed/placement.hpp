#pragma once

// Which rank holds which groups. A group (its E/G routed experts and its adjugate) never splits
// across ranks, so that each adjugate is still evaluated once per (token, group) and its weight
// c_j, a sum over that group's picks only, is known where it runs.

#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "grove/config/dynamic.hpp"
#include "grove/error.hpp"

GROVE_BEGIN_NAMESPACE

/// A placement of G groups on P ranks: rank r holds the contiguous groups
/// [first_group(r), first_group(r + 1)), at least one each (so P ≤ G). Contiguous ranges keep a
/// token's groups in ascending order when its partials come back rank by rank, the order of the
/// canonical sum (plan/combine.hpp).
class group_placement {
 public:
  group_placement() = default;

  /// Rank r holds `group_counts[r]` groups, ranks in order. Throws grove::error unless every
  /// count is at least 1.
  explicit group_placement(std::span<const index> group_counts) {
    detail::require(!group_counts.empty(), "grove: a group placement needs one rank at least");
    starts_.assign(1, 0);
    for (std::size_t r = 0; r < group_counts.size(); ++r) {
      detail::require(group_counts[r] >= 1, "grove: group placement: rank ", r, " would hold ", group_counts[r],
                      " groups; every rank holds one at least");
      starts_.push_back(starts_.back() + group_counts[r]);
    }
  }

  /// The placement balanced by count: G / P groups each, the first G mod P ranks one more.
  /// Throws grove::error unless 1 ≤ P ≤ G.
  [[nodiscard]] static group_placement balanced(index groups, int ranks) {
    detail::require(ranks >= 1, "grove: group placement: the rank count P = ", ranks, " must be at least 1");
    detail::require(groups >= ranks, "grove: group placement: P = ", ranks, " ranks need G >= P groups (G = ", groups,
                    "); a group never splits across ranks");
    std::vector<index> counts(static_cast<std::size_t>(ranks), groups / ranks);
    for (index r = 0; r < groups % ranks; ++r) ++counts[static_cast<std::size_t>(r)];
    return group_placement(counts);
  }

  [[nodiscard]] int ranks() const { return static_cast<int>(starts_.size()) - 1; }
  [[nodiscard]] index groups() const { return starts_.empty() ? 0 : starts_.back(); }
  [[nodiscard]] index first_group(int rank) const { return starts_[static_cast<std::size_t>(rank)]; }
  [[nodiscard]] index end_group(int rank) const { return starts_[static_cast<std::size_t>(rank) + 1]; }
  [[nodiscard]] index group_count(int rank) const { return end_group(rank) - first_group(rank); }
  /// The groups of `rank`, ascending (what restrict_to_groups and only_groups take).
  [[nodiscard]] std::vector<index> groups_of(int rank) const {
    std::vector<index> out;
    for (index j = first_group(rank); j < end_group(rank); ++j) out.push_back(j);
    return out;
  }
  /// The rank that holds group j.
  [[nodiscard]] int owner_of(index group) const {
    int lo = 0, hi = ranks() - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first_group(mid) <= group) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
  /// "0-2 | 3-4 | 5-6": the groups of each rank, for logs and errors.
  [[nodiscard]] std::string describe() const {
    std::string out;
    for (int r = 0; r < ranks(); ++r) {
      if (r) out += " | ";
      out += std::to_string(first_group(r));
      if (group_count(r) > 1) out += "-" + std::to_string(end_group(r) - 1);
    }
    return out;
  }

  friend bool operator==(const group_placement&, const group_placement&) = default;

 private:
  std::vector<index> starts_;  // [P + 1]
};

GROVE_END_NAMESPACE
