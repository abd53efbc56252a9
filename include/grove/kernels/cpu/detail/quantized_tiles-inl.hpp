// The tile kernels of the block formats (q8, q4; formats/quantized.hpp), compiled once per
// instruction-set level: kernel_table.hpp includes this file (no include guard, on purpose)
// right after expert_tiles-inl.hpp, in the same namespace, with GROVE_TILES_QDOT naming the
// integer dot: 0 plain loops, 1 AVX2 (vpmaddubsw, vpmaddwd), 2 AVX512_VNNI (vpdpbusd on 256 bits).
//
// Every level computes the dot in the order formats/quantized.hpp defines (8 lanes of 4
// products per block, a fixed final sum), so the levels agree bit for bit. A pass:
//  1. x is quantized per row and block (the engine, before the tiles);
//  2. gate_up_tile: the integer dots of x's rows with a span's gate and up rows, SwiGLU into h
//     (fp32, the layout of the other formats);
//  3. h is quantized per row and block (the engine);
//  4. down_tile: the integer dots of h's rows with the down rows, summed group by group into
//     y's columns in the canonical order (plan/combine.hpp), as the fp32 down tile does.
//
// No lambdas here: clang's target pragma does not reach them.

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

#if GROVE_TILES_QDOT == 0
/// The 8 float lanes of a dot's accumulator, and the 8 int32 lanes of one block's products.
struct lanes {
  float v[8];
};
struct products {
  std::int32_t v[8];
};
/// A block of 32 int8 values in registers (here: in memory).
struct int8_block {
  std::int8_t v[32];
};

inline lanes zero_lanes() { return lanes{}; }
/// An activation block, as the dots of every weight row read it.
struct activation_block {
  int8_block a;
};
inline activation_block load_activations(const std::int8_t* q) {
  activation_block b;
  std::memcpy(b.a.v, q, 32);
  return b;
}
/// p_j = Σ_{i < 4} a[4j + i] · w[4j + i], exactly.
template <class Block>
products block_products(const activation_block& a, const Block& block) {
  int8_block w;
  block_values(block, w.v);
  products p;
  for (int j = 0; j < 8; ++j) {
    std::int32_t s = 0;
    for (int i = 4 * j; i < 4 * j + 4; ++i) s += static_cast<std::int32_t>(a.a.v[i]) * w.v[i];
    p.v[j] = s;
  }
  return p;
}
/// acc_j = fma(d, float(p_j), acc_j).
inline lanes accumulate(lanes acc, float d, const products& p) {
  for (int j = 0; j < 8; ++j) acc.v[j] = std::fma(d, static_cast<float>(p.v[j]), acc.v[j]);
  return acc;
}
/// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
inline float lanes_sum(const lanes& l) {
  return ((l.v[0] + l.v[1]) + (l.v[2] + l.v[3])) + ((l.v[4] + l.v[5]) + (l.v[6] + l.v[7]));
}
inline float scale_of(const q8_block& w) { return f16_bits_to_float(w.scale); }
inline float scale_of(const q4_block& w) { return f16_bits_to_float(w.scale); }
#else
using lanes = __m256;
using products = __m256i;

inline lanes zero_lanes() { return _mm256_setzero_ps(); }

