#pragma once

// IEEE binary16 ("F16", "fp16") conversions: checkpoints' F16 tensors (io/dtype.hpp) and the
// scales of the block formats (formats/quantized.hpp) convert with these.

#include <bit>
#include <cmath>
#include <cstdint>

#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE

/// float -> IEEE binary16 bits, rounding to nearest, ties to even, with subnormals; values
/// from 65520 up round to ±inf; NaN stays a quiet NaN with its sign.
[[nodiscard]] inline std::uint16_t f16_bits_of(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u)  // NaN: keep the top payload bits, force quiet
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x03FFu));
  if (magnitude >= 0x47800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65536 (and inf)
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  std::uint32_t significand = magnitude & 0x007FFFFFu;
  std::uint32_t half;
  std::uint32_t rest;
  std::uint32_t halfway;
  if (exponent >= -14) {  // normal binary16: keep 10 of the 23 fraction bits
    half = (static_cast<std::uint32_t>(exponent + 15) << 10) | (significand >> 13);
    rest = significand & 0x1FFFu;
    halfway = 0x1000u;
  } else {  // subnormal binary16 (units of 2^-24) or zero
    if (exponent < -25) return sign;  // below half the smallest subnormal (float subnormals too)
    significand |= 0x00800000u;       // value = significand · 2^(exponent - 23)
    const int shift = -exponent - 1;  // 14 .. 24
    half = significand >> shift;
    rest = significand & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1);
  }
  // Round to nearest even; a carry out of the fraction moves to the next binade (or to inf),
  // which the bit layout makes correct.
  if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
  return static_cast<std::uint16_t>(sign | half);
}

/// IEEE binary16 bits -> float (exact, subnormals, inf and NaN included).
[[nodiscard]] inline float f16_bits_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
  const std::uint32_t fraction = bits & 0x03FFu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(fraction), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7F800000u | (fraction << 13));
  return std::bit_cast<float>(sign | ((exponent - 15 + 127) << 23) | (fraction << 13));
}

GROVE_END_NAMESPACE
