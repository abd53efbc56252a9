#pragma once

// Block-quantized tensors in safetensors files (docs/quantization.md, "Files"). A q8 or q4 weight
// `<stem>.weight` [rows, cols] is stored as two tensors:
//   <stem>.qweight  q8: I8 [rows, blocks·32], each block's 32 values in order (padding zero)
//                   q4: U8 [rows, blocks·16], each block's 16 bytes, byte j = value j (low
//                       nibble) | value j + 16 (high nibble), values offset by 8 (ggml's Q4_0)
//   <stem>.scales   F16 [rows, blocks], each block's scale d
// with blocks = ceil(cols / 32), and the file's metadata "grove_quantization" = "q8" or "q4".
// The router (gate.weight) and the selection bias stay F32. Interleaving a row's scales with its
// values gives ggml's block_q8_0 / block_q4_0 bytes, and back, without loss.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "grove/error.hpp"
#include "grove/formats/f16.hpp"
#include "grove/formats/format_traits.hpp"
#include "grove/formats/quantized.hpp"
#include "grove/formats/weight_format.hpp"
#include "grove/io/checkpoint.hpp"
#include "grove/io/messages.hpp"
#include "grove/io/safetensors.hpp"

GROVE_BEGIN_NAMESPACE

namespace detail {
/// The stored dtype and the bytes per block of a block format's packed values.
template <class Block>
struct packed_layout;
template <>
struct packed_layout<q8_block> {
  static constexpr io::dtype stored = io::dtype::i8;
  static constexpr std::int64_t bytes = 32;
};
template <>
struct packed_layout<q4_block> {
  static constexpr io::dtype stored = io::dtype::u8;
  static constexpr std::int64_t bytes = 16;
};
}  // namespace detail

