#pragma once

// The compile-time side of the format table (formats/weight_format.hpp): for each storage type,
// what it computes with and how one value is converted in and out. Conversions into BF16 use
// grove's one rounding rule (formats/bf16.hpp).

#include <cstddef>
#include <string>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/formats/bf16.hpp"
#include "grove/formats/weight_format.hpp"

GROVE_BEGIN_NAMESPACE

/// The compile-time side of the table: a format by its storage type.
///
///   storage      the element type in memory
///   activation   the type of x, y and the plan's weights that run with it (BF16 runs on fp32)
///   from_float / to_float   one value in and out (bf16: the one rounding rule, formats/bf16.hpp)
template <class Storage>
struct format_traits;

template <>
struct format_traits<float> {
  using storage = float;
  using activation = float;
  [[nodiscard]] static constexpr storage from_float(double v) { return static_cast<float>(v); }
  [[nodiscard]] static constexpr double to_float(storage v) { return v; }
};

template <>
struct format_traits<double> {
  using storage = double;
  using activation = double;
  [[nodiscard]] static constexpr storage from_float(double v) { return v; }
  [[nodiscard]] static constexpr double to_float(storage v) { return v; }
};

template <>
struct format_traits<bf16> {
  using storage = bf16;
  using activation = float;
  /// Rounded once from fp32 (a double is first rounded to fp32, as PyTorch's `.to(bfloat16)`
  /// of an fp32 tensor would see it).
  [[nodiscard]] static storage from_float(double v) { return to_bf16(static_cast<float>(v)); }
  [[nodiscard]] static double to_float(storage v) { return grove::to_float(v); }
};

/// Calls `fn.template operator()<Storage>()` with the storage type of `format`: the one place a
/// format chosen at run time (a command-line flag, a checkpoint) becomes a type.
template <class Fn>
decltype(auto) visit_format(weight_format format, Fn&& fn) {
  switch (format) {
    case weight_format::f32: return fn.template operator()<float>();
    case weight_format::f64: return fn.template operator()<double>();
    case weight_format::bf16: return fn.template operator()<bf16>();
  }
  throw error("grove: visit_format: unknown weight format " + std::to_string(static_cast<int>(format)));
}

/// The activation type that goes with a weight type: BF16 weights run on fp32 activations.
template <weight_storage Weight>
using activation_t = typename format_traits<std::remove_const_t<Weight>>::activation;

/// to[i] = from[i] widened to `To` for n values of any format (the fp32 routing copy of a BF16
/// router and bias, wherever it is made).
template <class To, weight_storage From>
void widen(const From* from, std::size_t n, To* to) {
  for (std::size_t i = 0; i < n; ++i) to[i] = static_cast<To>(format_traits<From>::to_float(from[i]));
}

static_assert(info_of<bf16>().bits == 8 * sizeof(bf16), "GROVE_FORMAT_TABLE_BITS_MUST_MATCH_THE_STORAGE_TYPES");

GROVE_END_NAMESPACE
