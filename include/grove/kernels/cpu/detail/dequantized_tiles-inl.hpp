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
/// q4's 16 bytes (byte j: value j low, value j + 16 high) as its 32 values n − 8, in value order.
inline __m256i q4_values(__m128i packed) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(packed, low_mask), high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
  return _mm256_sub_epi8(_mm256_set_m128i(high, low), _mm256_set1_epi8(8));
}
/// A block's 32 integer values, in value order, in one register.
inline __m256i block_register(const q8_block& block) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.q));
}
inline __m256i block_register(const q4_block& block) {
  return q4_values(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block.q)));
}
#endif

#if GROVE_TILES_DEQUANT >= 2
/// The 32 values d · q of a row whose values 0..15 and 16..31 are the int8 in `low` and `high`.
template <class Wd>
inline void dequantize_halves(__m128i low, __m128i high, __m512 d, Wd* out) {
  const __m512 first = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(low)), d);
  const __m512 second = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(high)), d);
  if constexpr (std::is_same_v<Wd, std::uint16_t>) {
#if GROVE_TILES_DEQUANT == 3
    // vcvtne2ps2bf16 rounds to nearest even, as the one rule does; it differs from the rule
    // only on subnormal and NaN inputs, and d · q is neither (d is a finite fp16, normal in fp32).
    const __m512bh both = _mm512_cvtne2ps_pbh(second, first);
    _mm512_storeu_si512(out, reinterpret_cast<const __m512i&>(both));
#else
    fbatch{first}.store_bf16(out);
    fbatch{second}.store_bf16(out + 16);
#endif
  } else {
    _mm512_storeu_ps(out, first);
    _mm512_storeu_ps(out + 16, second);
  }
}
#endif

/// The 32 values d · q of a whole block into `out`.
template <class Block, class Wd>
inline void dequantize_block(const Block& block, Wd* out) {
#if GROVE_TILES_DEQUANT >= 2
  // AVX-512: sixteen values per conversion.
  const __m256i q = block_register(block);
  dequantize_halves(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1), _mm512_set1_ps(_cvtsh_ss(block.scale)),
                    out);
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

#if GROVE_TILES_DEQUANT >= 2
/// The 16 rows' scales of a panel block, and row r's broadcast to every lane.
inline __m512 panel_scales(const std::uint8_t* at) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
}
inline __m512 scale_of_row(__m512 scales, int row) { return _mm512_permutexvar_ps(_mm512_set1_epi32(row), scales); }

/// 4 × 4 transposes of 32-bit words within each 128-bit lane of w[0..3]: t[m]'s lane L holds
/// word m of lane L of each w, in order.
inline void transpose_words(const __m512i* w, __m512i* t) {
  const __m512i a = _mm512_unpacklo_epi32(w[0], w[1]), b = _mm512_unpackhi_epi32(w[0], w[1]);
  const __m512i c = _mm512_unpacklo_epi32(w[2], w[3]), d = _mm512_unpackhi_epi32(w[2], w[3]);
  t[0] = _mm512_unpacklo_epi64(a, c);
  t[1] = _mm512_unpackhi_epi64(a, c);
  t[2] = _mm512_unpacklo_epi64(b, d);
  t[3] = _mm512_unpackhi_epi64(b, d);
}

/// Lane L of v.
inline __m128i lane_of(__m512i v, int L) {
  switch (L) {
    case 0: return _mm512_castsi512_si128(v);
    case 1: return _mm512_extracti32x4_epi32(v, 1);
    case 2: return _mm512_extracti32x4_epi32(v, 2);
    default: return _mm512_extracti32x4_epi32(v, 3);
  }
}

/// A block of a whole panel of 16 rows (its scales and values at `scale_bytes` and `at`) into
/// rows 0..15 of `out` (row r at out + r·ld): the chunks' words transposed in registers, so that
/// each row's values lie side by side again, then converted. Chunk c's word of row r is in
/// 128-bit lane r / 4, word r % 4.
template <class Wd>
inline void dequantize_panel_block(const q8_block*, const std::uint8_t* scale_bytes, const std::uint8_t* at, index ld,
                                   Wd* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // q + 128 back to q
  __m512i v[8];
  for (int c = 0; c < 8; ++c) v[c] = _mm512_xor_si512(_mm512_loadu_si512(at + 64 * c), flip);
  // low[m] lane L: values 0..15 of row 4L + m (chunks 0..3); high[m]: values 16..31 (chunks 4..7).
  __m512i low[4], high[4];
  transpose_words(v, low);
  transpose_words(v + 4, high);
  const __m512 scales = panel_scales(scale_bytes);
  for (int m = 0; m < 4; ++m)
    for (int L = 0; L < 4; ++L) {
      const int row = 4 * L + m;
      dequantize_halves(lane_of(low[m], L), lane_of(high[m], L), scale_of_row(scales, row), out + row * ld);
    }
}
template <class Wd>
inline void dequantize_panel_block(const q4_block*, const std::uint8_t* scale_bytes, const std::uint8_t* at, index ld,
                                   Wd* out) {
  __m512i v[4];
  for (int c = 0; c < 4; ++c) v[c] = _mm512_loadu_si512(at + 64 * c);
  // t[m] lane L: the 16 bytes of row 4L + m, as ggml stores them (value j low, j + 16 high).
  __m512i t[4];
  transpose_words(v, t);
  const __m512i low_mask = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  const __m512 scales = panel_scales(scale_bytes);
  for (int m = 0; m < 4; ++m) {
    const __m512i first = _mm512_sub_epi8(_mm512_and_si512(t[m], low_mask), eight);
    const __m512i second = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(t[m], 4), low_mask), eight);
    for (int L = 0; L < 4; ++L) {
      const int row = 4 * L + m;
      dequantize_halves(lane_of(first, L), lane_of(second, L), scale_of_row(scales, row), out + row * ld);
    }
  }
}
#endif