namespace io {

/// The metadata key of a file that holds quantized tensors, and its values ("q8", "q4").
inline constexpr const char* quantization_key = "grove_quantization";

/// "<stem>.qweight" and "<stem>.scales" of a tensor named "<stem>.weight".
[[nodiscard]] inline std::string stem_of(std::string_view weight_name) {
  constexpr std::string_view suffix = ".weight";
  if (weight_name.size() >= suffix.size() && weight_name.substr(weight_name.size() - suffix.size()) == suffix)
    return std::string(weight_name.substr(0, weight_name.size() - suffix.size()));
  return std::string(weight_name);
}
[[nodiscard]] inline std::string qweight_name(std::string_view weight_name) { return stem_of(weight_name) + ".qweight"; }
[[nodiscard]] inline std::string scales_name(std::string_view weight_name) { return stem_of(weight_name) + ".scales"; }


/// How tensor `weight_name` is stored: nullopt when it is there as itself (any floating dtype),
/// or the block format of its "<stem>.qweight" and "<stem>.scales". Throws grove::error naming
/// the tensor and the file when it is quantized but its file's tag is missing, unknown, or does
/// not match the packed values' dtype. A tensor that is in neither form is left to the caller
/// (a missing tensor, named as "<stem>.weight").
[[nodiscard]] inline std::optional<weight_format> stored_format(const checkpoint& ckpt, std::string_view weight_name) {
  if (ckpt.contains(weight_name)) return std::nullopt;
  const std::string values = qweight_name(weight_name);
  if (!ckpt.contains(values)) return std::nullopt;
  const auto& metadata = ckpt.metadata_of(values);
  const auto tag = metadata.find(quantization_key);
  const std::string where = " in " + detail::quoted(ckpt.file_of(values));
  if (tag == metadata.end())
    throw error("grove: quantized tensor " + detail::quoted_name(values) + where + " has no '" + quantization_key +
                "' metadata in its file (q8 or q4)");
  weight_format format{};
  if (tag->second == "q8") {
    format = weight_format::q8;
  } else if (tag->second == "q4") {
    format = weight_format::q4;
  } else {
    throw error("grove: unknown quantization format " + detail::quoted_name(tag->second) + " of tensor " +
                detail::quoted_name(values) + where + " (grove reads q8 and q4)");
  }
  const dtype expected = format == weight_format::q8 ? dtype::i8 : dtype::u8;
  const tensor_entry& e = ckpt.entry(values);
  if (e.type != expected)
    throw error("grove: quantized tensor " + detail::quoted_name(values) + where + " is " +
                detail::excerpt(e.dtype_name) + " but its file's format " + tag->second + " stores " +
                std::string(dtype_name(expected)));
  return format;
}

/// Checks, from headers alone, the two tensors of a quantized [rows, cols] weight in `Block`'s
/// layout; throws grove::error naming the tensor on a wrong dtype or shape.
template <class Block>
void check_quantized_tensor(const checkpoint& ckpt, std::string_view weight_name, std::int64_t rows, std::int64_t cols) {
  const std::int64_t blocks = blocks_per_row(cols);
  const std::string values = qweight_name(weight_name), scales = scales_name(weight_name);
  const tensor_shape packed{rows, blocks * detail::packed_layout<Block>::bytes}, scale_shape{rows, blocks};
  const tensor_entry& v = ckpt.entry(values);
  if (v.shape != packed)
    throw error("grove: wrong shape for quantized tensor " + detail::quoted_name(values) + " in " +
                detail::quoted(ckpt.file_of(values)) + ": expected " + detail::shape_string(packed) +
                " (a [" + std::to_string(rows) + ", " + std::to_string(cols) + "] weight in blocks of 32), found " +
                detail::shape_string(v.shape));
  if (!ckpt.contains(scales))
    throw error("grove: missing tensor " + detail::quoted_name(scales) + " (the scales of " +
                detail::quoted_name(values) + ") in checkpoint " + detail::quoted(ckpt.path()));
  const tensor_entry& s = ckpt.entry(scales);
  if (s.type != dtype::f16 || s.shape != scale_shape)
    throw error("grove: quantized scales " + detail::quoted_name(scales) + " in " +
                detail::quoted(ckpt.file_of(scales)) + " must be F16 " + detail::shape_string(scale_shape) +
                ", found " + detail::excerpt(s.dtype_name) + " " + detail::shape_string(s.shape));
}

/// Reads a quantized [rows, cols] weight stored in `Block`'s layout into rows of blocks, exactly;
/// throws grove::error naming the tensor on a block that is not valid (a non-finite scale, or a
/// q8 value of −128, which grove's kernels do not take and ggml never writes).
template <class Block>
void read_quantized_blocks(const checkpoint& ckpt, std::string_view weight_name, std::int64_t rows, std::int64_t cols,
                           Block* out) {
  check_quantized_tensor<Block>(ckpt, weight_name, rows, cols);
  const std::int64_t blocks = blocks_per_row(cols);
  const std::vector<std::byte> packed = ckpt.read_bytes(qweight_name(weight_name));
  const std::vector<std::byte> scales = ckpt.read_bytes(scales_name(weight_name));
  for (std::int64_t b = 0; b < rows * blocks; ++b) {
    Block& block = out[b];
    block.scale = static_cast<std::uint16_t>(std::to_integer<unsigned>(scales[static_cast<std::size_t>(2 * b)]) |
                                             (std::to_integer<unsigned>(scales[static_cast<std::size_t>(2 * b + 1)]) << 8));
    std::memcpy(block.q, packed.data() + b * detail::packed_layout<Block>::bytes,
                static_cast<std::size_t>(detail::packed_layout<Block>::bytes));
    if (!valid_block(block))
      throw error("grove: quantized tensor " + detail::quoted_name(qweight_name(weight_name)) + " in " +
                  detail::quoted(ckpt.file_of(qweight_name(weight_name))) + " holds an invalid block at row " +
                  std::to_string(b / blocks) + ", block " + std::to_string(b % blocks) +
                  " (a non-finite scale, or a q8 value of -128)");
  }
}

/// Reads weight `weight_name` [rows, cols] as fp32, however it is stored: as itself in any
/// floating dtype (read_into's checks), or quantized (dequantized exactly).
inline void read_as_float(const checkpoint& ckpt, std::string_view weight_name, std::int64_t rows, std::int64_t cols,
                          std::span<float> out) {
  const std::optional<weight_format> quantized = stored_format(ckpt, weight_name);
  if (!quantized) {
    const tensor_shape shape{rows, cols};
    ckpt.read_into(weight_name, std::span<const std::int64_t>(shape), out);
    return;
  }
  const auto dequantize = [&]<class Block>() {
    std::vector<Block> blocks(static_cast<std::size_t>(rows * blocks_per_row(cols)));
    read_quantized_blocks(ckpt, weight_name, rows, cols, blocks.data());
    for (std::int64_t r = 0; r < rows; ++r)
      dequantize_row(blocks.data() + r * blocks_per_row(cols), cols, out.data() + r * cols);
  };
  if (*quantized == weight_format::q8)
    dequantize.template operator()<q8_block>();
  else
    dequantize.template operator()<q4_block>();
}

/// Adds rows [rows, cols] of `Block`s as the quantized tensor named after `weight_name`.
template <class Block>
void add_quantized_tensor(safetensors_writer& writer, const std::string& weight_name, const Block* blocks,
                          std::int64_t rows, std::int64_t cols) {
  const std::int64_t per_row = blocks_per_row(cols);
  constexpr std::int64_t bytes = detail::packed_layout<Block>::bytes;
  std::vector<std::byte> packed(static_cast<std::size_t>(rows * per_row * bytes));
  std::vector<std::byte> scales(static_cast<std::size_t>(rows * per_row * 2));
  for (std::int64_t b = 0; b < rows * per_row; ++b) {
    std::memcpy(packed.data() + b * bytes, blocks[b].q, static_cast<std::size_t>(bytes));
    scales[static_cast<std::size_t>(2 * b)] = static_cast<std::byte>(blocks[b].scale & 0xFFu);
    scales[static_cast<std::size_t>(2 * b + 1)] = static_cast<std::byte>(blocks[b].scale >> 8);
  }
  writer.add_bytes(qweight_name(weight_name), detail::packed_layout<Block>::stored, tensor_shape{rows, per_row * bytes},
                   std::move(packed));
  writer.add_bytes(scales_name(weight_name), dtype::f16, tensor_shape{rows, per_row}, std::move(scales));
}

}  // namespace io
GROVE_END_NAMESPACE
