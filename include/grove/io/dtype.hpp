#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/formats/bf16.hpp"
#include "grove/formats/f16.hpp"

GROVE_BEGIN_NAMESPACE
namespace io {

/// The element types a safetensors file can declare. grove converts the floating ones
/// (F64, F32, F16, BF16) to and from float/double, and I32/I64 to and from integers; the others
/// are recognised so that a file holding them still opens (their sizes are known), but reading
/// them is an error. A dtype string grove does not know at all becomes `unknown`.
enum class dtype : std::uint8_t { f64, f32, f16, bf16, i64, i32, i16, i8, u64, u32, u16, u8, boolean, f8_e4m3, f8_e5m2,
                                  unknown };

}  // namespace io

namespace detail {
struct dtype_row {
  io::dtype type;
  std::string_view name;
  std::size_t size;
};
inline constexpr dtype_row dtype_table[] = {
    {io::dtype::f64, "F64", 8},     {io::dtype::f32, "F32", 4},         {io::dtype::f16, "F16", 2},
    {io::dtype::bf16, "BF16", 2},   {io::dtype::i64, "I64", 8},         {io::dtype::i32, "I32", 4},
    {io::dtype::i16, "I16", 2},     {io::dtype::i8, "I8", 1},           {io::dtype::u64, "U64", 8},
    {io::dtype::u32, "U32", 4},     {io::dtype::u16, "U16", 2},         {io::dtype::u8, "U8", 1},
    {io::dtype::boolean, "BOOL", 1}, {io::dtype::f8_e4m3, "F8_E4M3", 1}, {io::dtype::f8_e5m2, "F8_E5M2", 1},
};
}  // namespace detail

namespace io {

/// The safetensors spelling ("F32", "BF16", ...); "unknown" for dtype::unknown.
[[nodiscard]] inline std::string_view dtype_name(dtype t) {
  for (const auto& row : detail::dtype_table)
    if (row.type == t) return row.name;
  return "unknown";
}

/// The dtype a safetensors header spells `name`, or dtype::unknown.
[[nodiscard]] inline dtype dtype_from_name(std::string_view name) {
  for (const auto& row : detail::dtype_table)
    if (row.name == name) return row.type;
  return dtype::unknown;
}

/// Bytes per element; 0 for dtype::unknown.
[[nodiscard]] inline std::size_t dtype_size(dtype t) {
  for (const auto& row : detail::dtype_table)
    if (row.type == t) return row.size;
  return 0;
}

/// True for the dtypes grove converts to and from floating point: F64, F32, F16, BF16.
[[nodiscard]] constexpr bool is_floating(dtype t) {
  return t == dtype::f64 || t == dtype::f32 || t == dtype::f16 || t == dtype::bf16;
}

// ---- scalar conversions ----------------------------------------------------------------------

/// float -> bfloat16 bits, rounding to nearest, ties to even (what PyTorch's .to(torch.bfloat16)
/// does). Values beyond the largest bfloat16 round to ±inf; NaN stays a (quiet) NaN with its sign.
/// grove's one bf16 rounding rule, simd::float_to_bf16_bits: checkpoints, weights in memory and
/// the kernels' bf16 activations all round alike.
[[nodiscard]] inline std::uint16_t float_to_bf16(float value) { return simd::float_to_bf16_bits(value); }

/// bfloat16 bits -> float (exact).
[[nodiscard]] inline float bf16_to_float(std::uint16_t bits) { return simd::bf16_bits_to_float(bits); }

/// float -> IEEE binary16 bits, rounding to nearest even (formats/f16.hpp, shared with the
/// block formats' scales).
[[nodiscard]] inline std::uint16_t float_to_f16(float value) { return f16_bits_of(value); }

/// IEEE binary16 bits -> float (exact).
[[nodiscard]] inline float f16_to_float(std::uint16_t bits) { return f16_bits_to_float(bits); }

}  // namespace io

namespace detail {
/// double -> float rounded to odd: the float nearest below in magnitude with its last bit forced
/// to 1 when the conversion is inexact. Rounding that float to nearest-even at 8 or 11 bits gives
/// the same result as rounding the double directly (float has more than 2 extra bits), so the
/// double paths below round once, not twice.
inline float to_float_round_to_odd(double value) {
  if (std::isnan(value)) return static_cast<float>(value);
  float f = static_cast<float>(value);
  if (static_cast<double>(f) == value) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(value)) f = std::nextafter(f, 0.0f);
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(f) | 1u);
}
}  // namespace detail

