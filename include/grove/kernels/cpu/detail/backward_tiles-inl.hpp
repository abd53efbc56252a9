// The generic tile kernels of the fused CPU backward (docs/performance.md, "Backward"), written
// once against simd::batch<float, Arch> and compiled once per instruction-set level, like
// expert_tiles-inl.hpp: kernel_table.hpp includes this file (no include guard, on purpose) with
// GROVE_TILES_NS naming the namespace and GROVE_TILES_ARCH the architecture tag.
//
// Every product of the backward has one of two shapes, each with its own micro-kernel:
//  - panel_product: out[m][v] = Σ_k a_m[k] · B[k][v], MR rows of activations (contiguous in k)
//    against a panel of a weight matrix whose rows k are contiguous in v. Used for
//    r = D_eᵀ dy (B = D_e, k over H) and for dx = dg G_e + du U_e (two products summed).
//  - outer_accumulate: C[m][v] += Σ_k A_k[m] · B_k[v] over the item's rows k, MR rows of a
//    weight gradient at a time. Used for ∂D_e += dyᵀ (w·h) and ∂G_e += dgᵀ X, ∂U_e += duᵀ X.
// Each accumulator sums its k in ascending order, so no result depends on tiling or threads.
//
// No lambdas here: clang's target pragma does not reach them.

#include "grove/kernels/cpu/tile_contract.hpp"

#ifndef GROVE_TILES_NS
#error "compiled once per instruction set by grove/kernels/cpu/kernel_table.hpp: include that instead"
#else

