#pragma once

// The CPU half of the format table (formats/weight_format.hpp), as ggml keeps `type_traits_cpu`
// beside `type_traits`: for each weight format, how the tile kernels read its elements and
// which kernels of an instruction-set row (kernel_table.hpp) run it, best first. A new format
// is a new row here and new columns in the kernel table.

#include <cstdint>

#include "grove/formats/format_traits.hpp"

GROVE_BEGIN_NAMESPACE
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

/// The block formats: x and h are quantized to int8 per block of 32 for integer dots
/// (kernels/cpu/detail/quantized_tiles-inl.hpp); h is computed in fp32 first.
template <>
struct cpu_format<q8_block> {
  using weight_bits = q8_block;
  template <class Row, class Fn>
  static void with_kernels(const Row&, Fn&& fn) {
    fn.template operator()<std::int8_t, q8_block, float>();
  }
};
template <>
struct cpu_format<q4_block> {
  using weight_bits = q4_block;
  template <class Row, class Fn>
  static void with_kernels(const Row&, Fn&& fn) {
    fn.template operator()<std::int8_t, q4_block, float>();
  }
};

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
