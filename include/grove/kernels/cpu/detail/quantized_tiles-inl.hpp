// The tile kernels of the block formats (q8, q4; formats/quantized.hpp), compiled once per
// instruction-set level: kernel_table.hpp includes this file (no include guard, on purpose)
// right after expert_tiles-inl.hpp, in the same namespace, with GROVE_TILES_QDOT naming the
// integer dot: 0 plain loops, 1 AVX2 (vpmaddubsw, vpmaddwd on 8 rows), 2 AVX512_VNNI (vpdpbusd
// on 16 rows).
//
// The weights are in panels of 16 rows (formats/quantized.hpp): one register lane per weight
// row, so one instruction multiplies 4 values of each of 8 or 16 rows with the same 4 values of
// an activation row (broadcast), and a block's scale product, conversion and fma serve 8 or 16
// rows at once. Every level computes the dot in the order formats/quantized.hpp defines (each
// block's products summed exactly, one fma per block in ascending order), so the levels agree
// bit for bit. A pass:
//  1. x is quantized per row and block (the engine, before the tiles);
//  2. gate_up_tile: the integer dots of x's rows with a span's gate and up rows, SwiGLU into h
//     (fp32, the layout of the other formats);
//  3. h is quantized per row and block (the engine);
//  4. down_tile: the integer dots of h's rows with the down rows, summed group by group into
//     y's columns in the canonical order (plan/combine.hpp), as the fp32 down tile does.
//
// No lambdas here: clang's target pragma does not reach them.

#include <algorithm>
#include <cstring>
#include <vector>

#include "grove/formats/quantized.hpp"
#include "grove/kernels/cpu/tile_contract.hpp"

#ifndef GROVE_TILES_QDOT
#error "compiled once per instruction set by grove/kernels/cpu/kernel_table.hpp: include that instead"
#else

#if GROVE_TILES_QDOT > 0
#include <immintrin.h>
#endif

