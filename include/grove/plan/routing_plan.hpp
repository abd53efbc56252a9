#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "grove/config/dynamic.hpp"
#include "grove/plan/dispatch.hpp"
#include "grove/weights/tensor_types.hpp"

GROVE_BEGIN_NAMESPACE

/// The routing decision for one batch, computed once (grove::route) and then consumed by
/// every expert kernel, the backward pass and every backend. It holds the per-token view
/// (logits, picks, weights, distinct groups) and the per-expert view (which rows each routed
/// expert and each activated adjugate processes, rows as in plan/dispatch.hpp), built by counting
/// sort so that no adjugate
/// appears twice for a token (docs/routing.md, "The routing plan").
///
/// A plan can be routed again in place (grove::route_into): its storage is reused, so a steady
/// stream of batches of one size allocates nothing.
template <class Scalar>
struct routing_plan {
  index tokens = 0;
  index experts = 0;
  index groups = 0;
  index group_size = 0;
  index top_k = 0;
  double scale = 0.0;  ///< λ
  /// How adjugates enter the experts' pass (plan/dispatch.hpp). The plan's adjugate rows are there
  /// in every mode: they are also the group rows, the (token, group) pairs of the partials.
  adjugate_mode adjugates = adjugate_mode::once_per_token;

  // ---- per token ----
  row_matrix<Scalar> logits;              ///< [T, E] router logits l = W_r x
  row_matrix<std::int32_t> topk_ids;      ///< [T, k] picks, descending selection score, ties lower index first
  row_matrix<Scalar> topk_weights;        ///< [T, k] w_s = softmax over the picked logits
  row_matrix<std::int32_t> token_groups;  ///< [T, max_groups] distinct groups in order of first pick, -1 padded
  row_matrix<Scalar> group_weights;       ///< [T, max_groups] c_j = Σ of the group's picked weights
  std::vector<std::int32_t> groups_per_token;  ///< n_g for each token

  // ---- per expert (dispatch) ----
  std::vector<index> expert_offsets;                ///< [E + 1] rows of expert e: [offsets[e], offsets[e+1])
  std::vector<dispatch_row<Scalar>> expert_rows;    ///< T·k rows, grouped by expert, tokens ascending
  std::vector<index> adjugate_offsets;              ///< [G + 1]
  /// Σ n_g rows, grouped by adjugate, tokens ascending: each (token, picked group) once, weight
  /// λ·c_j. They double as the group rows: row r of the partials (runner::forward_partials) is
  /// p(adjugate_rows[r].token, its group), and plan/combine.hpp sums them in this order.
  std::vector<dispatch_row<Scalar>> adjugate_rows;

  /// Scratch of route_into (top-k scores and counting-sort cursors), kept so that routing into a
  /// reused plan allocates nothing. Not part of the plan's value.
  struct routing_scratch {
    std::vector<Scalar> scores;
    std::vector<index> cursor;
  } scratch;

  /// The most distinct groups a token can touch: min(k, G).
  [[nodiscard]] index max_groups() const { return top_k < groups ? top_k : groups; }

  [[nodiscard]] std::span<const dispatch_row<Scalar>> rows_of_expert(index e) const {
    return rows_between(expert_rows, expert_offsets, e);
  }
  [[nodiscard]] std::span<const dispatch_row<Scalar>> rows_of_adjugate(index j) const {
    return rows_between(adjugate_rows, adjugate_offsets, j);
  }
  /// Picks that went to expert e in this batch (what load balancing counts).
  [[nodiscard]] index expert_load(index e) const {
    return expert_offsets[static_cast<std::size_t>(e) + 1] - expert_offsets[static_cast<std::size_t>(e)];
  }
  /// Adjugate evaluations this batch in once_per_token mode: Σ over tokens of n_g.
  [[nodiscard]] index adjugate_evaluations() const { return static_cast<index>(adjugate_rows.size()); }
  /// (token, picked group) pairs: the rows of the per-group partials, Σ over tokens of n_g.
  [[nodiscard]] index group_row_count() const { return static_cast<index>(adjugate_rows.size()); }

 private:
  static std::span<const dispatch_row<Scalar>> rows_between(const std::vector<dispatch_row<Scalar>>& rows,
                                                            const std::vector<index>& offsets, index i) {
    const auto begin = static_cast<std::size_t>(offsets[static_cast<std::size_t>(i)]);
    const auto end = static_cast<std::size_t>(offsets[static_cast<std::size_t>(i) + 1]);
    return std::span<const dispatch_row<Scalar>>(rows).subspan(begin, end - begin);
  }
};

namespace detail {

/// The rows of adjugate_mode::once_per_pick's adjugate evaluations for the expert rows `picks`:
/// the same (token, pick slot), weight λ·w_s. The fused schedule and the plain forward and
/// backward all form them here, so that they weigh every per-pick term alike.
template <class Scalar>
void per_pick_adjugate_rows(std::span<const dispatch_row<Scalar>> picks, Scalar lambda,
                            std::vector<dispatch_row<Scalar>>& out) {
  out.resize(picks.size());
  for (std::size_t r = 0; r < picks.size(); ++r) {
    out[r] = picks[r];
    out[r].weight = lambda * picks[r].weight;
  }
}

}  // namespace detail
GROVE_END_NAMESPACE