GROVE_BEGIN_NAMESPACE
namespace detail {
namespace GROVE_TILES_NS {
namespace backward {

using arch = GROVE_TILES_ARCH;
using fbatch = simd::float_batch<arch>;
constexpr int lanes = fbatch::size;
constexpr bool wide_registers = arch::registers >= 32;
/// Vectors per register block (columns: NV·lanes); rows per block of the single and the dual
/// kernels. (MR + 1)·NV (dual: 2·MR·NV + NV) registers stay within the register file.
constexpr int NV = wide_registers ? 4 : 2;
constexpr int MR = 4;
constexpr int MR_DUAL = 3;
constexpr int block_cols = NV * lanes;
/// Rows ahead of the one in use that panel_product prefetches (weight panels are read with a
/// stride of a whole matrix row, which the hardware prefetchers do not follow).
constexpr index prefetch_distance = 24;

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

/// Lanes of vector v that fall inside `width` columns, in [0, lanes].
inline int lanes_in(index width, int v) {
  const index left = width - static_cast<index>(v) * lanes;
  return left <= 0 ? 0 : left >= lanes ? lanes : static_cast<int>(left);
}

template <bool Partial>
inline fbatch load_cols(const float* p, int v, index width) {
  if constexpr (Partial)
    return fbatch::load_partial(p + v * lanes, lanes_in(width, v));
  else
    return fbatch::load(p + v * lanes);
}

template <bool Partial>
inline void store_cols(const fbatch& value, float* p, int v, index width) {
  if constexpr (Partial)
    value.store_partial(p + v * lanes, lanes_in(width, v));
  else
    value.store(p + v * lanes);
}

/// Rows k of a panel per pass of panel_product: a chunk of a tile's panel (64 columns; dual:
/// of both panels) packed contiguously takes 16 KiB (backward_schedule::pack_floats), so it
/// stays in L1 while every row block of the tile runs over it.
constexpr index panel_chunk_rows = detail::backward_schedule::pack_floats / 64;
constexpr index panel_chunk_rows_dual = panel_chunk_rows / 2;
static_assert(detail::backward_schedule::block_cols == 64, "the packed chunks are sized for blocks of 64 columns");

/// out_m[v] += Σ_{k0 ≤ k < k1} a[m][k]·B[k][v] (+ a2[m][k]·B2[k][v] when Dual) for M rows and
/// the first `width` ≤ block_cols columns (PartialCols: width < block_cols). The accumulators
/// start from out_m and continue its sums, so a product split into chunks of k gives the same
/// bits as one pass over all k.
/// First: B and B2 are the weights at stride ldb, read with prefetching, and packed on the way
/// into `pack`/`pack2` (row k at (k - k0)·block_cols, zero past width); otherwise B and B2 are
/// such packs. (At the weights' own stride, a power of two for H = 2048, the panel would not
/// stay cached between row blocks.)
template <int M, bool Dual, bool PartialCols, bool First>
void panel_product(const float* const* a, const float* const* a2, const float* b, const float* b2, index ldb,
                   index k0, index k1, index K, index width, float* const* out, float* pack, float* pack2) {
  fbatch acc[M][NV];
  GROVE_SIMD_UNROLL
  for (int m = 0; m < M; ++m) {
    GROVE_SIMD_UNROLL
    for (int v = 0; v < NV; ++v) acc[m][v] = load_cols<PartialCols>(out[m], v, width);
  }
  constexpr int lines = (block_cols * 4 + 63) / 64;
  for (index k = k0; k < k1; ++k) {
    if ((k & 15) == 0) {
      // The activation rows (dy, dg, du) come from buffers larger than the caches.
      GROVE_SIMD_UNROLL
      for (int m = 0; m < M; ++m) {
        prefetch(a[m] + k + 64);
        if constexpr (Dual) prefetch(a2[m] + k + 64);
      }
    }
    const float* bk = First ? b + k * ldb : b + (k - k0) * block_cols;
    fbatch bv[NV];
    if constexpr (First) {
      if (k + prefetch_distance < K) {
        GROVE_SIMD_UNROLL
        for (int l = 0; l < lines; ++l) {
          prefetch(bk + prefetch_distance * ldb + l * 16);
          if constexpr (Dual) prefetch(b2 + (k + prefetch_distance) * ldb + l * 16);
        }
      }
      GROVE_SIMD_UNROLL
      for (int v = 0; v < NV; ++v) {
        bv[v] = load_cols<PartialCols>(bk, v, width);
        bv[v].store(pack + (k - k0) * block_cols + v * lanes);
      }
    } else {
      GROVE_SIMD_UNROLL
      for (int v = 0; v < NV; ++v) bv[v] = fbatch::load(bk + v * lanes);
    }
    GROVE_SIMD_UNROLL
    for (int v = 0; v < NV; ++v) simd::pin(bv[v]);
    GROVE_SIMD_UNROLL
    for (int m = 0; m < M; ++m) {
      const fbatch av = fbatch::broadcast(a[m][k]);
      GROVE_SIMD_UNROLL
      for (int v = 0; v < NV; ++v) acc[m][v] = simd::fma(av, bv[v], acc[m][v]);
    }
    if constexpr (Dual) {
      const float* b2k = First ? b2 + k * ldb : b2 + (k - k0) * block_cols;
      GROVE_SIMD_UNROLL
      for (int v = 0; v < NV; ++v) {
        if constexpr (First) {
          bv[v] = load_cols<PartialCols>(b2k, v, width);
          bv[v].store(pack2 + (k - k0) * block_cols + v * lanes);
        } else {
          bv[v] = fbatch::load(b2k + v * lanes);
        }
        simd::pin(bv[v]);
      }
      GROVE_SIMD_UNROLL
      for (int m = 0; m < M; ++m) {
        const fbatch av = fbatch::broadcast(a2[m][k]);
        GROVE_SIMD_UNROLL
        for (int v = 0; v < NV; ++v) acc[m][v] = simd::fma(av, bv[v], acc[m][v]);
      }
    }
  }
  GROVE_SIMD_UNROLL
  for (int m = 0; m < M; ++m) {
    GROVE_SIMD_UNROLL
    for (int v = 0; v < NV; ++v) store_cols<PartialCols>(acc[m][v], out[m], v, width);
  }
}

/// panel_product for m ≤ MR rows (run-time count) and any width ≤ block_cols.
template <bool Dual, bool First>
void panel_product_rows(int m, const float* const* a, const float* const* a2, const float* b, const float* b2,
                        index ldb, index k0, index k1, index K, index width, float* const* out, float* pack,
                        float* pack2) {
  if (width == block_cols) {
    switch (m) {
      case 4: panel_product<4, Dual, false, First>(a, a2, b, b2, ldb, k0, k1, K, width, out, pack, pack2); break;
      case 3: panel_product<3, Dual, false, First>(a, a2, b, b2, ldb, k0, k1, K, width, out, pack, pack2); break;
      case 2: panel_product<2, Dual, false, First>(a, a2, b, b2, ldb, k0, k1, K, width, out, pack, pack2); break;
      default: panel_product<1, Dual, false, First>(a, a2, b, b2, ldb, k0, k1, K, width, out, pack, pack2); break;
    }
  } else {
    switch (m) {
      case 4: panel_product<4, Dual, true, First>(a, a2, b, b2, ldb, k0, k1, K, width, out, pack, pack2); break;
      case 3: panel_product<3, Dual, true, First>(a, a2, b, b2, ldb, k0, k1, K, width, out, pack, pack2); break;
      case 2: panel_product<2, Dual, true, First>(a, a2, b, b2, ldb, k0, k1, K, width, out, pack, pack2); break;
      default: panel_product<1, Dual, true, First>(a, a2, b, b2, ldb, k0, k1, K, width, out, pack, pack2); break;
    }
  }
}
static_assert(MR == 4, "panel_product_rows dispatches up to four rows");

/// Where outer_accumulate finds row k's A and B vectors. With ATokens, A_k = a + token_k·lda and
/// B_k = b + k·ldb (∂D: A is dy, gathered by token; B the item's own w·h rows); otherwise
/// A_k = a + k·lda and B_k = b + token_k·ldb (∂G, ∂U: A is dg or du; B is x, gathered).
struct outer_rows {
  const dispatch_row<float>* rows;
  index count;
  const float* a;
  const float* a2;  ///< the second A (du) of the dual kernel
  index lda;
  const float* b;
  index ldb;
};

/// C[m][v] += Σ_k A_k[m]·B_k[v] (and C2 with A2 when Dual) for M rows of C and the first `width`
/// ≤ block_cols columns; C's rows are ldc apart.
template <int M, bool Dual, bool Partial, bool ATokens>
void outer_accumulate(const outer_rows& s, float* c, float* c2, index ldc, index width) {
  fbatch acc[M][NV], acc2[Dual ? M : 1][NV];
  GROVE_SIMD_UNROLL
  for (int m = 0; m < M; ++m) {
    GROVE_SIMD_UNROLL
    for (int v = 0; v < NV; ++v) {
      acc[m][v] = load_cols<Partial>(c + m * ldc, v, width);
      if constexpr (Dual) acc2[m][v] = load_cols<Partial>(c2 + m * ldc, v, width);
    }
  }
  for (index k = 0; k < s.count; ++k) {
    const index token = s.rows[k].token;
    const float* ak = s.a + (ATokens ? token : k) * s.lda;
    const float* bk = s.b + (ATokens ? k : token) * s.ldb;
    fbatch bv[NV];
    GROVE_SIMD_UNROLL
    for (int v = 0; v < NV; ++v) {
      bv[v] = load_cols<Partial>(bk, v, width);
      simd::pin(bv[v]);
    }
    GROVE_SIMD_UNROLL
    for (int m = 0; m < M; ++m) {
      const fbatch av = fbatch::broadcast(ak[m]);
      GROVE_SIMD_UNROLL
      for (int v = 0; v < NV; ++v) acc[m][v] = simd::fma(av, bv[v], acc[m][v]);
    }
    if constexpr (Dual) {
      const float* a2k = s.a2 + k * s.lda;
      GROVE_SIMD_UNROLL
      for (int m = 0; m < M; ++m) {
        const fbatch av = fbatch::broadcast(a2k[m]);
        GROVE_SIMD_UNROLL
        for (int v = 0; v < NV; ++v) acc2[m][v] = simd::fma(av, bv[v], acc2[m][v]);
      }
    }
  }
  GROVE_SIMD_UNROLL
  for (int m = 0; m < M; ++m) {
    GROVE_SIMD_UNROLL
    for (int v = 0; v < NV; ++v) {
      store_cols<Partial>(acc[m][v], c + m * ldc, v, width);
      if constexpr (Dual) store_cols<Partial>(acc2[m][v], c2 + m * ldc, v, width);
    }
  }
}

/// outer_accumulate over M rows of C at (m, v0), or over fewer rows one at a time.
template <int M, bool Dual, bool ATokens>
void outer_accumulate_block(const outer_rows& s, int rows, float* cm, float* c2m, index ldc, index width) {
  const bool partial = width < block_cols;
  if (rows == M) {
    if (partial)
      outer_accumulate<M, Dual, true, ATokens>(s, cm, c2m, ldc, width);
    else
      outer_accumulate<M, Dual, false, ATokens>(s, cm, c2m, ldc, width);
    return;
  }
  for (int r = 0; r < rows; ++r) {
    outer_rows one = s;
    one.a = s.a + r;
    one.a2 = Dual ? s.a2 + r : nullptr;
    if (partial)
      outer_accumulate<1, Dual, true, ATokens>(one, cm + r * ldc, Dual ? c2m + r * ldc : nullptr, ldc, width);
    else
      outer_accumulate<1, Dual, false, ATokens>(one, cm + r * ldc, Dual ? c2m + r * ldc : nullptr, ldc, width);
  }
}

/// Rows [m0, m1) of C (and C2) against every column [0, cols), in blocks of M rows (M = MR, or
/// MR_DUAL when Dual), each sweeping the columns block_cols at a time: rows of C (from memory)
/// are read and written as sequential streams, the item's B rows stay in L2. (Sweeping the row
/// blocks inside each column block instead keeps B in L1 but reads C at a stride of whole
/// rows, which measured slower.)
template <bool Dual, bool ATokens>
void outer_accumulate_rows(const outer_rows& s, float* c, float* c2, index ldc, index m0, index m1, index cols) {
  constexpr int M = Dual ? MR_DUAL : MR;
  for (index m = m0; m < m1; m += M) {
    const int rows = m1 - m < M ? static_cast<int>(m1 - m) : M;
    for (index v0 = 0; v0 < cols; v0 += block_cols) {
      outer_rows at = s;
      at.a = s.a + m;
      at.a2 = Dual ? s.a2 + m : nullptr;
      at.b = s.b + v0;
      const index width = cols - v0 < block_cols ? cols - v0 : block_cols;
      outer_accumulate_block<M, Dual, ATokens>(at, rows, c + m * ldc + v0, Dual ? c2 + m * ldc + v0 : nullptr, ldc,
                                               width);
    }
  }
}

/// One block of a dh tile (item, rows [row_begin, row_end) ≤ 32, columns [col_begin, col_end),
/// at most backward_schedule::block_cols of them): r = D_eᵀ dy for the block, then, elementwise
/// with the
/// pre-activations g, u (docs/math.md, "Backward"):
///   h = silu(g)·u, partial ⟨r, h⟩ of the block (summed over blocks later, in order),
///   dh = w·r, dg = dh·u·silu'(g), du = dh·silu(g), and w·h (for ∂D).
template <class Pass, class Item>
void dh_block(const Pass& pass, const Item& item, const detail::gate_up_tile& tile, float* pack) {
  const index inter = item.inter, H = pass.hidden;
  const int rows = tile.row_end - tile.row_begin;
  const index width = tile.col_end - tile.col_begin;
  constexpr int max_rows = 32, max_cols = 64;
  float r_tile[max_rows][max_cols];
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < max_cols; ++c) r_tile[r][c] = 0.0f;
  const float* b = item.down + tile.col_begin;
  for (index k0 = 0; k0 < H; k0 += panel_chunk_rows) {
    const index k1 = H - k0 < panel_chunk_rows ? H : k0 + panel_chunk_rows;
    for (int r0 = 0; r0 < rows; r0 += MR) {
      const int m = rows - r0 < MR ? rows - r0 : MR;
      const float* a[MR];
      for (int i = 0; i < MR; ++i)
        a[i] = pass.dy + static_cast<index>(item.rows[tile.row_begin + r0 + (i < m ? i : 0)].token) * pass.lddy;
      for (index v0 = 0; v0 < width; v0 += block_cols) {
        const index w = width - v0 < block_cols ? width - v0 : block_cols;
        float* out[MR];
        for (int i = 0; i < MR; ++i) out[i] = &r_tile[r0 + (i < m ? i : 0)][v0];
        float* chunk = pack + (v0 / block_cols) * panel_chunk_rows * block_cols;
        if (r0 == 0)
          panel_product_rows<false, true>(m, a, nullptr, b + v0, nullptr, inter, k0, k1, H, w, out, chunk, nullptr);
        else
          panel_product_rows<false, false>(m, a, nullptr, chunk, nullptr, block_cols, k0, k1, H, w, out, nullptr,
                                           nullptr);
      }
    }
  }
  const fbatch one = fbatch::broadcast(1.0f);
  for (int r = 0; r < rows; ++r) {
    const index row = tile.row_begin + r;
    const float weight = item.rows[row].weight;
    const fbatch wv = fbatch::broadcast(weight);
    const index at = item.h_offset + row * inter + tile.col_begin;
    fbatch dot = fbatch::zero();
    for (index j = 0; j < width; j += lanes) {
      const int n = width - j < lanes ? static_cast<int>(width - j) : lanes;
      const fbatch g = fbatch::load_partial(pass.gate + at + j, n);
      const fbatch u = fbatch::load_partial(pass.up + at + j, n);
      const fbatch rv = fbatch::load_partial(&r_tile[r][j], n);
      const fbatch d = one + simd::exp(fbatch::zero() - g);
      const fbatch sig = one / d;
      const fbatch s = g / d;  // silu(g), the forward's expression
      const fbatch h = s * u;
      dot = simd::fma(rv, h, dot);
      const fbatch dh = wv * rv;
      (dh * s).store_partial(pass.du + at + j, n);
      (dh * u * (sig * (one + g * (one - sig)))).store_partial(pass.dg + at + j, n);
      (wv * h).store_partial(pass.hw + at + j, n);
    }
    pass.dots[(item.first_row + row) * pass.dot_blocks + tile.col_begin / detail::backward_schedule::block_cols] =
        simd::reduce_add(dot);
  }
}

/// A dh tile: its blocks of 64 columns one after the other (the tile's rows of dy stay cached).
template <class Pass>
void dh_tile(const Pass& pass, const detail::gate_up_tile& tile, float* pack) {
  const auto& item = pass.items[tile.item];
  constexpr auto block = static_cast<std::int32_t>(detail::backward_schedule::block_cols);
  for (std::int32_t c = tile.col_begin; c < tile.col_end; c += block) {
    detail::gate_up_tile part = tile;
    part.col_begin = c;
    part.col_end = tile.col_end - c < block ? tile.col_end : c + block;
    dh_block(pass, item, part, pack);
  }
}

/// A weight-gradient tile: rows [begin, end) of ∂D (Down) or of ∂G and ∂U together, of the MLP
/// whose items the tile lists (one item; once per pick, an adjugate's items one after the other:
/// each item's sums continue from the gradient the previous one left).
template <class Pass>
void gradient_tile(const Pass& pass, const detail::gradient_tile& tile) {
  for (std::int32_t k = tile.first; k < tile.last; ++k) {
    const std::int32_t i = pass.gradient_items[k];
    const auto& item = pass.items[i];
    const auto& grad = pass.grads[i];
    const index inter = item.inter;
    if (tile.down) {
      // ∂D[c][i] += Σ_k dy[token_k][c] · (w·h)[k][i]
      const outer_rows s{item.rows, item.row_count, pass.dy, nullptr, pass.lddy, pass.hw + item.h_offset, inter};
      outer_accumulate_rows<false, true>(s, grad.down, nullptr, inter, tile.begin, tile.end, inter);
    } else {
      // ∂G[i][c] += Σ_k dg[k][i] · x[token_k][c], ∂U likewise with du
      const outer_rows s{item.rows, item.row_count, pass.dg + item.h_offset, pass.du + item.h_offset, inter,
                         pass.x, pass.ldx};
      outer_accumulate_rows<true, false>(s, grad.gate, grad.up, pass.hidden, tile.begin, tile.end, pass.hidden);
    }
  }
}

/// Columns [c0, c0 + width ≤ 64) of dx for one item: each of its rows adds dg G_e + du U_e to
/// its group row of `partial` ([group rows, partial_width], column c0 at partial_col), the sums
/// continuing the partial's own.
template <class Pass, class Item>
void dx_block(const Pass& pass, const Item& item, index c0, index width, float* partial, index partial_width,
              index partial_col, float* pack) {
  const index H = pass.hidden;
  const index inter = item.inter;
  const index chunk_size = panel_chunk_rows_dual * block_cols;
  const std::int32_t* slots = pass.group_slots + item.first_row;
  for (index k0 = 0; k0 < inter; k0 += panel_chunk_rows_dual) {
    const index k1 = inter - k0 < panel_chunk_rows_dual ? inter : k0 + panel_chunk_rows_dual;
    for (index r0 = 0; r0 < item.row_count; r0 += MR) {
      const int m = item.row_count - r0 < MR ? static_cast<int>(item.row_count - r0) : MR;
      const float* a[MR];
      const float* a2[MR];
      float* dx_rows[MR];
      for (int r = 0; r < MR; ++r) {
        const index row = r0 + (r < m ? r : 0);
        a[r] = pass.dg + item.h_offset + row * inter;
        a2[r] = pass.du + item.h_offset + row * inter;
        dx_rows[r] = partial + static_cast<index>(slots[row]) * partial_width + partial_col;
      }
      for (index v0 = 0; v0 < width; v0 += block_cols) {
        const index w = width - v0 < block_cols ? width - v0 : block_cols;
        float* out[MR];
        for (int r = 0; r < MR; ++r) out[r] = dx_rows[r] + v0;
        float* chunk = pack + (v0 / block_cols) * 2 * chunk_size;
        if (r0 == 0)
          panel_product_rows<true, true>(m, a, a2, item.gate + c0 + v0, item.up + c0 + v0, H, k0, k1, inter, w, out,
                                         chunk, chunk + chunk_size);
        else
          panel_product_rows<true, false>(m, a, a2, chunk, chunk + chunk_size, block_cols, k0, k1, inter, w, out,
                                          nullptr, nullptr);
      }
    }
  }
}

/// A dx tile: columns [c0, c0 + dx_cols) of dx, group by group (the canonical sum of
/// plan/combine.hpp, with the caller's dx as the first operand): the group's items, in blocks of
/// 64 columns (an item's dg and du rows stay cached from one block to the next), summed into
/// this thread's `partial` from +0, which is then added to dx. Each element of dx receives its
/// adds in the same order whatever the thread count.
template <class Pass>
void dx_tile(const Pass& pass, index tile, float* pack, float* partial) {
  const index H = pass.hidden;
  const index c_begin = tile * pass.dx_cols;
  const index c_end = H - c_begin < pass.dx_cols ? H : c_begin + pass.dx_cols;
  const index width = c_end - c_begin;
  constexpr index block = detail::backward_schedule::block_cols;
  for (index g = 0; g < pass.group_count; ++g) {
    const detail::group_span& group = pass.groups[g];
    zero_floats(partial, group.row_count * width);
    for (index i = group.item_begin; i < group.item_end; ++i)
      for (index c0 = c_begin; c0 < c_end; c0 += block)
        dx_block(pass, pass.items[i], c0, c_end - c0 < block ? c_end - c0 : block, partial, width, c0 - c_begin, pack);
    for (index r = 0; r < group.row_count; ++r)
      add_floats(pass.dx + static_cast<index>(group.rows[r].token) * pass.lddx + c_begin, partial + r * width, width);
  }
}

}  // namespace backward
}  // namespace GROVE_TILES_NS
}  // namespace detail
GROVE_END_NAMESPACE

#endif  // GROVE_TILES_NS