GROVE_BEGIN_NAMESPACE
namespace detail {
namespace GROVE_TILES_NS {
namespace quantized {

/// Register lanes per unit: a unit is the part of a panel one register's lanes hold (all 16 rows
/// with vpdpbusd on 512 bits; 8 rows, half a panel, below).
#if GROVE_TILES_QDOT == 2
constexpr int unit_lanes = 16;
#else
constexpr int unit_lanes = 8;
#endif

/// Register blocking: MR activation rows × NU units of accumulators.
constexpr int max_rows = wide_registers ? 4 : 2;
/// Units per call for MR activation rows: the down tiles' (one matrix) and the gate/up tiles'
/// (gate and up: half each). Each unit is a stream of its own; at one activation row, 2 down
/// and 4 gate/up streams read memory fastest of the counts tried (2 or 4 each, cold decode).
constexpr int down_units(int) { return 2; }
constexpr int gate_up_units(int mr) { return mr == 1 ? 4 : 2; }

/// A row of quantized activations: its int8 blocks, their scales and their sums.
struct activation_row {
  const std::int8_t* q;
  const float* scale;
  const std::int32_t* sum;
};

/// Rows [first, first + lanes) of a matrix in panels: `lanes` ≤ unit_lanes rows from lane
/// `lane` of the panel at `panel` (of `rows` rows of `blocks` blocks).
template <class Block>
struct unit {
  const Block* panel;
  int rows;
  int lane;
  int lanes;
  index blocks;
};

/// The unit of a matrix of `rows` rows and `blocks` blocks a row that starts at `first` begins.
template <class Block>
unit<Block> unit_at(const Block* matrix, index rows, index blocks, index first) {
  const panel_place place = place_of_row(first, rows, blocks);
  const int left = static_cast<int>(rows - first);
  return {matrix + place.first_unit, place.rows, place.lane, left < unit_lanes ? left : unit_lanes, blocks};
}

#if GROVE_TILES_QDOT == 0
/// out[r][u][l]: the dots of activation row r with lane l of unit u, in the documented order.
template <class Block, int MR, int NU>
void unit_dots(const activation_row* a, const unit<Block>* u, index blocks, float (*out)[NU][unit_lanes],
               const unit<Block>*) {
  for (int r = 0; r < MR; ++r)
    for (int k = 0; k < NU; ++k)
      for (int l = 0; l < u[k].lanes; ++l) {
        float acc = 0.0f;
        std::int8_t w[quant_block_size];
        for (index b = 0; b < blocks; ++b) {
          const Block block = block_of_panel(u[k].panel, u[k].rows, u[k].blocks, u[k].lane + l, b);
          block_values(block, w);
          std::int32_t p = 0;
          for (int i = 0; i < quant_block_size; ++i)
            p += static_cast<std::int32_t>(a[r].q[b * quant_block_size + i]) * w[i];
          acc = std::fma(a[r].scale[b] * f16_bits_to_float(block.scale), static_cast<float>(p), acc);
        }
        out[r][k][l] = acc;
      }
}
#else
/// The load of a unit's `lanes` 4-byte lanes (fewer than unit_lanes in a matrix's last panel).
#if GROVE_TILES_QDOT == 2
using ivec = __m512i;
using fvec = __m512;
/// The lanes of a unit: all 16 (plain loads), or fewer in a matrix's last panel (masked loads,
/// which never touch the bytes past the panel).
struct lanes_of_unit {
  __mmask16 mask;
  bool full;
};
inline lanes_of_unit lane_mask(int lanes) { return {static_cast<__mmask16>((1u << lanes) - 1u), lanes == 16}; }
inline ivec load_lanes(const std::uint8_t* p, const lanes_of_unit& m) {
  return m.full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(m.mask, p);
}
inline fvec load_scales(const std::uint8_t* p, const lanes_of_unit& m) {
  return _mm512_cvtph_ps(m.full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_maskz_loadu_epi16(m.mask, p));
}
inline ivec broadcast4(const std::int8_t* p) {
  std::int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline ivec set1(std::int32_t v) { return _mm512_set1_epi32(v); }
inline ivec low_nibbles(ivec v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline ivec high_nibbles(ivec v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
/// s + Σ over each lane's 4 bytes of u · a (u unsigned weights, a signed activations), exactly.
inline ivec unsigned_dots(ivec s, ivec u, ivec a) { return _mm512_dpbusd_epi32(s, u, a); }
inline ivec add(ivec x, ivec y) { return _mm512_add_epi32(x, y); }
inline fvec fma_block(fvec scales, float da, ivec p, fvec acc) {
  return _mm512_fmadd_ps(_mm512_mul_ps(scales, _mm512_set1_ps(da)), _mm512_cvtepi32_ps(p), acc);
}
inline fvec fzero() { return _mm512_setzero_ps(); }
inline void store(float* out, fvec v) { _mm512_storeu_ps(out, v); }
#else
using ivec = __m256i;
using fvec = __m256;
using lane_mask_t = __m256i;
inline __m256i lane_mask(int lanes) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline ivec load_lanes(const std::uint8_t* p, __m256i m) {
  return _mm256_maskload_epi32(reinterpret_cast<const int*>(p), m);
}
inline fvec load_scales(const std::uint8_t* p, int lanes) {
  std::uint16_t s[8] = {};
  std::memcpy(s, p, static_cast<std::size_t>(2 * lanes));
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}
inline ivec broadcast4(const std::int8_t* p) {
  std::int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline ivec set1(std::int32_t v) { return _mm256_set1_epi32(v); }
inline ivec low_nibbles(ivec v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline ivec high_nibbles(ivec v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
/// s + Σ over each lane's 4 bytes of u · a, exactly, for u ≤ 127 (no pair leaves int16).
inline ivec unsigned_dots(ivec s, ivec u, ivec a) {
  return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1)));
}
/// s + Σ over each lane's 4 bytes of w · a for signed w and a (neither −128): |a| against w
/// with a's sign moved onto it, so that no pair leaves int16.
inline ivec signed_dots(ivec s, ivec w, ivec a) {
  return _mm256_add_epi32(
      s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(w, a)), _mm256_set1_epi16(1)));
}
inline ivec add(ivec x, ivec y) { return _mm256_add_epi32(x, y); }
inline fvec fma_block(fvec scales, float da, ivec p, fvec acc) {
  return _mm256_fmadd_ps(_mm256_mul_ps(scales, _mm256_set1_ps(da)), _mm256_cvtepi32_ps(p), acc);
}
inline fvec fzero() { return _mm256_setzero_ps(); }
inline void store(float* out, fvec v) { _mm256_storeu_ps(out, v); }
#endif

/// Block b of MR activation rows as the dots read it: each 4 values broadcast to every lane
/// (the 8 words of a block, in value order), and the row's sum times the weights' offset.
template <class Block, int MR>
struct activation_words {
  ivec word[MR][8];
  std::int32_t offset_sum[MR];
};
template <class Block, int MR>
__attribute__((always_inline)) inline void load_words(const activation_row* a, index b,
                                                      activation_words<Block, MR>& w) {
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r) {
    const std::int8_t* q = a[r].q + b * quant_block_size;
    GROVE_SIMD_UNROLL
    for (int c = 0; c < 8; ++c) w.word[r][c] = broadcast4(q + 4 * c);
    w.offset_sum[r] = -panel_traits<Block>::value_offset * a[r].sum[b];
  }
}

/// The products of block b of MR activation rows with one unit: p[r] = Σ of the block's 32
/// products of row r with each lane's weights, exactly.
template <int MR, class Mask>
__attribute__((always_inline)) inline void block_products(const std::uint8_t* values, int rows,
                                                          const activation_words<q8_block, MR>& a, const Mask& mask,
                                                          ivec* p) {
  ivec w[8];
  GROVE_SIMD_UNROLL
  for (int c = 0; c < 8; ++c) w[c] = load_lanes(values + 4 * rows * c, mask);
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r) {
#if GROVE_TILES_QDOT == 2
    // Stored q + 128 (unsigned): Σ (q + 128)·a − 128·Σa, in two chains for vpdpbusd's latency.
    ivec s0 = set1(a.offset_sum[r]), s1 = set1(0);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < 8; c += 2) {
      s0 = unsigned_dots(s0, w[c], a.word[r][c]);
      s1 = unsigned_dots(s1, w[c + 1], a.word[r][c + 1]);
    }
#else
    // vpmaddubsw would saturate on q + 128: back to signed q, then the sign trick.
    ivec s0 = set1(0), s1 = set1(0);
    const ivec flip = _mm256_set1_epi8(static_cast<char>(0x80));
    GROVE_SIMD_UNROLL
    for (int c = 0; c < 8; c += 2) {
      s0 = signed_dots(s0, _mm256_xor_si256(w[c], flip), a.word[r][c]);
      s1 = signed_dots(s1, _mm256_xor_si256(w[c + 1], flip), a.word[r][c + 1]);
    }
#endif
    p[r] = add(s0, s1);
  }
}
template <int MR, class Mask>
__attribute__((always_inline)) inline void block_products(const std::uint8_t* values, int rows,
                                                          const activation_words<q4_block, MR>& a, const Mask& mask,
                                                          ivec* p) {
  // Chunk c's low nibbles are values 4c..4c+3, its high nibbles values 16 + 4c..; each nibble is
  // value + 8: Σ n·a − 8·Σa.
  ivec low[4], high[4];
  GROVE_SIMD_UNROLL
  for (int c = 0; c < 4; ++c) {
    const ivec v = load_lanes(values + 4 * rows * c, mask);
    low[c] = low_nibbles(v);
    high[c] = high_nibbles(v);
  }
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r) {
    ivec s0 = set1(a.offset_sum[r]), s1 = set1(0);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < 4; ++c) {
      s0 = unsigned_dots(s0, low[c], a.word[r][c]);
      s1 = unsigned_dots(s1, high[c], a.word[r][4 + c]);
    }
    p[r] = add(s0, s1);
  }
}

