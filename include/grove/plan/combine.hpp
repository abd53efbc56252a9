#pragma once

// The canonical sum of a layer's output (docs/routing.md, "The canonical sum"): the one order in
// which every backend, every process count and the combine below add up a token's terms, so that
// an expert-parallel run gives the bits of a single process.
//
// For a token t, each picked group g has a partial p(t, g): an fma chain from +0 over g's picked
// experts in ascending id (term w_s · E_e(x)), then g's adjugate (term λ·c_g · A_g(x); in
// once_per_pick mode each pick's adjugate term λ·w_s · A_g(x) follows its pick). Then
//   y_t = (…((+0 + p(t, g1)) + p(t, g2)) + …)   over t's groups in ascending order.
// dx follows the same rule with the caller's dx in place of +0.

#include <type_traits>

#include "grove/config/dynamic.hpp"
#include "grove/error.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/weights/tensor_types.hpp"

GROVE_BEGIN_NAMESPACE

/// Adds per-group partials into `out` in the canonical order: `partials` has one row per group
/// row of `plan` (its adjugate rows: row r is p(token, group) of adjugate_rows[r]), and row r is
/// added to out[token]. Starting from out = 0 this is y, bit for bit what the runner's combined
/// forward writes; starting from the caller's dx it is the dx rule. `partials` may hold just some
/// groups' rows (a shard's), as long as every shard's combine runs in ascending group order.
template <class Scalar>
void combine_partials(const routing_plan<Scalar>& plan, std::type_identity_t<const_rows_ref<Scalar>> partials,
                      std::type_identity_t<rows_ref<Scalar>> out) {
  detail::require(partials.rows() == plan.group_row_count(), "grove: combine_partials: the partials have ",
                  partials.rows(), " rows but the plan has ", plan.group_row_count(), " group rows");
  detail::require(out.rows() == plan.tokens && out.cols() == partials.cols(), "grove: combine_partials: out is [",
                  out.rows(), ", ", out.cols(), "] but must be [T, H] = [", plan.tokens, ", ", partials.cols(), "]");
  const index H = partials.cols();
  // Group rows are stored group by group in ascending group order: one pass is the canonical order.
  for (index r = 0; r < plan.group_row_count(); ++r) {
    const index t = plan.adjugate_rows[static_cast<std::size_t>(r)].token;
    Scalar* to = out.data() + t * out.outerStride();
    const Scalar* from = partials.data() + r * partials.outerStride();
    for (index c = 0; c < H; ++c) to[c] = to[c] + from[c];
  }
}

GROVE_END_NAMESPACE
