#pragma once

// The compile-time side of the format table (formats/weight_format.hpp): for each storage type,
// what it computes with and how values are converted in and out: one at a time for the element
// formats, a row at a time for every format (encode_row, decode_row). Conversions into BF16 use
// grove's one rounding rule (formats/bf16.hpp); into q8 and q4, formats/quantized.hpp.

#include <cstddef>
#include <string>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/formats/bf16.hpp"
#include "grove/formats/quantized.hpp"
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

/// The block formats: no value stands alone, so they convert a row at a time only.
template <>
struct format_traits<q8_block> {
  using storage = q8_block;
  using activation = float;
};
template <>
struct format_traits<q4_block> {
  using storage = q4_block;
  using activation = float;
};

/// Storage units of a row of n values: n, or its blocks for a block format.
template <weight_storage Storage>
[[nodiscard]] constexpr std::ptrdiff_t units_per_row(std::ptrdiff_t n) {
  if constexpr (is_block_format<Storage>)
    return blocks_per_row(n);
  else
    return n;
}

/// A row of n values into its units_per_row(n) units of `Storage` (rounded or quantized once).
template <weight_storage Storage>
void encode_row(const float* x, std::ptrdiff_t n, Storage* out) {
  if constexpr (is_block_format<Storage>) {
    quantize_row(x, n, out);
  } else {
    for (std::ptrdiff_t i = 0; i < n; ++i) out[i] = format_traits<Storage>::from_float(x[i]);
  }
}

/// The n values a row of units stands for, as floats (exact for every format but f64).
template <weight_storage Storage>
void decode_row(const Storage* in, std::ptrdiff_t n, float* out) {
  if constexpr (is_block_format<Storage>) {
    dequantize_row(in, n, out);
  } else {
    for (std::ptrdiff_t i = 0; i < n; ++i) out[i] = static_cast<float>(format_traits<Storage>::to_float(in[i]));
  }
}

/// Calls `fn.template operator()<Storage>()` with the storage type of `format`: the one place a
/// format chosen at run time (a command-line flag, a checkpoint) becomes a type.
template <class Fn>
decltype(auto) visit_format(weight_format format, Fn&& fn) {
  switch (format) {
    case weight_format::f32: return fn.template operator()<float>();
    case weight_format::f64: return fn.template operator()<double>();
    case weight_format::bf16: return fn.template operator()<bf16>();
    case weight_format::q8: return fn.template operator()<q8_block>();
    case weight_format::q4: return fn.template operator()<q4_block>();
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
