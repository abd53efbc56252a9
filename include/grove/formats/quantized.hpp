#pragma once

// The block-quantized weight formats (docs/quantization.md): q8 and q4. A weight matrix [out, in]
// keeps each row as blocks of 32 values along `in`, every block with its own scale, in the byte
// layout of ggml's Q8_0 and Q4_0, so such weights convert without loss in either direction.
// When `in` is not a multiple of 32, a row's last block is padded with zeros.
//
// In memory, a matrix's rows are repacked at load into *panels* of 16 rows (rows_to_panels), so
// that one 512-bit integer dot serves 16 rows: a panel's block b holds its rows' 16 scales side
// by side, and their values in chunks of 4, chunk c holding values 4c..4c+3 of every row (q8
// stored + 128, as unsigned bytes; q4 as ggml's bytes, byte j holding value j low and j + 16
// high); blocks go in pairs so that the chunks start cache lines (panel_block_offsets). A panel
// takes the bytes its rows take as blocks, so offsets and sizes are unchanged; files keep
// ggml's row layout (panels_to_rows).
//
// This header is the arithmetic's definition, in plain scalar code; the kernels of every
// instruction-set level (kernels/cpu/detail/quantized_tiles-inl.hpp) compute the same bits, and
// the tests hold them to it.
//
//   weights      q8: d = amax / 127 (stored as fp16), q = round(x / d) in [-127, 127]
//                q4: d = m / -8, m the value of largest magnitude (stored as fp16),
//                    q = min(15, trunc(x / d + 8.5)) in [0, 15], value d · (q − 8)
//   activations  each row of x and of h is quantized per block of 32 for the integer dots:
//                a = amax / 127, q = nearest-even(x · (127 / amax)) in [-127, 127] (0 when amax is 0)
//   dot          per block b, the 32 products sum exactly in int32, p_b (|p_b| < 2^20, so
//                float(p_b) is exact); acc = fma(a_b · d_b, float(p_b), acc) over the blocks in
//                ascending order, from +0; the dot is acc.
// The order does not depend on the instruction set, so a dot has the same bits at every level.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "grove/formats/f16.hpp"

GROVE_BEGIN_NAMESPACE

/// grove's index type, declared as config/dynamic.hpp declares it (formats/ sits below config/).
using index = std::ptrdiff_t;

/// Values per block of the block formats, along a weight row's input dimension.
inline constexpr index quant_block_size = 32;

/// q8 weights: ggml's block_q8_0. Value i is d · q[i], d the fp16 `scale`; q ∈ [-127, 127].
struct q8_block {
  std::uint16_t scale;
  std::int8_t q[32];
};
/// q4 weights: ggml's block_q4_0. Byte j holds value j (low nibble) and value j + 16 (high
/// nibble); a nibble n stands for d · (n − 8), d the fp16 `scale`.
struct q4_block {
  std::uint16_t scale;
  std::uint8_t q[16];
};
static_assert(sizeof(q8_block) == 34 && sizeof(q4_block) == 18,
              "GROVE_BLOCK_FORMATS_MUST_HAVE_GGML_BYTE_LAYOUT");

/// Blocks of a row of n values.
[[nodiscard]] constexpr index blocks_per_row(index n) { return (n + quant_block_size - 1) / quant_block_size; }

namespace detail {
/// x[i] for i < n, else 0 (a row's padding).
inline float value_or_zero(const float* x, index n, index i) { return i < n ? x[i] : 0.0f; }
}  // namespace detail

/// Quantizes a row of n floats into blocks_per_row(n) q8 blocks, as ggml's quantize_row_q8_0.
inline void quantize_row(const float* x, index n, q8_block* out) {
  for (index b = 0; b < blocks_per_row(n); ++b) {
    const index at = b * quant_block_size;
    float amax = 0.0f;
    for (index i = 0; i < quant_block_size; ++i) amax = std::max(amax, std::fabs(detail::value_or_zero(x, n, at + i)));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    out[b].scale = f16_bits_of(d);
    for (index i = 0; i < quant_block_size; ++i)
      out[b].q[i] = static_cast<std::int8_t>(std::round(detail::value_or_zero(x, n, at + i) * id));
  }
}