/// out[r][u][l]: the dots of activation row r with lane l of unit u, in the documented order
/// (acc = fma(a_b · d_b, p_b, acc) over the blocks, one lane per weight row). `next` (or null)
/// are the units the calling thread reads after these: their panels' lines are asked for while
/// these run, spread evenly over the blocks, so that memory streams at a steady rate.
template <class Block, int MR, int NU>
void unit_dots(const activation_row* a, const unit<Block>* u, index blocks, float (*out)[NU][unit_lanes],
               const unit<Block>* next) {
  fvec acc[MR][NU];
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r)
    GROVE_SIMD_UNROLL
    for (int k = 0; k < NU; ++k) acc[r][k] = fzero();
#if GROVE_TILES_QDOT == 2
  lanes_of_unit mask[NU];
#else
  __m256i mask[NU];
#endif
  const std::uint8_t* at[NU];
  // The next units' panels (each once: a panel's second unit shares its lines), a share per block.
  const char* ahead[NU];
  index ahead_step[NU];
  GROVE_SIMD_UNROLL
  for (int k = 0; k < NU; ++k) {
    mask[k] = lane_mask(u[k].lanes);
    at[k] = reinterpret_cast<const std::uint8_t*>(u[k].panel);
    const bool leads = next != nullptr && next[k].lane == 0;
    ahead[k] = leads ? reinterpret_cast<const char*>(next[k].panel) : nullptr;
    const index panel_bytes = leads ? next[k].rows * next[k].blocks * static_cast<index>(sizeof(Block)) : 0;
    ahead_step[k] = (panel_bytes / blocks + 63) / 64 * 64;
  }
  for (index b = 0; b < blocks; ++b) {
    activation_words<Block, MR> words;
    load_words<Block, MR>(a, b, words);
    GROVE_SIMD_UNROLL
    for (int k = 0; k < NU; ++k) {
      const int rows = u[k].rows;
      if (ahead[k] != nullptr) {
        prefetch_bytes(ahead[k], ahead_step[k]);
        ahead[k] += ahead_step[k];
      }
      const block_offsets o = panel_block_offsets<Block>(b, rows, u[k].blocks);
#if GROVE_TILES_QDOT == 2
      const fvec scales = load_scales(at[k] + o.scales, mask[k]);
#else
      const fvec scales = load_scales(at[k] + o.scales + 2 * u[k].lane, u[k].lanes);
#endif
      ivec p[MR];
      block_products<MR>(at[k] + o.values + 4 * u[k].lane, rows, words, mask[k], p);
      GROVE_SIMD_UNROLL
      for (int r = 0; r < MR; ++r) acc[r][k] = fma_block(scales, a[r].scale[b], p[r], acc[r][k]);
    }
  }
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r)
    GROVE_SIMD_UNROLL
    for (int k = 0; k < NU; ++k) store(out[r][k], acc[r][k]);
}
#endif