/// Σ over each group of 4 bytes of u · s (u unsigned, s signed), in 8 int32 lanes, exactly when
/// no pair u·s + u'·s' leaves int16 (the callers' operands keep it within ±32258).
inline __m256i lane_dots(__m256i u, __m256i s) {
#if GROVE_TILES_QDOT == 2
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/// An activation block as the dots of every weight row read it, prepared once per block and
/// row: a, |a|, and 8 times each lane's sum of a (q4's offset of 8, taken out after the dot).
struct activation_block {
  __m256i a, magnitude, eight_sums;
};
inline activation_block load_activations(const std::int8_t* q) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  return {a, _mm256_abs_epi8(a), _mm256_slli_epi32(lane_dots(_mm256_set1_epi8(1), a), 3)};
}
/// q8: p_j = Σ_{i < 4} a[4j + i] · w[4j + i], exactly: |a| times w with a's sign moved onto it
/// (neither is ever −128, so nothing overflows).
inline products block_products(const activation_block& a, const q8_block& w) {
  const __m256i values = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q));
  return lane_dots(a.magnitude, _mm256_sign_epi8(values, a.a));
}
/// q4: the nibbles n (value order: byte j holds value j low, value j + 16 high) as unsigned
/// bytes against a, then p_j = Σ n·a − 8 Σ a = Σ (n − 8)·a, exactly.
inline products block_products(const activation_block& a, const q4_block& w) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(packed, low_mask);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
  return _mm256_sub_epi32(lane_dots(_mm256_set_m128i(high, low), a.a), a.eight_sums);
}
inline lanes accumulate(lanes acc, float d, const products& p) {
  return _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
}
inline float lanes_sum(const lanes& l) {
  // hadd pairs neighbours within each 128-bit half: (l0 + l1, l2 + l3, …); again: (l0 + l1) +
  // (l2 + l3) in the low half, (l4 + l5) + (l6 + l7) in the high; then the two halves.
  const __m256 pairs = _mm256_hadd_ps(l, l);
  const __m256 quads = _mm256_hadd_ps(pairs, pairs);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
}
inline float scale_of(const q8_block& w) { return _cvtsh_ss(w.scale); }
inline float scale_of(const q4_block& w) { return _cvtsh_ss(w.scale); }
#endif

/// Register blocking: MR activation rows × NR weight rows of accumulators.
constexpr int max_rows = wide_registers ? 4 : 2;
constexpr int dot_cols(int mr) {
  if (wide_registers) return mr == 1 ? 8 : mr == 2 ? 6 : 4;
  return mr == 1 ? 6 : 3;
}
/// gate/up: two weight matrices, half the columns.
constexpr int dot2_cols(int mr) { return dot_cols(mr) / 2; }

/// A row of quantized activations: its int8 blocks and their scales.
struct activation_row {
  const std::int8_t* q;
  const float* scale;
};

/// Block b of MR activation rows, as the dots read it: the prepared values and the scales.
template <int MR>
void load_block(const activation_row* a, index b, activation_block* av, float* da) {
  for (int r = 0; r < MR; ++r) {
    av[r] = load_activations(a[r].q + b * quant_block_size);
    da[r] = a[r].scale[b];
  }
}

