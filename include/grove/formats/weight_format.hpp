#pragma once

// The weight formats grove keeps a layer's tensors in, one table row each, in the manner of
// ggml's type traits: what a format stores, how it is scaled, what a checkpoint calls it and
// what it computes with. The CPU kernels of each format and instruction-set level are the same
// rows' other half (kernels/cpu/format_kernels.hpp), as ggml keeps `type_traits_cpu` beside
// `type_traits`. q8 and q4 are block formats (formats/quantized.hpp): blocks of 32 values of a
// row, each with an fp16 scale, in the byte layout of ggml's Q8_0 and Q4_0.
//
// This header is Eigen-free (the configuration checks a format at compile time with it);
// formats/format_traits.hpp adds the conversions, which need the bf16 type itself.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "grove/error.hpp"

namespace Eigen {
struct bfloat16;  // grove::bf16 (formats/bf16.hpp); named here without including Eigen
}  // namespace Eigen

GROVE_BEGIN_NAMESPACE

struct q8_block;  // formats/quantized.hpp
struct q4_block;

/// A format a layer's weights can be held in.
enum class weight_format : std::uint8_t { f32, f64, bf16, q8, q4 };

/// How a format's values are scaled: none for the floating formats; the block formats have one
/// fp16 scale per block of 32 values along a row.
enum class scale_layout : std::uint8_t { none, fp16_per_block_of_32 };

/// One row of the format table (weight_formats).
struct format_info {
  weight_format format;
  std::string_view name;              ///< as `grove run --dtype` and logs spell it
  std::string_view checkpoint_dtype;  ///< the safetensors dtype that holds it without rounding
  int bits;                           ///< storage bits per weight, scales excluded
  scale_layout scales;
  bool trainable;  ///< whether grove has a backward for it (gradients are kept in this format)
  bool fp32_routing_copy;  ///< routing needs an fp32 copy of the router beside the tensors
  int block;               ///< values per storage unit: 1, or 32 for a block format
};

/// The format table, one row per format.
inline constexpr std::array<format_info, 5> weight_formats{{
    {weight_format::f32, "f32", "F32", 32, scale_layout::none, true, false, 1},
    {weight_format::f64, "f64", "F64", 64, scale_layout::none, true, false, 1},
    // BF16 is the released checkpoints' format: the tensors are kept as stored, and the router,
    // whose logits decide the picks, is widened to fp32 once (exact) for routing.
    {weight_format::bf16, "bf16", "BF16", 16, scale_layout::none, false, true, 1},
    // The block formats quantize the experts and adjugates; the router and the bias stay fp32
    // (the routing copy, taken from the source before quantizing), so the picks never change.
    {weight_format::q8, "q8", "I8", 8, scale_layout::fp16_per_block_of_32, false, true, 32},
    {weight_format::q4, "q4", "U8", 4, scale_layout::fp16_per_block_of_32, false, true, 32},
}};

/// The row of `format`.
[[nodiscard]] constexpr const format_info& info_of(weight_format format) {
  for (const format_info& row : weight_formats)
    if (row.format == format) return row;
  return weight_formats[0];  // unreachable: every enumerator has a row (checked below)
}

/// The format named `name` ("f32", "f64", "bf16", "q8", "q4"); throws grove::error listing the names.
[[nodiscard]] inline weight_format parse_weight_format(std::string_view name) {
  std::string names;
  for (const format_info& row : weight_formats) {
    if (row.name == name) return row.format;
    names += names.empty() ? "" : ", ";
    names += row.name;
  }
  throw error("grove: unknown weight format '" + std::string(name) + "' (grove holds " + names + ")");
}

namespace detail {
template <class T>
struct storage_format {};
template <>
struct storage_format<float> {
  static constexpr weight_format value = weight_format::f32;
};
template <>
struct storage_format<double> {
  static constexpr weight_format value = weight_format::f64;
};
template <>
struct storage_format<Eigen::bfloat16> {
  static constexpr weight_format value = weight_format::bf16;
};
template <>
struct storage_format<q8_block> {
  static constexpr weight_format value = weight_format::q8;
};
template <>
struct storage_format<q4_block> {
  static constexpr weight_format value = weight_format::q4;
};
}  // namespace detail

/// Satisfied by the storage types of the format table: float, double, grove::bf16, and the
/// block types grove::q8_block and grove::q4_block.
template <class T>
concept weight_storage = requires { detail::storage_format<std::remove_const_t<T>>::value; };

/// The format of a storage type.
template <weight_storage Storage>
inline constexpr weight_format format_of = detail::storage_format<std::remove_const_t<Storage>>::value;

/// The row of a storage type.
template <weight_storage Storage>
[[nodiscard]] constexpr const format_info& info_of() {
  return info_of(format_of<Storage>);
}

/// Whether a storage unit of the format holds a block of values (q8, q4), not one value.
template <weight_storage Storage>
inline constexpr bool is_block_format = info_of<Storage>().block > 1;

namespace detail {
constexpr bool every_format_has_its_row() {
  for (std::size_t i = 0; i < weight_formats.size(); ++i)
    if (static_cast<std::size_t>(weight_formats[i].format) != i) return false;
  return true;
}
static_assert(every_format_has_its_row(), "GROVE_FORMAT_TABLE_ROWS_MUST_FOLLOW_THE_ENUM_ORDER");
static_assert(info_of<float>().bits == 8 * sizeof(float) && info_of<double>().bits == 8 * sizeof(double),
              "GROVE_FORMAT_TABLE_BITS_MUST_MATCH_THE_STORAGE_TYPES");
}  // namespace detail

GROVE_END_NAMESPACE
