#pragma once

// The CPU tile kernels, compiled once per instruction-set level, and one table row of kernel
// functions per level (in the manner of ggml's per-type trait tables): the engine looks its
// level's row up once per pass and calls through it, instead of switching on the level at
// every call site.

#include <cstdint>

#include "grove/config/dynamic.hpp"
#include "grove/formats/quantized.hpp"
#include "grove/kernels/cpu/tile_contract.hpp"
#include "grove/simd/batch.hpp"

// The tile kernels, once per instruction-set level (see simd/batch.hpp on regions).
#define GROVE_TILES_NS tiles_scalar
#define GROVE_TILES_DEQUANT 0
#define GROVE_TILES_ARCH simd::scalar
#define GROVE_TILES_BF16_DOT 0
#define GROVE_TILES_QDOT 0
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/dequantized_tiles-inl.hpp"
#undef GROVE_TILES_DEQUANT
#include "grove/kernels/cpu/detail/backward_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/quantized_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
#undef GROVE_TILES_QDOT

#if GROVE_SIMD_X86
GROVE_SIMD_SILENCE_BEGIN
GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX2)
#define GROVE_TILES_NS tiles_avx2
#define GROVE_TILES_DEQUANT 1
#define GROVE_TILES_ARCH simd::avx2
#define GROVE_TILES_BF16_DOT 0
#define GROVE_TILES_QDOT 1
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/dequantized_tiles-inl.hpp"
#undef GROVE_TILES_DEQUANT
#include "grove/kernels/cpu/detail/backward_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/quantized_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
#undef GROVE_TILES_QDOT
GROVE_SIMD_END_REGION()

GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX512)
#define GROVE_TILES_NS tiles_avx512
#define GROVE_TILES_DEQUANT 2
#define GROVE_TILES_ARCH simd::avx512
#define GROVE_TILES_BF16_DOT 0
#define GROVE_TILES_QDOT 1
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/dequantized_tiles-inl.hpp"
#undef GROVE_TILES_DEQUANT
#include "grove/kernels/cpu/detail/backward_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/quantized_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
#undef GROVE_TILES_QDOT
GROVE_SIMD_END_REGION()

GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX512_BF16)
#define GROVE_TILES_NS tiles_avx512_bf16
#define GROVE_TILES_DEQUANT 3
#define GROVE_TILES_ARCH simd::avx512_bf16
#define GROVE_TILES_BF16_DOT 1
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/dequantized_tiles-inl.hpp"
#undef GROVE_TILES_DEQUANT
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
GROVE_SIMD_END_REGION()

// The block formats' integer dots with vpdpbusd (AVX512_VNNI, which every CPU with AVX512_BF16
// has; the level checks it): the avx512_bf16 row's q8 and q4 kernels. The other tiles of this
// namespace are AVX-512's, compiled again here only because the quantized tiles use them.
GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX512_VNNI)
#define GROVE_TILES_NS tiles_avx512_vnni
#define GROVE_TILES_ARCH simd::avx512
#define GROVE_TILES_BF16_DOT 0
#define GROVE_TILES_QDOT 2
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/quantized_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
#undef GROVE_TILES_QDOT
GROVE_SIMD_END_REGION()
GROVE_SIMD_SILENCE_END
#endif