/// Quantizes a row of n floats into blocks_per_row(n) q4 blocks, as ggml's quantize_row_q4_0.
inline void quantize_row(const float* x, index n, q4_block* out) {
  for (index b = 0; b < blocks_per_row(n); ++b) {
    const index at = b * quant_block_size;
    float amax = 0.0f, max = 0.0f;
    for (index i = 0; i < quant_block_size; ++i) {
      const float v = detail::value_or_zero(x, n, at + i);
      if (std::fabs(v) > amax) {
        amax = std::fabs(v);
        max = v;
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    out[b].scale = f16_bits_of(d);
    for (index j = 0; j < quant_block_size / 2; ++j) {
      const auto lo = static_cast<std::uint8_t>(
          std::min(15, static_cast<int>(detail::value_or_zero(x, n, at + j) * id + 8.5f)));
      const auto hi = static_cast<std::uint8_t>(
          std::min(15, static_cast<int>(detail::value_or_zero(x, n, at + j + 16) * id + 8.5f)));
      out[b].q[j] = static_cast<std::uint8_t>(lo | (hi << 4));
    }
  }
}

/// The integer values of a block, in value order: q8's q, q4's nibbles − 8.
inline void block_values(const q8_block& block, std::int8_t* values) { std::memcpy(values, block.q, 32); }
inline void block_values(const q4_block& block, std::int8_t* values) {
  for (int j = 0; j < 16; ++j) {
    values[j] = static_cast<std::int8_t>((block.q[j] & 0x0F) - 8);
    values[j + 16] = static_cast<std::int8_t>((block.q[j] >> 4) - 8);
  }
}

/// The n values a row of blocks stands for (exact: d · q).
template <class Block>
void dequantize_row(const Block* blocks, index n, float* out) {
  std::int8_t values[quant_block_size];
  for (index b = 0; b < blocks_per_row(n); ++b) {
    const float d = f16_bits_to_float(blocks[b].scale);
    block_values(blocks[b], values);
    for (index i = 0; i < quant_block_size && b * quant_block_size + i < n; ++i)
      out[b * quant_block_size + i] = d * static_cast<float>(values[i]);
  }
}

/// Checks a stored block: a finite scale and, for q8, values in [-127, 127] (ggml never writes
/// -128; the kernels' sign trick needs it). Returns false for a block that is not valid.
inline bool valid_block(const q8_block& block) {
  if (!std::isfinite(f16_bits_to_float(block.scale))) return false;
  for (const std::int8_t v : block.q)
    if (v == -128) return false;
  return true;
}
inline bool valid_block(const q4_block& block) { return std::isfinite(f16_bits_to_float(block.scale)); }

/// A row of activations quantized for the integer dots: blocks_per_row(n) blocks of 32 int8 in
/// `q` (padding zero) and their scales in `scale` (docs/quantization.md, "Activations").
inline void quantize_activations(const float* x, index n, std::int8_t* q, float* scale) {
  for (index b = 0; b < blocks_per_row(n); ++b) {
    const index at = b * quant_block_size;
    float amax = 0.0f;
    for (index i = 0; i < quant_block_size; ++i) amax = std::max(amax, std::fabs(detail::value_or_zero(x, n, at + i)));
    scale[b] = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    for (index i = 0; i < quant_block_size; ++i) {
      const float v = std::nearbyint(detail::value_or_zero(x, n, at + i) * id);
      q[at + i] = static_cast<std::int8_t>(std::clamp(v, -127.0f, 127.0f));
    }
  }
}

/// The dot of a quantized activation row (q, scale) with a row of weight blocks, `blocks` blocks
/// long, in the documented order: the reference every level's kernels equal bit for bit.
template <class Block>
float quantized_dot(const std::int8_t* q, const float* scale, const Block* weights, index blocks) {
  float acc = 0.0f;
  std::int8_t w[quant_block_size];
  for (index b = 0; b < blocks; ++b) {
    block_values(weights[b], w);
    std::int32_t p = 0;
    for (index i = 0; i < quant_block_size; ++i) p += static_cast<std::int32_t>(q[b * quant_block_size + i]) * w[i];
    acc = std::fma(scale[b] * f16_bits_to_float(weights[b].scale), static_cast<float>(p), acc);
  }
  return acc;
}

/// Σ of each block's 32 activation values (the kernels take out the weights' offset with it:
/// 128 for q8's stored bytes, 8 for q4's nibbles).
inline void activation_block_sums(const std::int8_t* q, index blocks, std::int32_t* sums) {
  for (index b = 0; b < blocks; ++b) {
    std::int32_t s = 0;
    for (index i = 0; i < quant_block_size; ++i) s += q[b * quant_block_size + i];
    sums[b] = s;
  }
}

// ---- Panels: the layout in memory -------------------------------------------------------------

/// Rows per panel.
inline constexpr index quant_panel_rows = 16;

namespace detail {
/// The panel layout's parameters of a block type: chunks of 4 bytes per row and block; what a
/// panel adds to a block's byte (q8: q + 128, an unsigned byte for vpdpbusd; q4: nothing); and
/// the offset of the unsigned values the kernels multiply (q8's q + 128, q4's nibble = value + 8),
/// taken out after each block's products with the activations' block sum.
template <class Block>
struct panel_traits;
template <>
struct panel_traits<q8_block> {
  static constexpr int chunks = 8;
  static constexpr int byte_offset = 128;
  static constexpr int value_offset = 128;
};
template <>
struct panel_traits<q4_block> {
  static constexpr int chunks = 4;
  static constexpr int byte_offset = 0;
  static constexpr int value_offset = 8;
};

/// Where row `row` of a matrix of `rows` rows lies: its panel's first unit, its panel's rows
/// (16, or fewer in the last panel) and its lane in the panel.
struct panel_place {
  index first_unit;
  int rows;
  int lane;
};
[[nodiscard]] constexpr panel_place place_of_row(index row, index rows, index blocks) {
  const index first = row / quant_panel_rows * quant_panel_rows;
  return {first * blocks, static_cast<int>(std::min(quant_panel_rows, rows - first)), static_cast<int>(row - first)};
}

}  // namespace detail

/// Where block b of a panel of `rows` rows and `blocks` blocks lies, in bytes from the panel's
/// start: its rows' scales, then its values. Blocks go in pairs (scales of 2j, scales of 2j + 1,
/// values of 2j, values of 2j + 1; a last odd block alone), so that in a panel of 16 rows every
/// 64-byte chunk of values starts a cache line when the panel does.
struct block_offsets {
  index scales;
  index values;
};
template <class Block>
[[nodiscard]] constexpr block_offsets panel_block_offsets(index b, int rows, index blocks) {
  const index unit = rows * static_cast<index>(sizeof(Block)), scales = 2 * index(rows), values = unit - scales;
  const index first = b - b % 2;
  if (first + 1 < blocks) {
    const index second = b - first;
    return {first * unit + second * scales, first * unit + 2 * scales + second * values};
  }
  return {b * unit, b * unit + scales};
}

namespace detail {
/// Block b of lane `lane` of a panel of `rows` rows of `blocks` blocks, as a block in ggml's layout.
template <class Block>
Block block_of_panel(const Block* panel, int rows, index blocks, int lane, index b) {
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(panel);
  const block_offsets at = panel_block_offsets<Block>(b, rows, blocks);
  Block block;
  std::memcpy(&block.scale, bytes + at.scales + 2 * lane, 2);
  for (int c = 0; c < panel_traits<Block>::chunks; ++c)
    for (int i = 0; i < 4; ++i)
      block.q[4 * c + i] = static_cast<std::remove_reference_t<decltype(block.q[0])>>(static_cast<std::uint8_t>(
          bytes[at.values + 4 * (rows * c + lane) + i] - panel_traits<Block>::byte_offset));
  return block;
}
}  // namespace detail

/// `count` rows of `blocks` blocks in ggml's row layout → the panel layout (out of place; the
/// same number of units).
template <class Block>
void rows_to_panels(const Block* rows, index count, index blocks, Block* panels) {
  for (index first = 0; first < count; first += quant_panel_rows) {
    const int n = static_cast<int>(std::min(quant_panel_rows, count - first));
    auto* panel = reinterpret_cast<std::uint8_t*>(panels + first * blocks);
    for (index b = 0; b < blocks; ++b) {
      const block_offsets at = panel_block_offsets<Block>(b, n, blocks);
      for (int lane = 0; lane < n; ++lane) {
        const Block& block = rows[(first + lane) * blocks + b];
        std::memcpy(panel + at.scales + 2 * lane, &block.scale, 2);
        for (int c = 0; c < detail::panel_traits<Block>::chunks; ++c)
          for (int i = 0; i < 4; ++i)
            panel[at.values + 4 * (n * c + lane) + i] =
                static_cast<std::uint8_t>(static_cast<std::uint8_t>(block.q[4 * c + i]) +
                                          detail::panel_traits<Block>::byte_offset);
      }
    }
  }
}

/// The panel layout → `count` rows in ggml's row layout (out of place).
template <class Block>
void panels_to_rows(const Block* panels, index count, index blocks, Block* rows) {
  for (index first = 0; first < count; first += quant_panel_rows) {
    const int n = static_cast<int>(std::min(quant_panel_rows, count - first));
    for (int lane = 0; lane < n; ++lane)
      for (index b = 0; b < blocks; ++b)
        rows[(first + lane) * blocks + b] = detail::block_of_panel(panels + first * blocks, n, blocks, lane, b);
  }
}

GROVE_END_NAMESPACE
