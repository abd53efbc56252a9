#pragma once

// The block-quantized weight formats (docs/quantization.md): q8 and q4. A weight matrix [out, in]
// keeps each row as blocks of 32 values along `in`, every block with its own scale, in the byte
// layout of ggml's Q8_0 and Q4_0, so such weights convert without loss in either direction.
// When `in` is not a multiple of 32, a row's last block is padded with zeros.
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
//   dot          per block b, the 32 products split into 8 lanes of 4 consecutive values; each
//                lane's 4 products sum exactly in int32, p_j; the lane accumulates
//                acc_j = fma(a_b · d_b, float(p_j), acc_j) over the blocks in ascending order,
//                from +0; then ((acc0 + acc1) + (acc2 + acc3)) + ((acc4 + acc5) + (acc6 + acc7)).
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
  float acc[8] = {};
  std::int8_t w[quant_block_size];
  for (index b = 0; b < blocks; ++b) {
    block_values(weights[b], w);
    const float d = scale[b] * f16_bits_to_float(weights[b].scale);
    for (int j = 0; j < 8; ++j) {
      std::int32_t p = 0;
      for (int i = 4 * j; i < 4 * j + 4; ++i) p += static_cast<std::int32_t>(q[b * quant_block_size + i]) * w[i];
      acc[j] = std::fma(d, static_cast<float>(p), acc[j]);
    }
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

GROVE_END_NAMESPACE