GROVE_BEGIN_NAMESPACE
namespace detail {

/// The forward tile kernels for one combination of operands: A staged activations, W weight
/// bits, Hs element of h (see tile_pass).
/// Both get the calling thread's number, for kernels with per-thread scratch.
template <class A, class W, class Hs>
struct forward_kernels {
  void (*gate_up)(const tile_pass<A, W, Hs>&, const gate_up_tile&, const gate_up_tile* following, int thread) = nullptr;
  void (*down)(const tile_pass<A, W, Hs>&, index tile, index following, float* partial, int thread) = nullptr;
};

/// The integer dots of a block format alone (out [rows, cols] of `rows` quantized activation
/// rows and `cols` weight rows of `blocks` blocks each): for the tests of the arithmetic.
template <class Block>
using quantized_dots = void (*)(const std::int8_t* q, const float* scales, index rows, const Block* w, index cols,
                                index blocks, float* out);

/// One item of a down tile by a block format's integer dots (tile_pass::integer_down_item).
template <class Block>
using integer_down_item = void (*)(const void* integer_pass, const expert_item<Block>& item, index c_begin,
                                   index c_end, float* partial, const expert_item<Block>* next_item, index next_col);

/// Every kernel of the fused CPU pass at one instruction-set level. A null entry is a kernel
/// the level does not have (vdpbf16ps below avx512_bf16).
struct cpu_kernel_table {
  simd::isa level;
  forward_kernels<float, float, float> f32;                                   ///< fp32 weights
  forward_kernels<float, std::uint16_t, float> bf16_widened;                  ///< bf16 weights widened to fp32
  forward_kernels<std::uint16_t, std::uint16_t, std::uint16_t> bf16_dot;      ///< bf16 × bf16 (vdpbf16ps)
  forward_kernels<std::int8_t, q8_block, float> q8;                           ///< q8 weights, int8 activations
  forward_kernels<std::int8_t, q4_block, float> q4;                           ///< q4 weights, int8 activations
  // The block formats dequantized per tile (dequantized_tiles-inl.hpp), for items with many
  // rows; their down tiles run the other items through q8_down_item / q4_down_item:
  forward_kernels<float, q8_block, float> q8_widened;                         ///< to fp32, fp32 products
  forward_kernels<float, q4_block, float> q4_widened;
  forward_kernels<std::uint16_t, q8_block, float> q8_bf16_dot;                ///< to bf16, vdpbf16ps
  forward_kernels<std::uint16_t, q4_block, float> q4_bf16_dot;
  integer_down_item<q8_block> q8_down_item;                                   ///< one item by the integer dots
  integer_down_item<q4_block> q4_down_item;
  quantized_dots<q8_block> q8_dots;
  quantized_dots<q4_block> q4_dots;
  void (*stage_f32)(const float* x, index ldx_in, index hidden, index r0, index r1, float* out, index ld_out);
  void (*stage_bf16)(const float* x, index ldx_in, index hidden, index r0, index r1, std::uint16_t* out, index ld_out);
  void (*dh)(const backward_pass&, const gate_up_tile&, float* packed);
  void (*gradient)(const backward_pass&, const gradient_tile&);
  void (*dx)(const backward_pass&, index tile, float* packed, float* partial);

