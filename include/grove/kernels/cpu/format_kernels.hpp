#pragma once

// The CPU half of the format table (formats/weight_format.hpp), as ggml keeps `type_traits_cpu`
// beside `type_traits`: for each weight format, how the tile kernels read its elements and
// which kernels of an instruction-set row (kernel_table.hpp) run it, best first. A new format
// is a new row here and new columns in the kernel table.

#include <cstdint>
#include <limits>

#include "grove/config/dynamic.hpp"
#include "grove/formats/format_traits.hpp"

GROVE_BEGIN_NAMESPACE

/// Which kernels the CPU runner runs q8 and q4 weights with (docs/quantization.md, "Two paths").
enum class quantized_kernels {
  automatic,     ///< per expert and adjugate by its rows (cpu_runner_options::dequantize_from_rows); the default
  integer_dots,  ///< x and h quantized to int8 per block; integer dots with the blocks (every item)
  dequantized,   ///< each tile's weights dequantized to bf16 (avx512_bf16) or fp32, then those tiles (every item)
};

namespace detail {

template <class Storage>
struct cpu_format;

/// fp32 weights: fp32 activations, fp32 h, one kernel column at every level.
template <>
struct cpu_format<float> {
  using weight_bits = float;  ///< how the tile kernels see one weight
  /// Calls `fn.template operator()<A, W, Hs>()` with the operands of the kernels that run this
  /// format at `row`'s level: A the staged activations, W the weight bits, Hs the elements of h.
  template <class Row, class Fn>
  static void with_kernels(const Row&, Fn&& fn) {
    fn.template operator()<float, float, float>();
  }
};

/// BF16 weights, read as their bits (Eigen::bfloat16 is a standard-layout wrapper of one unsigned
/// short). Where the level has vdpbf16ps (avx512_bf16) x and h are rounded to bf16 and the dots
/// run bf16 × bf16 with fp32 accumulation; elsewhere the weights are widened to fp32.
template <>
struct cpu_format<bf16> {
  using weight_bits = std::uint16_t;
  template <class Row, class Fn>
  static void with_kernels(const Row& row, Fn&& fn) {
    if (row.bf16_dot.gate_up != nullptr)
      fn.template operator()<std::uint16_t, std::uint16_t, std::uint16_t>();
    else
      fn.template operator()<float, std::uint16_t, float>();
  }
};

/// The block formats, two paths, chosen item by item (docs/quantization.md, "Two paths").
/// Integer dots: x and h quantized to int8 per block of 32, against weights in panels of 16
/// rows (kernels/cpu/detail/quantized_tiles-inl.hpp). Dequantized tiles: each tile converts its
/// weight rows once and runs the bf16 kernels (x and h rounded to bf16) where the level has
/// vdpbf16ps, the fp32 ones elsewhere (dequantized_tiles-inl.hpp). h is fp32 for both. The
/// choice depends on the item's rows alone, which are the same whichever batch, shard or rank
/// the item runs in (an expert-parallel layer gives the single process's bits).
template <class Block>
struct block_format_kernels {
  using weight_bits = Block;
  /// The rows from which `automatic` runs an item (a gate/up span) dequantized, unless the
  /// runner sets its own (cpu_runner_options::dequantize_from_rows): none. Since the weights
  /// are in panels, one vpdpbusd does 64 products of 16 rows where vdpbf16ps does 32, and the
  /// integer dots were the faster path at every measured shape: GroveMoE-Inst, T = 16 to 2048
  /// (up to 128 rows per expert), 1 and 2 threads (docs/quantization.md, "Two paths").
  static constexpr index dequantize_from_rows = std::numeric_limits<index>::max();
  /// The rows from which an item runs dequantized under `kernels` (0: every item; none reaches
  /// the largest index); `automatic` takes `from_rows`, or the default above when it is 0.
  static constexpr index dequantize_from(quantized_kernels kernels, index from_rows = 0) {
    switch (kernels) {
      case quantized_kernels::dequantized: return 0;
      case quantized_kernels::integer_dots: return std::numeric_limits<index>::max();
      case quantized_kernels::automatic: break;
    }
    return from_rows > 0 ? from_rows : dequantize_from_rows;
  }

  /// Calls `fn.template operator()<A, Block, float>()` with the dequantized tiles' operands at
  /// `row`'s level (A: bf16 bits where it has vdpbf16ps, else fp32); the engine runs the integer
  /// dots' kernels (A = std::int8_t) beside them.
  template <class Row, class Fn>
  static void with_kernels(const Row& row, Fn&& fn) {
    if (row.template forward<std::uint16_t, Block, float>().gate_up != nullptr)
      fn.template operator()<std::uint16_t, Block, float>();
    else
      fn.template operator()<float, Block, float>();
  }
};
template <>
struct cpu_format<q8_block> : block_format_kernels<q8_block> {};
template <>
struct cpu_format<q4_block> : block_format_kernels<q4_block> {};

/// fp64 weights have no fused kernels: the CPU runner runs them with the plain loops, the
/// precision of the finite-difference tests.
template <>
struct cpu_format<double> {
  using weight_bits = double;
};

template <class W>
using weight_bits_t = typename cpu_format<W>::weight_bits;

}  // namespace detail
GROVE_END_NAMESPACE