namespace io {

/// double -> bfloat16 bits, one rounding to nearest even.
[[nodiscard]] inline std::uint16_t double_to_bf16(double value) {
  return float_to_bf16(detail::to_float_round_to_odd(value));
}
/// double -> binary16 bits, one rounding to nearest even.
[[nodiscard]] inline std::uint16_t double_to_f16(double value) {
  return float_to_f16(detail::to_float_round_to_odd(value));
}

// ---- buffers ----------------------------------------------------------------------------------

}  // namespace io

namespace detail {
// safetensors stores little-endian; these assemble values byte by byte, so they are right on
// any host and compile to plain loads and stores on little-endian ones.
template <class U>
U load_le(const std::byte* p) {
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) v = static_cast<U>(v | (static_cast<U>(std::to_integer<unsigned>(p[i])) << (8 * i)));
  return v;
}
template <class U>
void store_le(std::byte* p, U v) {
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFFu);
}

template <class Value>
constexpr bool is_float_value = std::is_same_v<Value, float> || std::is_same_v<Value, double>;
template <class Value>
constexpr bool is_int_value = std::is_same_v<Value, std::int32_t> || std::is_same_v<Value, std::int64_t>;
/// bf16 values: BF16 weights decoded straight from any floating dtype, with one rounding.
template <class Value>
constexpr bool is_bf16_value = std::is_same_v<Value, bf16>;

inline std::string conversion_error(io::dtype stored, std::string_view value_type) {
  return "grove: unsupported dtype " + std::string(io::dtype_name(stored)) + " for " + std::string(value_type) +
         " values (grove reads and writes F32, F16, BF16 and F64 as floating point, I32 and I64 as integers)";
}
template <class Value>
constexpr std::string_view value_type_name() {
  if constexpr (std::is_same_v<Value, float>) return "float";
  else if constexpr (std::is_same_v<Value, double>) return "double";
  else if constexpr (std::is_same_v<Value, std::int32_t>) return "int32";
  else if constexpr (std::is_same_v<Value, bf16>) return "bf16";
  else return "int64";
}
}  // namespace detail

