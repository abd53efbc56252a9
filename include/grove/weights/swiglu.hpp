#pragma once

#include <cmath>

#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// silu(z) = z·σ(z), the SwiGLU activation (docs/math.md, step 4). Written as z / (1 + e^{-z}):
/// for very negative z the denominator overflows to +inf and the result is -0, not NaN.
template <class Scalar>
Scalar silu(Scalar z) {
  return z / (Scalar(1) + std::exp(-z));
}

/// d silu / dz = σ(z)(1 + z(1 − σ(z))), used by backward (docs/math.md, "Backward").
template <class Scalar>
Scalar silu_derivative(Scalar z) {
  const Scalar s = Scalar(1) / (Scalar(1) + std::exp(-z));
  return s * (Scalar(1) + z * (Scalar(1) - s));
}

}  // namespace detail
GROVE_END_NAMESPACE