/// The staged activation row of token t (pass.x: int8 blocks, with their scales and sums).
template <class Pass>
activation_row x_row(const Pass& pass, index t) {
  return {pass.x + t * pass.ldx, pass.x_scales + t * pass.ldx_scales, pass.x_sums + t * pass.ldx_scales};
}

/// The gate and up units of `of` from column c, `pairs` of each (a unit past the matrix's end is
/// its last unit again: the columns it stands for are outside the tile, computed and dropped).
template <int pairs, class Block>
void gate_up_units_from(const expert_item<Block>& of, index c, index blocks, unit<Block>* out) {
  for (int k = 0; k < pairs; ++k) {
    const index first = std::min<index>(c + k * unit_lanes, (of.inter - 1) / unit_lanes * unit_lanes);
    out[k] = unit_at(of.gate, of.inter, blocks, first);
    out[pairs + k] = unit_at(of.up, of.inter, blocks, first);
  }
}

/// The NU units of `of`'s down rows (H of them) from column c, clamped likewise.
template <int NU, class Block>
void down_units_from(const expert_item<Block>& of, index c, index H, unit<Block>* out) {
  const index blocks = blocks_per_row(of.inter);
  for (int k = 0; k < NU; ++k)
    out[k] = unit_at(of.down, H, blocks, std::min<index>(c + k * unit_lanes, (H - 1) / unit_lanes * unit_lanes));
}