namespace io {

/// Whether values of C++ type `Value` (float, double, bf16, int32_t, int64_t) convert to and from `stored`.
template <class Value>
[[nodiscard]] constexpr bool converts(dtype stored) {
  if constexpr (detail::is_float_value<Value> || detail::is_bf16_value<Value>) return is_floating(stored);
  else if constexpr (detail::is_int_value<Value>) return stored == dtype::i32 || stored == dtype::i64;
  else return false;
}

/// Converts `count` elements stored as `stored` (little-endian bytes at `src`, count ·
/// dtype_size(stored) of them) to `Value`s at `dst`. Throws grove::error for a dtype that does not
/// convert to `Value` (see converts()). Narrowing integer conversions throw when a value does not fit.
/// bf16 values are rounded once (to nearest even) from F32, F16 and F64, and copied from BF16, so a
/// BF16 checkpoint loads into BF16 memory bit for bit and without a float copy.
template <class Value>
void decode(dtype stored, const std::byte* src, std::size_t count, Value* dst) {
  static_assert(detail::is_float_value<Value> || detail::is_int_value<Value> || detail::is_bf16_value<Value>,
                "GROVE_IO_VALUES_MUST_BE_FLOAT_DOUBLE_BF16_INT32_OR_INT64");
  if (!converts<Value>(stored)) throw error(detail::conversion_error(stored, detail::value_type_name<Value>()));
  const std::size_t size = dtype_size(stored);
  for (std::size_t i = 0; i < count; ++i) {
    const std::byte* p = src + i * size;
    if constexpr (detail::is_bf16_value<Value>) {
      switch (stored) {
        case dtype::f64: dst[i] = bf16_from_bits(double_to_bf16(std::bit_cast<double>(detail::load_le<std::uint64_t>(p)))); break;
        case dtype::f32: dst[i] = bf16_from_bits(float_to_bf16(std::bit_cast<float>(detail::load_le<std::uint32_t>(p)))); break;
        case dtype::f16: dst[i] = bf16_from_bits(float_to_bf16(f16_to_float(detail::load_le<std::uint16_t>(p)))); break;
        default: dst[i] = bf16_from_bits(detail::load_le<std::uint16_t>(p)); break;
      }
    } else if constexpr (detail::is_float_value<Value>) {
      switch (stored) {
        case dtype::f64: dst[i] = static_cast<Value>(std::bit_cast<double>(detail::load_le<std::uint64_t>(p))); break;
        case dtype::f32: dst[i] = static_cast<Value>(std::bit_cast<float>(detail::load_le<std::uint32_t>(p))); break;
        case dtype::f16: dst[i] = static_cast<Value>(f16_to_float(detail::load_le<std::uint16_t>(p))); break;
        default: dst[i] = static_cast<Value>(bf16_to_float(detail::load_le<std::uint16_t>(p))); break;
      }
    } else {
      const std::int64_t v = stored == dtype::i64
                                 ? static_cast<std::int64_t>(detail::load_le<std::uint64_t>(p))
                                 : static_cast<std::int64_t>(static_cast<std::int32_t>(detail::load_le<std::uint32_t>(p)));
      if constexpr (std::is_same_v<Value, std::int32_t>)
        if (v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max())
          throw error("grove: I64 value " + std::to_string(v) + " does not fit in int32");
      dst[i] = static_cast<Value>(v);
    }
  }
}

/// Converts `count` `Value`s at `src` to `stored` and writes count · dtype_size(stored)
/// little-endian bytes at `dst`. Floating conversions round to nearest even (once, also from
/// double); narrowing integer conversions throw when a value does not fit.
template <class Value>
void encode(dtype stored, const Value* src, std::size_t count, std::byte* dst) {
  static_assert(detail::is_float_value<Value> || detail::is_int_value<Value> || detail::is_bf16_value<Value>,
                "GROVE_IO_VALUES_MUST_BE_FLOAT_DOUBLE_BF16_INT32_OR_INT64");
  if (!converts<Value>(stored)) throw error(detail::conversion_error(stored, detail::value_type_name<Value>()));
  const std::size_t size = dtype_size(stored);
  for (std::size_t i = 0; i < count; ++i) {
    std::byte* p = dst + i * size;
    const Value v = src[i];
    if constexpr (detail::is_bf16_value<Value>) {
      // bf16 -> F32/F64 is exact, -> BF16 a copy, -> F16 one rounding of the exact value.
      switch (stored) {
        case dtype::f64: detail::store_le(p, std::bit_cast<std::uint64_t>(static_cast<double>(to_float(v)))); break;
        case dtype::f32: detail::store_le(p, std::bit_cast<std::uint32_t>(to_float(v))); break;
        case dtype::f16: detail::store_le(p, float_to_f16(to_float(v))); break;
        default: detail::store_le(p, bits_of(v)); break;
      }
    } else if constexpr (detail::is_float_value<Value>) {
      switch (stored) {
        case dtype::f64: detail::store_le(p, std::bit_cast<std::uint64_t>(static_cast<double>(v))); break;
        case dtype::f32: detail::store_le(p, std::bit_cast<std::uint32_t>(static_cast<float>(v))); break;
        case dtype::f16:
          if constexpr (std::is_same_v<Value, double>) detail::store_le(p, double_to_f16(v));
          else detail::store_le(p, float_to_f16(v));
          break;
        default:
          if constexpr (std::is_same_v<Value, double>) detail::store_le(p, double_to_bf16(v));
          else detail::store_le(p, float_to_bf16(v));
          break;
      }
    } else {
      if (stored == dtype::i64) {
        detail::store_le(p, static_cast<std::uint64_t>(static_cast<std::int64_t>(v)));
      } else {
        if constexpr (std::is_same_v<Value, std::int64_t>)
          if (v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max())
            throw error("grove: value " + std::to_string(v) + " does not fit in dtype I32");
        detail::store_le(p, static_cast<std::uint32_t>(static_cast<std::int32_t>(v)));
      }
    }
  }
}

}  // namespace io
GROVE_END_NAMESPACE
