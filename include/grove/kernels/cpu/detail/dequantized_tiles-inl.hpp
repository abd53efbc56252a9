// The block formats' (q8, q4) tiles for items with many rows: each tile first dequantizes the
// weight rows it covers into the calling thread's scratch, then runs the fp32 or bf16 tiles of
// expert_tiles-inl.hpp on them. A pass mixes them with the integer dots item by item (the
// engine chooses each gate/up span's path, a down tile each item's): h is fp32 for both. kernel_table.hpp includes this file (no
// include guard, on purpose) right after expert_tiles-inl.hpp, in the same namespace.
//
// Why: the integer dots (quantized_tiles-inl.hpp) pay a scale product, a conversion and an fma
// per block of 32 products for every activation row, where vdpbf16ps does 32 products in one
// instruction. Converting a weight row costs about what one activation row's integer dot
// costs, once per tile instead of once per row; with tens of rows per expert the bf16 or fp32
// products then run at those formats' speed (docs/quantization.md, "Two paths").
//
// The weights a tile sees: d · q exactly, as fp32 (levels without vdpbf16ps; d · q needs at most
// 18 significant bits, so the values are the exact ones dequantize_row gives), or rounded to
// bf16 by the one rounding rule (avx512_bf16, where x and h are rounded to bf16 too, as in the
// bf16 format's pass). So a dequantized pass gives the bits of the fp32 (or bf16) layer whose
// weights are those values, at the same level: the tests hold it to that.
//
// No lambdas here: clang's target pragma does not reach them.

#include "grove/formats/quantized.hpp"
#include "grove/kernels/cpu/tile_contract.hpp"

#ifndef GROVE_TILES_DEQUANT
#error "compiled once per instruction set by grove/kernels/cpu/kernel_table.hpp: include that instead"
#else

#if GROVE_TILES_DEQUANT > 0
#include <immintrin.h>
#endif

GROVE_BEGIN_NAMESPACE
namespace detail {
namespace GROVE_TILES_NS {
namespace dequantized {

/// Stores a batch of weights as the tiles read them: fp32, or bf16 bits by the one rounding rule.
inline void store_weights(const fbatch& v, float* out) { v.store(out); }
inline void store_weights(const fbatch& v, std::uint16_t* out) { v.store_bf16(out); }
inline void store_weights_partial(const fbatch& v, float* out, int n) { v.store_partial(out, n); }
inline void store_weights_partial(const fbatch& v, std::uint16_t* out, int n) { v.store_bf16_partial(out, n); }

#if GROVE_TILES_DEQUANT > 0
/// A block's 32 integer values, in value order, in one register.
inline __m256i block_register(const q8_block& block) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.q));
}
inline __m256i block_register(const q4_block& block) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block.q));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(packed, low_mask), high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
  return _mm256_sub_epi8(_mm256_set_m128i(high, low), _mm256_set1_epi8(8));
}
#endif

/// The 32 values d · q of a whole block into `out`.
template <class Block, class Wd>
inline void dequantize_block(const Block& block, Wd* out) {
#if GROVE_TILES_DEQUANT >= 2
  // AVX-512: sixteen values per conversion.
  const __m256i q = block_register(block);
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(block.scale));
  const __m512 low = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), d);
  const __m512 high = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), d);
  if constexpr (std::is_same_v<Wd, std::uint16_t>) {
#if GROVE_TILES_DEQUANT == 3
    // vcvtne2ps2bf16 rounds to nearest even, as the one rule does; it differs from the rule
    // only on subnormal and NaN inputs, and d · q is neither (d is a finite fp16, normal in fp32).
    const __m512bh both = _mm512_cvtne2ps_pbh(high, low);
    _mm512_storeu_si512(out, reinterpret_cast<const __m512i&>(both));
#else
    fbatch{low}.store_bf16(out);
    fbatch{high}.store_bf16(out + 16);
#endif
  } else {
    _mm512_storeu_ps(out, low);
    _mm512_storeu_ps(out + 16, high);
  }
#elif GROVE_TILES_DEQUANT == 1
  // AVX2: eight values per conversion.
  const __m256i q = block_register(block);
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(block.scale));
  const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 2; ++e) {
      const __m128i eight = e == 0 ? halves[h] : _mm_srli_si128(halves[h], 8);
      store_weights(fbatch{_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), d)}, out + 16 * h + 8 * e);
    }
#else
  std::int8_t q[quant_block_size];
  block_values(block, q);
  const fbatch d = fbatch::broadcast(f16_bits_to_float(block.scale));
  for (int i = 0; i < quant_block_size; i += lanes) store_weights(fbatch::load_int8(q + i) * d, out + i);
#endif
}

