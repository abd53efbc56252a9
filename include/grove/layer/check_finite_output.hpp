#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <Eigen/Core>

#include "grove/config/dynamic.hpp"
#include "grove/error.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE

/// The first entry of `rows` (a [T, n] block, one row per token) that is a NaN or an infinity,
/// as (token, column); nullopt when every entry is finite.
template <class Derived>
[[nodiscard]] std::optional<std::pair<index, index>> first_non_finite(const Eigen::DenseBase<Derived>& rows) {
  for (index t = 0; t < rows.rows(); ++t)
    for (index c = 0; c < rows.cols(); ++c)
      if (!std::isfinite(static_cast<double>(rows(t, c)))) return std::pair{t, c};
  return std::nullopt;
}

/// Throws grove::error naming `what`, the first token (row) that holds a NaN or an infinity,
/// its column and the value. Finite inputs can still give such outputs: an input near the
/// largest float overflows the router logits (then the softmax gives NaN), a huge λ overflows y.
/// Opt-in, one pass over the values: the layer itself never checks (its steady-state forward
/// reads and writes only what it must); `grove run` calls it on every result.
template <class Derived>
void check_finite_rows(const Eigen::DenseBase<Derived>& rows, std::string_view what) {
  if (const auto at = first_non_finite(rows))
    throw error("grove: non-finite output: " + std::string(what) + " holds " +
                std::to_string(static_cast<double>(rows(at->first, at->second))) + " at token " +
                std::to_string(at->first) + ", column " + std::to_string(at->second) +
                " (the first token with a NaN or an infinity)");
}

/// check_finite_rows on what a forward returns: y [T, H], then the plan's router logits [T, E]
/// and routing weights [T, k].
template <class Scalar, class Derived>
void check_finite_output(const routing_plan<Scalar>& plan, const Eigen::DenseBase<Derived>& y) {
  check_finite_rows(y, "y");
  check_finite_rows(plan.logits, "router_logits");
  check_finite_rows(plan.topk_weights, "topk_weights");
}

GROVE_END_NAMESPACE
