#pragma once

// The bfloat16 type of BF16 weights, and grove's one bf16 rounding rule.

#include <cstdint>

#include <Eigen/Core>

#include "grove/simd/scalar.hpp"

GROVE_BEGIN_NAMESPACE

/// bfloat16 storage type: Eigen's, so that a weights_view<bf16> has ordinary Eigen maps.
using bf16 = Eigen::bfloat16;

/// float -> bf16, rounding to nearest even (PyTorch's `.to(torch.bfloat16)`). This is the one
/// rounding rule of grove (simd::float_to_bf16_bits): weights converted in memory, checkpoints
/// written or read as BF16 (io::float_to_bf16) and the kernels' bf16 activations all use it;
/// the vector levels implement it lane-wise and are tested against it.
[[nodiscard]] inline bf16 to_bf16(float value) {
  return Eigen::numext::bit_cast<bf16>(simd::float_to_bf16_bits(value));
}
/// bf16 -> float, exact.
[[nodiscard]] inline float to_float(bf16 value) {
  return simd::bf16_bits_to_float(Eigen::numext::bit_cast<std::uint16_t>(value));
}
/// The bits of a bf16, and a bf16 from its bits.
[[nodiscard]] inline std::uint16_t bits_of(bf16 value) { return Eigen::numext::bit_cast<std::uint16_t>(value); }
[[nodiscard]] inline bf16 bf16_from_bits(std::uint16_t bits) { return Eigen::numext::bit_cast<bf16>(bits); }

GROVE_END_NAMESPACE