  /// The forward kernels for staged activations A, weight bits W and h elements Hs.
  template <class A, class W, class Hs>
  [[nodiscard]] const forward_kernels<A, W, Hs>& forward() const {
    constexpr bool integer = std::is_same_v<A, std::int8_t>, bf16_bits = std::is_same_v<A, std::uint16_t>;
    if constexpr (std::is_same_v<W, q8_block> && integer)
      return q8;
    else if constexpr (std::is_same_v<W, q8_block> && bf16_bits)
      return q8_bf16_dot;
    else if constexpr (std::is_same_v<W, q8_block>)
      return q8_widened;
    else if constexpr (std::is_same_v<W, q4_block> && integer)
      return q4;
    else if constexpr (std::is_same_v<W, q4_block> && bf16_bits)
      return q4_bf16_dot;
    else if constexpr (std::is_same_v<W, q4_block>)
      return q4_widened;
    else if constexpr (std::is_same_v<A, std::uint16_t>)
      return bf16_dot;
    else if constexpr (std::is_same_v<W, std::uint16_t>)
      return bf16_widened;
    else
      return f32;
  }
  /// The integer dots' kernel for one item of a down tile, for q8 or q4 blocks.
  template <class Block>
  [[nodiscard]] integer_down_item<Block> block_down_item() const {
    if constexpr (std::is_same_v<Block, q8_block>)
      return q8_down_item;
    else
      return q4_down_item;
  }
  template <class A>
  [[nodiscard]] auto stage() const {
    if constexpr (std::is_same_v<A, std::uint16_t>)
      return stage_bf16;
    else
      return stage_f32;
  }
};

/// One table row: N's forward tiles, NBACKWARD's backward tiles, the given bf16 × bf16 kernels
/// (or nullptr) and NQ's quantized tiles. A macro because a namespace cannot be a template
/// argument.
#define GROVE_KERNEL_ROW(level_value, N, NBACKWARD, BF16_GATE_UP, BF16_DOWN, NQ)                                 \
  cpu_kernel_table {                                                                                            \
    level_value, {&N::gate_up_tile<tile_pass<float, float, float>>, &N::down_tile<tile_pass<float, float, float>>}, \
        {&N::gate_up_tile<tile_pass<float, std::uint16_t, float>>,                                              \
         &N::down_tile<tile_pass<float, std::uint16_t, float>>},                                                \
        {BF16_GATE_UP, BF16_DOWN},                                                                              \
        {&NQ::quantized::gate_up_tile<tile_pass<std::int8_t, q8_block, float>>,                                 \
         &NQ::quantized::down_tile<tile_pass<std::int8_t, q8_block, float>>},                                   \
        {&NQ::quantized::gate_up_tile<tile_pass<std::int8_t, q4_block, float>>,                                 \
         &NQ::quantized::down_tile<tile_pass<std::int8_t, q4_block, float>>},                                   \
        {&N::dequantized::gate_up_tile<tile_pass<float, q8_block, float>>,                                      \
         &N::dequantized::down_tile<tile_pass<float, q8_block, float>>},                                        \
        {&N::dequantized::gate_up_tile<tile_pass<float, q4_block, float>>,                                      \
         &N::dequantized::down_tile<tile_pass<float, q4_block, float>>},                                        \
        {}, {}, &NQ::quantized::down_item<tile_pass<std::int8_t, q8_block, float>>,                             \
        &NQ::quantized::down_item<tile_pass<std::int8_t, q4_block, float>>,                                     \
        &NQ::quantized::dots<q8_block>, &NQ::quantized::dots<q4_block>,                                         \
        static_cast<void (*)(const float*, index, index, index, index, float*, index)>(&N::stage_rows),          \
        static_cast<void (*)(const float*, index, index, index, index, std::uint16_t*, index)>(&N::stage_rows),  \
        &NBACKWARD::backward::dh_tile<backward_pass>, &NBACKWARD::backward::gradient_tile<backward_pass>,          \
        &NBACKWARD::backward::dx_tile<backward_pass>                                                             \
  }

/// The table row of an instruction-set level (simd::require_supported says whether it runs here).
[[nodiscard]] inline const cpu_kernel_table& kernels_for(simd::isa level) {
  using bf16_pass = tile_pass<std::uint16_t, std::uint16_t, std::uint16_t>;
  static const cpu_kernel_table scalar_row =
      GROVE_KERNEL_ROW(simd::isa::scalar, tiles_scalar, tiles_scalar, nullptr, nullptr, tiles_scalar);
#if GROVE_SIMD_X86
  static const cpu_kernel_table avx2_row =
      GROVE_KERNEL_ROW(simd::isa::avx2, tiles_avx2, tiles_avx2, nullptr, nullptr, tiles_avx2);
  static const cpu_kernel_table avx512_row =
      GROVE_KERNEL_ROW(simd::isa::avx512, tiles_avx512, tiles_avx512, nullptr, nullptr, tiles_avx512);
  // AVX512_BF16 adds vdpbf16ps for bf16 × bf16 and (with AVX512_VNNI) vpdpbusd for the block
  // formats; its fp32 and widened-bf16 kernels are AVX-512's.
  static const cpu_kernel_table avx512_bf16_row = [] {
    cpu_kernel_table row =
        GROVE_KERNEL_ROW(simd::isa::avx512_bf16, tiles_avx512, tiles_avx512, &tiles_avx512_bf16::gate_up_tile<bf16_pass>,
                         &tiles_avx512_bf16::down_tile<bf16_pass>, tiles_avx512_vnni);
    using q8_pass = tile_pass<std::uint16_t, q8_block, float>;
    using q4_pass = tile_pass<std::uint16_t, q4_block, float>;
    row.q8_bf16_dot = {&tiles_avx512_bf16::dequantized::gate_up_tile<q8_pass>,
                       &tiles_avx512_bf16::dequantized::down_tile<q8_pass>};
    row.q4_bf16_dot = {&tiles_avx512_bf16::dequantized::gate_up_tile<q4_pass>,
                       &tiles_avx512_bf16::dequantized::down_tile<q4_pass>};
    return row;
  }();
  switch (level) {
    case simd::isa::scalar: return scalar_row;
    case simd::isa::avx2: return avx2_row;
    case simd::isa::avx512: return avx512_row;
    case simd::isa::avx512_bf16: return avx512_bf16_row;
  }
#else
  (void)level;
  (void)sizeof(bf16_pass);
#endif
  return scalar_row;
}
#undef GROVE_KERNEL_ROW

}  // namespace detail
GROVE_END_NAMESPACE