/// out[r·NR + c] = dot of activation row r with weight row w[c] (`blocks` blocks), in the
/// documented order; the next panel's lines are prefetched from `pw`.
template <class Block, int MR, int NR>
void dot_block(const activation_row* a, const Block* const* w, index blocks, float* out, const prefetch_window& pw) {
  index q = pw.begin;
  lanes acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = zero_lanes();
  for (index b = 0; b < blocks; ++b) {
    activation_block av[MR];
    float da[MR];
    load_block<MR>(a, b, av, da);
    prefetch_lines<NR>(pw, q);
    for (int c = 0; c < NR; ++c) {
      const Block& block = w[c][b];
      const float dw = scale_of(block);
      for (int r = 0; r < MR; ++r) acc[r][c] = accumulate(acc[r][c], da[r] * dw, block_products(av[r], block));
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) out[r * NR + c] = lanes_sum(acc[r][c]);
}

/// dot_block for the gate and up rows together (they share the activation loads): out[r·NR + c]
/// for w1, out[MR·NR + r·NR + c] for w2.
template <class Block, int MR, int NR>
void dot_block2(const activation_row* a, const Block* const* w1, const Block* const* w2, index blocks, float* out,
                const prefetch_window& pw) {
  index q = pw.begin;
  lanes acc1[MR][NR], acc2[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc1[r][c] = acc2[r][c] = zero_lanes();
  for (index b = 0; b < blocks; ++b) {
    activation_block av[MR];
    float da[MR];
    load_block<MR>(a, b, av, da);
    prefetch_lines<2 * NR>(pw, q);
    for (int c = 0; c < NR; ++c) {
      const Block& g = w1[c][b];
      const Block& u = w2[c][b];
      const float dg = scale_of(g), du = scale_of(u);
      for (int r = 0; r < MR; ++r) {
        acc1[r][c] = accumulate(acc1[r][c], da[r] * dg, block_products(av[r], g));
        acc2[r][c] = accumulate(acc2[r][c], da[r] * du, block_products(av[r], u));
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      out[r * NR + c] = lanes_sum(acc1[r][c]);
      out[MR * NR + r * NR + c] = lanes_sum(acc2[r][c]);
    }
}

/// The staged activation row of token t (pass.x: int8 blocks, pass.x_scales: their scales).
template <class Pass>
activation_row x_row(const Pass& pass, index t) {
  return {pass.x + t * pass.ldx, pass.x_scales + t * pass.ldx_scales};
}

/// A gate/up tile with panels of NR columns of MR-row blocks: dots, then SwiGLU into h.
template <class Block, int MR, class Pass>
void gate_up_rows(const Pass& pass, const expert_item<Block>& item, const detail::gate_up_tile& tile,
                  const detail::gate_up_tile* following) {
  constexpr int NR = dot2_cols(MR);
  const index H = pass.hidden, blocks = blocks_per_row(H);
  const int rows = tile.row_end - tile.row_begin, width = tile.col_end - tile.col_begin;
  activation_row a[max_tile_rows];
  for (int r = 0; r < rows; ++r) a[r] = x_row(pass, item.rows[tile.row_begin + r].token);
  float g[max_tile_rows][max_tile_cols], u[max_tile_rows][max_tile_cols];
  const index row_bytes = blocks * static_cast<index>(sizeof(Block));
  const int row_blocks = (rows + MR - 1) / MR;
  for (int c0 = 0; c0 < width; c0 += NR) {
    const Block* wg[NR];
    const Block* wu[NR];
    const char* next_rows[2 * NR];
    for (int c = 0; c < NR; ++c) {
      const index col = tile.col_begin + (c0 + c < width ? c0 + c : width - 1);
      wg[c] = item.gate + col * blocks;
      wu[c] = item.up + col * blocks;
      // The next panel (or the first of the tile this thread runs next) streams in meanwhile.
      const int next = c0 + NR + c;
      const expert_item<Block>* from = &item;
      index next_col = tile.col_begin + (next < width ? next : width - 1);
      if (c0 + NR >= width && following != nullptr) {
        from = &pass.gate_up_spans[following->item];
        next_col = following->col_begin + std::min(c, following->col_end - following->col_begin - 1);
      }
      next_rows[c] = reinterpret_cast<const char*>(from->gate + next_col * blocks);
      next_rows[NR + c] = reinterpret_cast<const char*>(from->up + next_col * blocks);
    }
    const bool more = c0 + NR < width || following != nullptr;
    const int valid = width - c0 < NR ? width - c0 : NR;
    for (int r0 = 0, block = 0; r0 < rows; r0 += MR, ++block) {
      const prefetch_window pw = more ? share_of(next_rows, 2 * NR, row_bytes, block, row_blocks, blocks)
                                      : prefetch_window{next_rows, 0, 0, 0};
      float out[2 * MR * NR];
      const int mr = rows - r0 < MR ? rows - r0 : MR;
      if (mr == MR) {
        dot_block2<Block, MR, NR>(a + r0, wg, wu, blocks, out, pw);
      } else {
        // The last, shorter row block: one row at a time at this panel's width.
        for (int r = 0; r < mr; ++r) {
          float one[2 * NR];
          dot_block2<Block, 1, NR>(a + r0 + r, wg, wu, blocks, one, pw);
          for (int c = 0; c < NR; ++c) {
            out[r * NR + c] = one[c];
            out[MR * NR + r * NR + c] = one[NR + c];
          }
        }
      }
      for (int r = 0; r < mr; ++r)
        for (int c = 0; c < valid; ++c) {
          g[r0 + r][c0 + c] = out[r * NR + c];
          u[r0 + r][c0 + c] = out[MR * NR + r * NR + c];
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
  constexpr int NR = dot_cols(MR);
  const index blocks = blocks_per_row(item.inter);
  const index rows = item.row_count, width = c_end - c_begin;
  const std::int32_t* slots = pass.group_slots + item.first_row;
  const index row_bytes = blocks * static_cast<index>(sizeof(Block));
  const int row_blocks = static_cast<int>((rows + MR - 1) / MR);
  for (index c0 = c_begin; c0 < c_end; c0 += NR) {
    const Block* w[NR];
    const char* next_rows[NR];
    bool more = c0 + NR < c_end;
    for (int c = 0; c < NR; ++c) {
      w[c] = item.down + (c0 + c < c_end ? c0 + c : c_end - 1) * blocks;
      next_rows[c] = reinterpret_cast<const char*>(item.down + (c0 + NR + c < c_end ? c0 + NR + c : c_end - 1) * blocks);
    }
    index prefetch_bytes = row_bytes;
    if (!more && following != nullptr) {
      const index next_blocks = blocks_per_row(following->inter);
      for (int c = 0; c < NR; ++c)
        next_rows[c] = reinterpret_cast<const char*>(following->down + (following_col + c) * next_blocks);
      prefetch_bytes = next_blocks * static_cast<index>(sizeof(Block));
      more = true;
    }
    const int valid = c_end - c0 < NR ? static_cast<int>(c_end - c0) : NR;
    for (index r0 = 0; r0 < rows; r0 += MR) {
      const int mr = rows - r0 < MR ? static_cast<int>(rows - r0) : MR;
      const int block = static_cast<int>(r0 / MR);
      const prefetch_window pw = more ? share_of(next_rows, NR, prefetch_bytes, block, row_blocks, blocks)
                                      : prefetch_window{next_rows, 0, 0, 0};
      activation_row a[MR];
      for (int r = 0; r < mr; ++r) {
        const index row = item.first_row + r0 + r;
        a[r] = {pass.h_quantized + row * pass.ldh_quantized, pass.h_scales + row * pass.ldh_scales};
      }
      float out[MR * NR];
      if (mr == MR) {
        dot_block<Block, MR, NR>(a, w, blocks, out, pw);
      } else {
        for (int r = 0; r < mr; ++r) dot_block<Block, 1, NR>(a + r, w, blocks, out + r * NR, pw);
      }
      for (int r = 0; r < mr; ++r) {
        float* y = partial + static_cast<index>(slots[r0 + r]) * width + (c0 - c_begin);
        const float weight = item.rows[r0 + r].weight;
        for (int c = 0; c < valid; ++c) y[c] = std::fma(weight, out[r * NR + c], y[c]);
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
  down_tile_in_groups(pass, tile, following, partial, dot_cols(1), down_row_items{});
}

/// One item of a down tile by the integer dots, for a down tile that mixes the two paths
/// (dequantized_tiles-inl.hpp): `pass` is this item's tile_pass<std::int8_t, Block, float>.
template <class Pass>
void down_item(const void* pass, const std::remove_const_t<std::remove_pointer_t<decltype(Pass::items)>>& item,
               index c_begin, index c_end, float* partial,
               const std::remove_const_t<std::remove_pointer_t<decltype(Pass::items)>>* next_item, index next_col) {
  down_row_items{}(*static_cast<const Pass*>(pass), item, c_begin, c_end, partial, next_item, next_col);
}

/// Dots of `rows` activation rows with `cols` weight rows (out [rows, cols], row-major): the
/// kernel's arithmetic alone, for the tests that hold it to formats/quantized.hpp.
template <class Block>
void dots(const std::int8_t* q, const float* scales, index rows, const Block* w, index cols, index blocks, float* out) {
  for (index r = 0; r < rows; ++r)
    for (index c = 0; c < cols; ++c) {
      const activation_row a{q + r * blocks * quant_block_size, scales + r * blocks};
      const Block* row = w + c * blocks;
      dot_block<Block, 1, 1>(&a, &row, blocks, out + r * cols + c, prefetch_window{nullptr, 0, 0, 0});
    }
}

}  // namespace quantized
}  // namespace GROVE_TILES_NS
}  // namespace detail
GROVE_END_NAMESPACE

#endif  // GROVE_TILES_QDOT