/// `count` weight rows of `n` values (blocks_per_row(n) blocks each) into rows of n elements
/// at `out`: d · q of every value (exact in fp32), the last block's padding left out.
template <class Block, class Wd>
void dequantize_rows(const Block* rows, index count, index n, Wd* out) {
  const index blocks = blocks_per_row(n), whole = n / quant_block_size;
  // The rows are contiguous: ask for the lines `ahead` bytes on, one per line walked, so that
  // the stream runs at the memory's rate rather than at its latency.
  constexpr index ahead = 4096, per_line = 64 / sizeof(Block) > 0 ? 64 / sizeof(Block) : 1;
  const char* const base = reinterpret_cast<const char*>(rows);
  std::int8_t q[quant_block_size];
  for (index r = 0; r < count; ++r) {
    const Block* row = rows + r * blocks;
    Wd* to = out + r * n;
    for (index b = 0; b < whole; ++b) {
      const index at = r * blocks + b;
      if (at % per_line == 0) prefetch(base + at * static_cast<index>(sizeof(Block)) + ahead);
      dequantize_block(row[b], to + b * quant_block_size);
    }
    if (whole < blocks) {
      // The last, padded block: its n − 32·whole values.
      block_values(row[whole], q);
      const fbatch d = fbatch::broadcast(f16_bits_to_float(row[whole].scale));
      const int left = static_cast<int>(n - whole * quant_block_size);
      Wd* at = to + whole * quant_block_size;
      for (int i = 0; i < left; i += lanes) {
        const fbatch v = fbatch::load_int8(q + i) * d;
        if (left - i >= lanes)
          store_weights(v, at + i);
        else
          store_weights_partial(v, at + i, left - i);
      }
    }
  }
}

/// The operands of a dequantized pass: the staged x (fp32, or bf16 bits for vdpbf16ps) and the
/// weights as the same element.
template <class Pass>
using operands_of = typename operands_for<std::remove_const_t<std::remove_pointer_t<decltype(Pass::x)>>,
                                          std::remove_const_t<std::remove_pointer_t<decltype(Pass::x)>>>::type;

/// This thread's part of the pass's weight scratch (tile_pass::weight_scratch).
template <class Wd, class Pass>
Wd* scratch_of(const Pass& pass, int thread) {
  return reinterpret_cast<Wd*>(pass.weight_scratch + static_cast<index>(thread) * pass.weight_scratch_stride);
}

/// A gate/up tile: its gate and up rows [col_begin, col_end) dequantized, then the fp32 or bf16
/// tile on them, into fp32 h (no prefetch of the next tile: its weights are blocks, not these
/// elements).
template <class Pass>
void gate_up_tile(const Pass& pass, const detail::gate_up_tile& tile, const detail::gate_up_tile*, int thread) {
  using P = operands_of<Pass>;
  using Wd = typename P::w_type;
  const auto& item = pass.gate_up_spans[tile.item];
  const index H = pass.hidden, blocks = blocks_per_row(H), width = tile.col_end - tile.col_begin;
  Wd* gate = scratch_of<Wd>(pass, thread);
  Wd* up = gate + width * H;
  dequantize_rows(item.gate + tile.col_begin * blocks, width, H, gate);
  dequantize_rows(item.up + tile.col_begin * blocks, width, H, up);
  // The scratch holds columns [col_begin, col_end) as rows 0…width−1; h's place stays the same.
  detail::expert_item<Wd> rows{gate,         up,           nullptr,  item.inter, item.rows, item.row_count,
                               item.h_offset + tile.col_begin, item.first_row, item.id, item.adjugate};
  const detail::gate_up_tile local{tile.item, tile.row_begin, tile.row_end, 0, static_cast<std::int32_t>(width)};
  gate_up_item_tile<P>(pass, rows, local, nullptr);
}

/// What down_panels reads of a pass: h (here h_staged, elements like x's) and the group slots.
template <class A>
struct staged_h {
  const A* h;
  const std::int32_t* group_slots;
};

/// A down tile's items. An item of at least dequantize_from_rows rows: its down rows
/// [c_begin, c_end) dequantized, then the fp32 or bf16 item panels on them and on h_staged. A
/// smaller one: the integer dots (integer_down_item). (A struct, not a lambda: clang's target
/// pragma does not reach lambdas.)
template <class P, class Pass>
struct down_items {
  typename P::w_type* scratch;

  template <class Item>
  void operator()(const Pass& pass, const Item& item, index c_begin, index c_end, float* partial,
                  const Item* next_item, index next_col) const {
    if (item.row_count < pass.dequantize_from_rows) {
      pass.integer_down_item(pass.integer_pass, item, c_begin, c_end, partial, next_item, next_col);
      return;
    }
    using Wd = typename P::w_type;
    const index width = c_end - c_begin;
    dequantize_rows(item.down + c_begin * blocks_per_row(item.inter), width, item.inter, scratch);
    const detail::expert_item<Wd> rows{nullptr,    nullptr,        scratch,       item.inter, item.rows,
                                       item.row_count, item.h_offset, item.first_row, item.id,    item.adjugate};
    const staged_h<typename P::a_type> view{pass.h_staged, pass.group_slots};
    down_panel_items<P>{}(view, rows, 0, width, partial, static_cast<const detail::expert_item<Wd>*>(nullptr), 0);
  }
};

/// One down tile, group by group in the canonical order (down_tile_in_groups), each item by
/// the path its rows choose. The prefetch bound covers both paths' panel widths (the integer
/// dots' are at most 8 rows).
template <class Pass>
void down_tile(const Pass& pass, index tile, index following, float* partial, int thread) {
  using P = operands_of<Pass>;
  constexpr index prefetch_cols = down_cols(1) > 8 ? down_cols(1) : 8;
  down_tile_in_groups(pass, tile, following, partial, prefetch_cols,
                      down_items<P, Pass>{scratch_of<typename P::w_type>(pass, thread)});
}

}  // namespace dequantized
}  // namespace GROVE_TILES_NS
}  // namespace detail
GROVE_END_NAMESPACE

#endif  // GROVE_TILES_DEQUANT