/// A gate/up tile with MR-row blocks of activations against the gate and up units of its
/// columns: dots, then SwiGLU into h.
template <class Block, int MR, class Pass>
void gate_up_rows(const Pass& pass, const expert_item<Block>& item, const detail::gate_up_tile& tile,
                  const detail::gate_up_tile* following) {
  constexpr int NU = gate_up_units(MR), pairs = NU / 2;
  const index H = pass.hidden, blocks = blocks_per_row(H);
  const int rows = tile.row_end - tile.row_begin, width = tile.col_end - tile.col_begin;
  activation_row a[max_tile_rows];
  for (int r = 0; r < rows; ++r) a[r] = x_row(pass, item.rows[tile.row_begin + r].token);
  float g[max_tile_rows][max_tile_cols], u[max_tile_rows][max_tile_cols];
  const index first_unit_col = tile.col_begin / unit_lanes * unit_lanes;
  for (index c0 = first_unit_col; c0 < tile.col_end; c0 += pairs * unit_lanes) {
    unit<Block> units[NU], next[NU];
    gate_up_units_from<pairs>(item, c0, blocks, units);
    // What this thread reads next: this tile's next group, or the following tile's first.
    const unit<Block>* ahead = next;
    if (c0 + pairs * unit_lanes < tile.col_end)
      gate_up_units_from<pairs>(item, c0 + pairs * unit_lanes, blocks, next);
    else if (following != nullptr)
      gate_up_units_from<pairs>(pass.gate_up_spans[following->item], following->col_begin / unit_lanes * unit_lanes,
                                blocks, next);
    else
      ahead = nullptr;
    for (int r0 = 0; r0 < rows; r0 += MR) {
      float out[MR][NU][unit_lanes];
      const int mr = rows - r0 < MR ? rows - r0 : MR;
      if (mr == MR) {
        unit_dots<Block, MR, NU>(a + r0, units, blocks, out, r0 == 0 ? ahead : nullptr);
      } else {
        // The last, shorter row block: one row at a time.
        for (int r = 0; r < mr; ++r) {
          float one[1][NU][unit_lanes];
          unit_dots<Block, 1, NU>(a + r0 + r, units, blocks, one, r0 == 0 && r == 0 ? ahead : nullptr);
          std::memcpy(out[r], one[0], sizeof(one[0]));
        }
      }
      for (int k = 0; k < pairs; ++k)
        for (int l = 0; l < unit_lanes; ++l) {
          const index col = c0 + k * unit_lanes + l;
          if (col < tile.col_begin || col >= tile.col_end) continue;
          for (int r = 0; r < mr; ++r) {
            g[r0 + r][col - tile.col_begin] = out[r][k][l];
            u[r0 + r][col - tile.col_begin] = out[r][pairs + k][l];
          }
        }
    }
  }
  const index at = item.h_offset + tile.row_begin * item.inter + tile.col_begin;
  for (int r = 0; r < rows; ++r) swiglu_row(g[r], u[r], width, pass.h + at + r * item.inter);
}

template <class Pass>
void gate_up_tile(const Pass& pass, const detail::gate_up_tile& tile, const detail::gate_up_tile* following, int) {
  using Block = std::remove_const_t<std::remove_pointer_t<decltype(pass.items->gate)>>;
  const expert_item<Block>& item = pass.gate_up_spans[tile.item];
  if (tile.row_end - tile.row_begin >= max_rows)
    gate_up_rows<Block, max_rows>(pass, item, tile, following);
  else
    gate_up_rows<Block, 1>(pass, item, tile, following);
}

/// An item's rows against y's columns [c_begin, c_end) (down rows), each weighted dot added
/// into its group row of `partial`.
template <class Block, int MR, class Pass>
void down_rows(const Pass& pass, const expert_item<Block>& item, index c_begin, index c_end, float* partial,
               const expert_item<Block>* following, index following_col) {
  constexpr int NU = down_units(MR);
  const index blocks = blocks_per_row(item.inter), H = pass.hidden;
  const index rows = item.row_count, width = c_end - c_begin;
  const std::int32_t* slots = pass.group_slots + item.first_row;
  const index first_unit_col = c_begin / unit_lanes * unit_lanes;
  for (index c0 = first_unit_col; c0 < c_end; c0 += NU * unit_lanes) {
    unit<Block> units[NU], next[NU];
    down_units_from<NU>(item, c0, H, units);
    // What this thread reads next: this item's next group, or the following item's first.
    const unit<Block>* ahead = next;
    if (c0 + NU * unit_lanes < c_end)
      down_units_from<NU>(item, c0 + NU * unit_lanes, H, next);
    else if (following != nullptr)
      down_units_from<NU>(*following, following_col / unit_lanes * unit_lanes, H, next);
    else
      ahead = nullptr;
    for (index r0 = 0; r0 < rows; r0 += MR) {
      const int mr = rows - r0 < MR ? static_cast<int>(rows - r0) : MR;
      activation_row a[MR];
      for (int r = 0; r < mr; ++r) {
        const index row = item.first_row + r0 + r;
        a[r] = {pass.h_quantized + row * pass.ldh_quantized, pass.h_scales + row * pass.ldh_scales,
                pass.h_sums + row * pass.ldh_scales};
      }
      float out[MR][NU][unit_lanes];
      if (mr == MR) {
        unit_dots<Block, MR, NU>(a, units, blocks, out, r0 == 0 ? ahead : nullptr);
      } else {
        for (int r = 0; r < mr; ++r) {
          float one[1][NU][unit_lanes];
          unit_dots<Block, 1, NU>(a + r, units, blocks, one, r0 == 0 && r == 0 ? ahead : nullptr);
          std::memcpy(out[r], one[0], sizeof(one[0]));
        }
      }
      for (int r = 0; r < mr; ++r) {
        float* y = partial + static_cast<index>(slots[r0 + r]) * width - c_begin;
        const float weight = item.rows[r0 + r].weight;
        for (int k = 0; k < NU; ++k)
          for (int l = 0; l < unit_lanes; ++l) {
            const index col = c0 + k * unit_lanes + l;
            if (col >= c_begin && col < c_end) y[col] = std::fma(weight, out[r][k][l], y[col]);
          }
      }
    }
  }
}

