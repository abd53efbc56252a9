#pragma once

// Which rank holds which groups. A group (its E/G routed experts and its adjugate) never splits
// across ranks, so that each adjugate is still evaluated once per (token, group) and its weight
// c_j, a sum over that group's picks only, is known where it runs.

#include <algorithm>
#include <cstddef>
#include <limits>
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

  /// The placement by measured load: contiguous whole groups whose largest per-rank load is as
  /// small as it can be, where a group's load is the picks of its experts (`expert_load`, E
  /// entries: activation_stats::expert_load of a representative batch, or counts summed over
  /// many). A hot group gets a rank to itself or shares one with cold neighbours; like DeepSeek's
  /// EPLB it balances what the ranks compute, but it keeps each rank's groups contiguous, which
  /// the canonical order of the partials' sum relies on. Among the placements with that largest
  /// load it takes the most even one (the smallest sum of squared rank loads), and among those
  /// the one whose earlier ranks hold more groups: the result depends on the loads only. Throws grove::error
  /// unless 1 ≤ P ≤ G, G divides E = expert_load.size() and every load is ≥ 0.
  [[nodiscard]] static group_placement by_load(std::span<const index> expert_load, index groups, int ranks) {
    const auto experts = static_cast<index>(expert_load.size());
    detail::require(groups >= 1 && experts >= groups && experts % groups == 0, "grove: group placement by load: ",
                    experts, " expert loads cannot form G = ", groups, " groups of equal size");
    (void)balanced(groups, ranks);  // its checks of P against G
    const index group_size = experts / groups;
    // prefix[j]: the load of groups [0, j).
    std::vector<index> prefix(static_cast<std::size_t>(groups) + 1, 0);
    for (index j = 0; j < groups; ++j) {
      index load = 0;
      for (index e = j * group_size; e < (j + 1) * group_size; ++e) {
        const index picks = expert_load[static_cast<std::size_t>(e)];
        detail::require(picks >= 0, "grove: group placement by load: expert ", e, " has the negative load ", picks);
        load += picks;
      }
      prefix[static_cast<std::size_t>(j) + 1] = prefix[static_cast<std::size_t>(j)] + load;
    }
    const auto load_of = [&](index first, index end) {
      return prefix[static_cast<std::size_t>(end)] - prefix[static_cast<std::size_t>(first)];
    };
    // 1. best[p][j]: the smallest largest load of groups [0, j) on ranks [0, p), each rank one
    //    group at least. O(P·G²): G is at most a few hundred.
    const auto P = static_cast<std::size_t>(ranks);
    const auto G = static_cast<std::size_t>(groups);
    constexpr index unreachable = std::numeric_limits<index>::max();
    std::vector<std::vector<index>> best(P + 1, std::vector<index>(G + 1, unreachable));
    best[0][0] = 0;
    for (std::size_t p = 1; p <= P; ++p)
      for (std::size_t j = p; j + (P - p) <= G; ++j)
        for (std::size_t i = p - 1; i < j; ++i)
          best[p][j] = std::min(best[p][j], std::max(best[p - 1][i], load_of(static_cast<index>(i), static_cast<index>(j))));
    const index limit = best[P][G];
    // 2. Among the placements whose ranks all stay within that load, the one with the smallest
    //    sum of squared rank loads (the most even); cut[p][j]: where rank p-1's groups begin.
    //    Ties go to the last rank's latest start, so the earlier ranks keep more groups.
    const double none = std::numeric_limits<double>::infinity();
    std::vector<std::vector<double>> spread(P + 1, std::vector<double>(G + 1, none));
    std::vector<std::vector<std::size_t>> cut(P + 1, std::vector<std::size_t>(G + 1, 0));
    spread[0][0] = 0.0;
    for (std::size_t p = 1; p <= P; ++p) {
      for (std::size_t j = p; j + (P - p) <= G; ++j) {
        for (std::size_t i = j; i-- > p - 1;) {
          const index load = load_of(static_cast<index>(i), static_cast<index>(j));
          if (load > limit || spread[p - 1][i] == none) continue;
          const double value = spread[p - 1][i] + static_cast<double>(load) * static_cast<double>(load);
          if (value < spread[p][j]) {
            spread[p][j] = value;
            cut[p][j] = i;
          }
        }
      }
    }
    std::vector<index> counts(P);
    std::size_t end = G;
    for (std::size_t p = P; p >= 1; --p) {
      const std::size_t first = cut[p][end];
      counts[p - 1] = static_cast<index>(end - first);
      end = first;
    }
    return group_placement(counts);
  }

  /// Each rank's load under this placement: the picks of its groups' experts (`expert_load` as
  /// for by_load).
  [[nodiscard]] std::vector<index> rank_loads(std::span<const index> expert_load) const {
    const auto experts = static_cast<index>(expert_load.size());
    detail::require(groups() >= 1 && experts >= groups() && experts % groups() == 0, "grove: group placement: ", experts,
                    " expert loads cannot form the placement's G = ", groups(), " groups");
    const index group_size = experts / groups();
    std::vector<index> loads(static_cast<std::size_t>(ranks()), 0);
    for (index e = 0; e < experts; ++e)
      loads[static_cast<std::size_t>(owner_of(e / group_size))] += expert_load[static_cast<std::size_t>(e)];
    return loads;
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