/// Block b of lane `lane` of a panel of `rows` rows and `blocks` blocks, as a block in ggml's
/// layout: the lane's scale and its chunks of 4 values gathered.
template <class Block>
inline Block lane_block(const std::uint8_t* panel, int rows, index blocks, int lane, index b) {
  const block_offsets at = panel_block_offsets<Block>(b, rows, blocks);
  Block block;
  std::memcpy(&block.scale, panel + at.scales + 2 * lane, 2);
  const std::uint8_t* values = panel + at.values + 4 * lane;
  for (int c = 0; c < panel_traits<Block>::chunks; ++c) std::memcpy(block.q + 4 * c, values + 4 * rows * c, 4);
  if constexpr (panel_traits<Block>::byte_offset != 0) {
    // q + 128 back to q: the offset is 128, a flip of each byte's top bit.
    for (int i = 0; i < quant_block_size; ++i)
      block.q[i] = static_cast<std::int8_t>(static_cast<std::uint8_t>(block.q[i]) ^ 0x80u);
  }
  return block;
}

/// How far ahead of the conversion a panel's lines are asked for: enough that the stream runs
/// at the memory's rate rather than at its latency.
constexpr index dequantize_ahead = 4096;

/// Rows [first, first + count) of a matrix of `rows` rows of `n` values in panels
/// (formats/quantized.hpp) into rows of n elements at `out`, `ld` apart: d · q of every value
/// (exact in fp32), the last block's padding left out.
template <class Block, class Wd>
void dequantize_rows(const Block* matrix, index rows, index first, index count, index n, Wd* out, index ld) {
  const index blocks = blocks_per_row(n), whole = n / quant_block_size;
  std::int8_t q[quant_block_size];
  for (index r = first; r < first + count; ++r) {
    const panel_place place = place_of_row(r, rows, blocks);
    const auto* panel = reinterpret_cast<const std::uint8_t*>(matrix + place.first_unit);
    const index block_bytes = place.rows * static_cast<index>(sizeof(Block));
#if GROVE_TILES_DEQUANT >= 2
    if (place.lane == 0 && place.rows == quant_panel_rows && r + quant_panel_rows <= first + count && whole == blocks) {
      // A whole panel of whole blocks: 16 rows at once, block by block.
      for (index b = 0; b < blocks; ++b) {
        prefetch_bytes(panel + b * block_bytes + dequantize_ahead, block_bytes);
        const block_offsets at = panel_block_offsets<Block>(b, quant_panel_rows, blocks);
        dequantize_panel_block(static_cast<const Block*>(nullptr), panel + at.scales, panel + at.values, ld,
                               out + (r - first) * ld + b * quant_block_size);
      }
      r += quant_panel_rows - 1;
      continue;
    }
#endif
    // One row: its lanes gathered block by block. A panel's rows lie side by side, so its first
    // row read walks all its lines: that row asks for them ahead; the panel's other rows then
    // read them from the cache.
    const bool leads = place.lane == 0 || r == first;
    Wd* to = out + (r - first) * ld;
    for (index b = 0; b < whole; ++b) {
      if (leads) prefetch_bytes(panel + b * block_bytes + dequantize_ahead, block_bytes);
      dequantize_block(lane_block<Block>(panel, place.rows, blocks, place.lane, b), to + b * quant_block_size);
    }
    if (whole < blocks) {
      // The last, padded block: its n − 32·whole values.
      const Block last = lane_block<Block>(panel, place.rows, blocks, place.lane, whole);
      block_values(last, q);
      const fbatch d = fbatch::broadcast(f16_bits_to_float(last.scale));
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
  const index H = pass.hidden, ld = H + pass.weight_row_pad, width = tile.col_end - tile.col_begin;
  Wd* gate = scratch_of<Wd>(pass, thread);
  Wd* up = gate + width * ld;
  dequantize_rows(item.gate, item.inter, tile.col_begin, width, H, gate, ld);
  dequantize_rows(item.up, item.inter, tile.col_begin, width, H, up, ld);
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
  index weight_row_pad;
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
    dequantize_rows(item.down, pass.hidden, c_begin, width, item.inter, scratch, item.inter + pass.weight_row_pad);
    const detail::expert_item<Wd> rows{nullptr,    nullptr,        scratch,       item.inter, item.rows,
                                       item.row_count, item.h_offset, item.first_row, item.id,    item.adjugate};
    const staged_h<typename P::a_type> view{pass.h_staged, pass.group_slots, pass.weight_row_pad};
    down_panel_items<P>{}(view, rows, 0, width, partial, static_cast<const detail::expert_item<Wd>*>(nullptr), 0);
  }
};

/// One down tile, group by group in the canonical order (down_tile_in_groups), each item by
/// the path its rows choose.
template <class Pass>
void down_tile(const Pass& pass, index tile, index following, float* partial, int thread) {
  using P = operands_of<Pass>;
  down_tile_in_groups(pass, tile, following, partial, down_cols(1),
                      down_items<P, Pass>{scratch_of<typename P::w_type>(pass, thread)});
}

}  // namespace dequantized
}  // namespace GROVE_TILES_NS
}  // namespace detail
GROVE_END_NAMESPACE

#endif  // GROVE_TILES_DEQUANT
