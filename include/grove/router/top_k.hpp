#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "grove/config/dynamic.hpp"
#include "grove/error.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

template <class Scalar>
Scalar sigmoid(Scalar z) {
  return Scalar(1) / (Scalar(1) + std::exp(-z));
}

/// Selects the k experts with the largest selection score (docs/math.md, step 2) and writes
/// them to `ids` in descending score, ties to the lower index. The score is
/// `sigmoid(l_e) + b_e`; without a bias (b == nullptr) it is l_e itself, which orders the same
/// but does not saturate (fp32 sigmoid is exactly 1 above l ≈ 17, which would turn real
/// differences into ties). `scores` is caller scratch of at least k entries. `Count` is `index`,
/// or std::integral_constant<index, K> when k is fixed at compile time (the loops then have
/// constant bounds and `scores` can live on the stack).
template <class Scalar, class Count>
void select_top_k(const Scalar* logits, const Scalar* bias, index experts, Count k, std::int32_t* ids,
                  Scalar* scores, index token) {
  index filled = 0;
  for (index e = 0; e < experts; ++e) {
    const Scalar l = logits[e];
    if (std::isnan(l))
      throw error("grove: router logit of token " + std::to_string(token) + " for expert " +
                  std::to_string(e) + " is NaN (check the input x and gate.weight)");
    const Scalar s = bias ? sigmoid(l) + bias[e] : l;
    // Experts arrive in ascending index, so an equal score goes after the one already held:
    // that is the lower-index-first tie-break.
    if (filled == k && !(s > scores[k - 1])) continue;
    index pos = filled < k ? filled : k - 1;
    while (pos > 0 && s > scores[pos - 1]) {
      scores[pos] = scores[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    scores[pos] = s;
    ids[pos] = static_cast<std::int32_t>(e);
    if (filled < k) ++filled;
  }
}

/// w_s = softmax(l)[e_s] / Σ softmax(l)[e_s'], computed as the softmax of the picked logits
/// alone (the same value, without the E-wide sum; docs/math.md, step 3).
template <class Scalar, class Count>
void picked_softmax(const Scalar* logits, const std::int32_t* ids, Count k, Scalar* weights) {
  Scalar top = logits[ids[0]];
  for (index s = 1; s < k; ++s) top = std::max(top, logits[ids[s]]);
  Scalar sum = 0;
  for (index s = 0; s < k; ++s) sum += (weights[s] = std::exp(logits[ids[s]] - top));
  for (index s = 0; s < k; ++s) weights[s] /= sum;
}

}  // namespace detail
GROVE_END_NAMESPACE
