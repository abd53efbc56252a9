#pragma once

// batch<float, scalar>: one float, the fallback every machine runs and the reference the
// vector levels are tested against. Same interface as the AVX2 and AVX-512 batches.

#include <bit>
#include <cmath>
#include <cstdint>

#include "grove/simd/arch.hpp"

GROVE_BEGIN_NAMESPACE
namespace simd {

template <class T, class Arch>
struct batch;

/// float -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN with its sign. Every
/// level converts with exactly this rule, so bf16 copies of activations agree across levels.
[[nodiscard]] inline std::uint16_t float_to_bf16_bits(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  return static_cast<std::uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/// bfloat16 bits -> float (exact).
[[nodiscard]] inline float bf16_bits_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

template <>
struct batch<float, scalar> {
  static constexpr int size = 1;
  float value;

  static batch zero() { return {0.0f}; }
  static batch broadcast(float v) { return {v}; }
  static batch load(const float* p) { return {*p}; }
  static batch load_partial(const float* p, int n) { return {n > 0 ? *p : 0.0f}; }
  static batch load_bf16(const std::uint16_t* p) { return {bf16_bits_to_float(*p)}; }
  static batch load_bf16_partial(const std::uint16_t* p, int n) { return {n > 0 ? bf16_bits_to_float(*p) : 0.0f}; }
  /// `size` int8 values as floats (exact).
  static batch load_int8(const std::int8_t* p) { return {static_cast<float>(*p)}; }
  void store(float* p) const { *p = value; }
  void store_partial(float* p, int n) const {
    if (n > 0) *p = value;
  }
  void store_bf16(std::uint16_t* p) const { *p = float_to_bf16_bits(value); }
  void store_bf16_partial(std::uint16_t* p, int n) const {
    if (n > 0) *p = float_to_bf16_bits(value);
  }
  /// out[0] = reduce_add(in[0]) (the vector levels reduce `size` batches at once).
  static void reduce_lanes(const batch* in, float* out) { out[0] = in[0].value; }
  /// a·b + c on plain floats, with this level's rounding (see fmadd below).
  static float fmadd_scalar(float a, float b, float c);
};

using scalar_batch = batch<float, scalar>;

inline scalar_batch operator+(scalar_batch a, scalar_batch b) { return {a.value + b.value}; }
inline scalar_batch operator-(scalar_batch a, scalar_batch b) { return {a.value - b.value}; }
inline scalar_batch operator*(scalar_batch a, scalar_batch b) { return {a.value * b.value}; }
inline scalar_batch operator/(scalar_batch a, scalar_batch b) { return {a.value / b.value}; }
/// a·b + c. Fused (one rounding) when the compiler targets a machine with an FMA instruction,
/// two operations otherwise (baseline x86-64: std::fma would be a slow library call). Either
/// way explicit, never left to the compiler's contraction of a·b + c, which may differ from one
/// inlined copy to another and would break bitwise reproducibility across tile shapes.
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;  // no FMA instruction in the target: nothing to contract into
#endif
}
/// Keeps a loaded value in a register (see the vector levels); nothing to do for scalars.
inline void pin(scalar_batch&) {}
inline scalar_batch fma(scalar_batch a, scalar_batch b, scalar_batch c) { return {fmadd(a.value, b.value, c.value)}; }
inline float batch<float, scalar>::fmadd_scalar(float a, float b, float c) { return fmadd(a, b, c); }
inline float reduce_add(scalar_batch a) { return a.value; }
inline scalar_batch exp(scalar_batch a) { return {std::exp(a.value)}; }

}  // namespace simd
GROVE_END_NAMESPACE