/// A down tile's items: down_rows at the row blocking that fits the item's rows. (A struct, not
/// a lambda: clang's target pragma does not reach lambdas.)
struct down_row_items {
  template <class Pass, class Item>
  void operator()(const Pass& pass, const Item& item, index c_begin, index c_end, float* partial,
                  const Item* next_item, index next_col) const {
    using Block = std::remove_const_t<std::remove_pointer_t<decltype(item.gate)>>;
    if (item.row_count >= max_rows)
      down_rows<Block, max_rows>(pass, item, c_begin, c_end, partial, next_item, next_col);
    else
      down_rows<Block, 1>(pass, item, c_begin, c_end, partial, next_item, next_col);
  }
};

/// One down tile: columns [tile·down_cols, …) of y, group by group in the canonical order, as
/// the fp32 tile (down_tile_in_groups, expert_tiles-inl.hpp): the group's items' integer dots
/// summed into `partial` (from +0), then added to y or stored as the partials.
template <class Pass>
void down_tile(const Pass& pass, index tile, index following, float* partial, int) {
  down_tile_in_groups(pass, tile, following, partial, 1, down_row_items{});
}

/// One item of a down tile by the integer dots, for a down tile that mixes the two paths
/// (dequantized_tiles-inl.hpp): `pass` is this item's tile_pass<std::int8_t, Block, float>.
template <class Pass>
void down_item(const void* pass, const std::remove_const_t<std::remove_pointer_t<decltype(Pass::items)>>& item,
               index c_begin, index c_end, float* partial,
               const std::remove_const_t<std::remove_pointer_t<decltype(Pass::items)>>* next_item, index next_col) {
  down_row_items{}(*static_cast<const Pass*>(pass), item, c_begin, c_end, partial, next_item, next_col);
}

/// Dots of `rows` activation rows with `cols` weight rows in panels (out [rows, cols],
/// row-major): the kernel's arithmetic alone, for the tests that hold it to formats/quantized.hpp.
template <class Block>
void dots(const std::int8_t* q, const float* scales, index rows, const Block* w, index cols, index blocks, float* out) {
  std::vector<std::int32_t> sums(static_cast<std::size_t>(blocks));
  for (index r = 0; r < rows; ++r) {
    activation_block_sums(q + r * blocks * quant_block_size, blocks, sums.data());
    const activation_row a{q + r * blocks * quant_block_size, scales + r * blocks, sums.data()};
    for (index c = 0; c < cols; c += unit_lanes) {
      const unit<Block> u = unit_at(w, cols, blocks, c);
      float one[1][1][unit_lanes];
      unit_dots<Block, 1, 1>(&a, &u, blocks, one, nullptr);
      for (int l = 0; l < u.lanes; ++l) out[r * cols + c + l] = one[0][0][l];
    }
  }
}

}  // namespace quantized
}  // namespace GROVE_TILES_NS
}  // namespace detail
GROVE_END_NAMESPACE

#endif  // GROVE_TILES_QDOT
