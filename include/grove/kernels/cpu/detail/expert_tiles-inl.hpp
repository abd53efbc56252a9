// The generic tile kernels of the fused CPU expert pass, written once against
// simd::batch<float, Arch> and compiled once per instruction-set level: kernel_table.hpp
// includes this file (no include guard, on purpose) with GROVE_TILES_NS naming the namespace
// and GROVE_TILES_ARCH the architecture tag, inside a GROVE_SIMD_BEGIN_REGION for that level.
//
// Kernels (docs/performance.md, "Kernels"):
//  - dot_block<P, MR, NR>: the register-blocked micro-kernel. MR rows of activations against NR
//    rows of a weight matrix (PyTorch's [out, in] layout, so both run along K contiguously);
//    MR·NR vector accumulators run over K, then each is reduced to a scalar in a fixed order.
//    dot_block2 does the gate and up projections together (2·MR·NR accumulators).
//  - gate_up_tile: rows of a gate/up span (an item, or in once_per_pick mode a group's per-pick
//    adjugate items together) × a block of intermediate columns: gate/up products, then
//    SwiGLU (vectorised) into h.
//  - down_tile: a block of y's columns: zero it, then group by group: the down products of the
//    group's items, each weighted row an fma into the group's partial (a per-thread scratch of
//    the group's rows, from +0), then the partial added to y (plan/combine.hpp, the canonical
//    sum). Every y element therefore receives its adds in the same order whatever the thread
//    count, and the partials can instead be handed to a combine that runs elsewhere.
// Operand policies P: fp32 weights (fma), bf16 weights widened to fp32 (fma), and on AVX512_BF16
// bf16 weights with bf16 activations (vdpbf16ps, pairs of K per lane).
//
// No lambdas here: clang's target pragma does not reach them.

#include "grove/kernels/cpu/tile_contract.hpp"

#ifndef GROVE_TILES_NS
#error "compiled once per instruction set by grove/kernels/cpu/kernel_table.hpp: include that instead"
#else

GROVE_BEGIN_NAMESPACE
namespace detail {
namespace GROVE_TILES_NS {

using arch = GROVE_TILES_ARCH;
using fbatch = simd::float_batch<arch>;
constexpr int lanes = fbatch::size;
constexpr bool wide_registers = arch::registers >= 32;

/// Activations and weights both fp32.
struct f32_operands {
  using a_type = float;
  using w_type = float;
  using a_reg = fbatch;
  using w_reg = fbatch;
  static constexpr int chunk = lanes;
  static a_reg load_a(const float* p) { return fbatch::load(p); }
  static a_reg load_a_partial(const float* p, int n) { return fbatch::load_partial(p, n); }
  static w_reg load_w(const float* p) { return fbatch::load(p); }
  static w_reg load_w_partial(const float* p, int n) { return fbatch::load_partial(p, n); }
  static fbatch madd(fbatch acc, a_reg a, w_reg w) { return simd::fma(a, w, acc); }
};

/// fp32 activations, bf16 weights widened to fp32 in registers (exact), fp32 fma.
struct bf16_widen_operands {
  using a_type = float;
  using w_type = std::uint16_t;
  using a_reg = fbatch;
  using w_reg = fbatch;
  static constexpr int chunk = lanes;
  static a_reg load_a(const float* p) { return fbatch::load(p); }
  static a_reg load_a_partial(const float* p, int n) { return fbatch::load_partial(p, n); }
  static w_reg load_w(const std::uint16_t* p) { return fbatch::load_bf16(p); }
  static w_reg load_w_partial(const std::uint16_t* p, int n) { return fbatch::load_bf16_partial(p, n); }
  static fbatch madd(fbatch acc, a_reg a, w_reg w) { return simd::fma(a, w, acc); }
};

template <class A, class W>
struct operands_for;
template <>
struct operands_for<float, float> {
  using type = f32_operands;
};
template <>
struct operands_for<float, std::uint16_t> {
  using type = bf16_widen_operands;
};

#if GROVE_TILES_BF16_DOT
/// bf16 activations and bf16 weights, vdpbf16ps: each lane accumulates a pair of K in fp32.
struct bf16_dot_operands {
  using a_type = std::uint16_t;
  using w_type = std::uint16_t;
  using a_reg = simd::bf16_pairs<arch>;
  using w_reg = simd::bf16_pairs<arch>;
  static constexpr int chunk = a_reg::size;
  static a_reg load_a(const std::uint16_t* p) { return a_reg::load(p); }
  static a_reg load_a_partial(const std::uint16_t* p, int n) { return a_reg::load_partial(p, n); }
  static w_reg load_w(const std::uint16_t* p) { return w_reg::load(p); }
  static w_reg load_w_partial(const std::uint16_t* p, int n) { return w_reg::load_partial(p, n); }
  static fbatch madd(fbatch acc, a_reg a, w_reg w) { return simd::dot_pairs(acc, a, w); }
};
template <>
struct operands_for<std::uint16_t, std::uint16_t> {
  using type = bf16_dot_operands;
};
#endif

/// Asks for the cache line at p ahead of use.
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }
/// Asks for the lines of `bytes` bytes at p.
inline void prefetch_bytes(const void* p, index bytes) {
  for (index at = 0; at < bytes; at += 64) prefetch(static_cast<const char*>(p) + at);
}

/// The lines of the next weight panel one kernel call prefetches. A panel (the NR weight rows a
/// tile works on next) is read from memory once; its lines are prefetched while the previous
/// panel runs, spread evenly over that panel's row blocks and over the iterations of each call,
/// so that memory streams at a steady rate under the arithmetic instead of in bursts. Lines are
/// numbered row-interleaved: line q is line q / rows of row q % rows.
struct prefetch_window {
  const char* const* rows;  ///< `Rows` row starts (template parameter of the kernel)
  index begin;
  index end;
  index per_iteration;
};

template <int Rows>
inline void prefetch_lines(const prefetch_window& pw, index& q) {
  for (index j = 0; j < pw.per_iteration && q < pw.end; ++j, ++q) prefetch(pw.rows[q % Rows] + (q / Rows) * 64);
}

/// The share of a panel's lines that row block `block` of `blocks` prefetches, for a kernel of
/// `iterations` iterations.
inline prefetch_window share_of(const char* const* rows, int row_count, index row_bytes, int block, int blocks,
                                index iterations) {
  const index lines = row_count * ((row_bytes + 63) / 64);
  const index begin = lines * block / blocks, end = lines * (block + 1) / blocks;
  const index its = iterations > 0 ? iterations : 1;
  return {rows, begin, end, (end - begin + its - 1) / its};
}

/// out[i] = reduce_add(acc[i]) for N accumulators, `lanes` at a time (fbatch::reduce_lanes:
/// same bits as reduce_add, a fraction of the instructions).
template <int N>
__attribute__((always_inline)) inline void reduce_all(const fbatch* acc, float* out) {
  GROVE_SIMD_UNROLL
  for (int g = 0; g < N; g += lanes) {
    fbatch group[lanes];
    GROVE_SIMD_UNROLL
    for (int i = 0; i < lanes; ++i) group[i] = g + i < N ? acc[g + i] : fbatch::zero();
    float sums[lanes];
    fbatch::reduce_lanes(group, sums);
    GROVE_SIMD_UNROLL
    for (int i = 0; i < lanes; ++i)
      if (g + i < N) out[g + i] = sums[i];
  }
}

/// out[r·NR + c] = Σ_k a[r][k]·w[c][k]. Lane i of an accumulator sums the k ≡ i (mod chunk), in
/// ascending k; the lanes are then added in reduce_add's fixed order. The prefetch window has PR
/// rows (NR, or a full panel's when this is a narrow tail panel).
template <class P, int MR, int NR, bool Prefetch, int PR = NR>
void dot_block(const typename P::a_type* const* a, const typename P::w_type* const* w, index K, float* out,
               const prefetch_window& pw) {
  index q = pw.begin;
  fbatch acc[MR][NR];
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r) {
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) acc[r][c] = fbatch::zero();
  }
  index k = 0;
  for (; k + P::chunk <= K; k += P::chunk) {
    typename P::a_reg av[MR];
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) av[r] = P::load_a(a[r] + k);
    if constexpr (Prefetch) prefetch_lines<PR>(pw, q);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      const typename P::w_reg wv = P::load_w(w[c] + k);
      GROVE_SIMD_UNROLL
      for (int r = 0; r < MR; ++r) acc[r][c] = P::madd(acc[r][c], av[r], wv);
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    typename P::a_reg av[MR];
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) av[r] = P::load_a_partial(a[r] + k, n);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      const typename P::w_reg wv = P::load_w_partial(w[c] + k, n);
      GROVE_SIMD_UNROLL
      for (int r = 0; r < MR; ++r) acc[r][c] = P::madd(acc[r][c], av[r], wv);
    }
  }
  reduce_all<MR * NR>(&acc[0][0], out);
}

/// dot_block for two weight matrices at once (gate and up share the activation loads):
/// out[r·NR + c] for w1, out[MR·NR + r·NR + c] for w2 (prefetch window of 2·PR rows).
template <class P, int MR, int NR, bool Prefetch, int PR = NR>
void dot_block2(const typename P::a_type* const* a, const typename P::w_type* const* w1,
                const typename P::w_type* const* w2, index K, float* out, const prefetch_window& pw) {
  index q = pw.begin;
  fbatch acc[2][MR][NR];
  auto& acc1 = acc[0];
  auto& acc2 = acc[1];
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r) {
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) acc1[r][c] = acc2[r][c] = fbatch::zero();
  }
  index k = 0;
  for (; k + P::chunk <= K; k += P::chunk) {
    typename P::a_reg av[MR];
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) av[r] = P::load_a(a[r] + k);
    if constexpr (Prefetch) prefetch_lines<2 * PR>(pw, q);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      const typename P::w_reg g = P::load_w(w1[c] + k);
      const typename P::w_reg u = P::load_w(w2[c] + k);
      GROVE_SIMD_UNROLL
      for (int r = 0; r < MR; ++r) {
        acc1[r][c] = P::madd(acc1[r][c], av[r], g);
        acc2[r][c] = P::madd(acc2[r][c], av[r], u);
      }
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    typename P::a_reg av[MR];
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) av[r] = P::load_a_partial(a[r] + k, n);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      const typename P::w_reg g = P::load_w_partial(w1[c] + k, n);
      const typename P::w_reg u = P::load_w_partial(w2[c] + k, n);
      GROVE_SIMD_UNROLL
      for (int r = 0; r < MR; ++r) {
        acc1[r][c] = P::madd(acc1[r][c], av[r], g);
        acc2[r][c] = P::madd(acc2[r][c], av[r], u);
      }
    }
  }
  reduce_all<2 * MR * NR>(&acc[0][0][0], out);
}

// Register blocking. A tile runs over panels of NR weight rows (outer) and blocks of MR
// activation rows (inner); MR·NR (gate/up: 2·MR·NR) accumulators, the MR activation registers
// and a weight register or two fit the register file. NR is chosen once per tile from how many
// rows it has (few rows: wide panels, more memory streams in flight); the last row block of a
// panel may be shorter than MR.
constexpr int max_rows = wide_registers ? 4 : 2;
constexpr int gate_up_cols(int mr) {
  if (wide_registers) return mr == 1 ? 4 : mr == 2 ? 6 : mr == 3 ? 4 : 3;
  return mr == 1 ? 6 : 3;
}
constexpr int down_cols(int mr) {
  if (wide_registers) return mr == 1 ? 8 : mr == 2 ? 12 : mr == 3 ? 8 : 6;
  return mr == 1 ? 12 : 6;
}
/// The narrow panel that ends a tile whose width is not a multiple of NR, when at most this many
/// columns are left (a 32-column gate/up tile is 10 panels of 3 and one of 2; a 64-column down
/// tile 10 panels of 6 and one of 4): the full-width panel would do up to a third more products
/// than the columns need. Every product's chain is the same in either panel, so no bit changes.
constexpr int gate_up_tail_cols = 2;
constexpr int down_tail_cols = 4;
constexpr int max_tile_rows = 64;  // schedule_shape limits: the g/u scratch of a tile is on the stack
constexpr int max_tile_cols = 64;

/// Stores a batch of h as the pass keeps it: fp32, or bf16 bits for the vdpbf16ps down product.
inline void store_h(const fbatch& v, float* h) { v.store(h); }
inline void store_h(const fbatch& v, std::uint16_t* h) { v.store_bf16(h); }
inline void store_h_partial(const fbatch& v, float* h, int n) { v.store_partial(h, n); }
inline void store_h_partial(const fbatch& v, std::uint16_t* h, int n) { v.store_bf16_partial(h, n); }

/// h = silu(g) ⊙ u for one row of a tile (docs/math.md, step 4), silu(z) = z / (1 + e^{-z});
/// H is float or std::uint16_t (bf16 bits).
template <class H>
void swiglu_row(const float* g, const float* u, int n, H* h) {
  const fbatch one = fbatch::broadcast(1.0f);
  int j = 0;
  for (; j + lanes <= n; j += lanes) {
    const fbatch gv = fbatch::load(g + j);
    const fbatch s = gv / (one + simd::exp(fbatch::zero() - gv));
    store_h(s * fbatch::load(u + j), h + j);
  }
  if (j < n) {
    const fbatch gv = fbatch::load_partial(g + j, n - j);
    const fbatch s = gv / (one + simd::exp(fbatch::zero() - gv));
    store_h_partial(s * fbatch::load_partial(u + j, n - j), h + j, n - j);
  }
}

/// One row block of a gate/up panel: dot_block2 (prefetching the next panel when asked), then
/// the valid columns copied into the tile's g/u scratch.
template <class P, int MR, int NR, int PR = NR>
void gate_up_block(const typename P::a_type* const* a, const typename P::w_type* const* wg,
                   const typename P::w_type* const* wu, const prefetch_window& pw, index K, int valid,
                   float (*g)[max_tile_cols], float (*u)[max_tile_cols], int c0) {
  float out[2 * MR * NR];
  if (pw.begin < pw.end)
    dot_block2<P, MR, NR, true, PR>(a, wg, wu, K, out, pw);
  else
    dot_block2<P, MR, NR, false, PR>(a, wg, wu, K, out, pw);
  const float* og = out;
  const float* ou = out + MR * NR;
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < valid; ++c) {
      g[r][c0 + c] = og[r * NR + c];
      u[r][c0 + c] = ou[r * NR + c];
    }
}

/// What the row blocks of one gate/up panel share.
template <class P>
struct gate_up_panel {
  const typename P::a_type* const* a;
  const typename P::w_type* const* wg;
  const typename P::w_type* const* wu;
  const char* const* next_rows;
  bool more;
  index row_bytes;
  int blocks;
  index iterations, hidden;
  int valid, c0;
};

/// Every row block of one panel of NW columns (NW = NR, or the narrow tail panel), whose row
/// blocks prefetch, between them, the next panel of NR columns (2·NR rows of gate and up).
template <class P, int MR, int NW, int NR>
void gate_up_row_blocks(const gate_up_panel<P>& p, int rows, float (*g)[max_tile_cols], float (*u)[max_tile_cols]) {
  int r0 = 0, block = 0;
  for (; r0 + MR <= rows; r0 += MR, ++block) {
    const prefetch_window pw = p.more ? share_of(p.next_rows, 2 * NR, p.row_bytes, block, p.blocks, p.iterations)
                                      : prefetch_window{p.next_rows, 0, 0, 0};
    gate_up_block<P, MR, NW, NR>(p.a + r0, p.wg, p.wu, pw, p.hidden, p.valid, g + r0, u + r0, p.c0);
  }
  const prefetch_window pw = p.more ? share_of(p.next_rows, 2 * NR, p.row_bytes, block, p.blocks, p.iterations)
                                    : prefetch_window{p.next_rows, 0, 0, 0};
  switch (rows - r0) {
    case 3: gate_up_block<P, MR >= 4 ? 3 : 1, NW, NR>(p.a + r0, p.wg, p.wu, pw, p.hidden, p.valid, g + r0, u + r0, p.c0); break;
    case 2: gate_up_block<P, MR >= 3 ? 2 : 1, NW, NR>(p.a + r0, p.wg, p.wu, pw, p.hidden, p.valid, g + r0, u + r0, p.c0); break;
    case 1: gate_up_block<P, 1, NW, NR>(p.a + r0, p.wg, p.wu, pw, p.hidden, p.valid, g + r0, u + r0, p.c0); break;
    default: break;
  }
}

/// A gate/up tile with panels of NR columns: for each panel (its weight rows read from memory
/// once, the next panel prefetched while it runs, spread over its row blocks), every row block; then
/// SwiGLU of the tile into h.
template <class P, int NR, class Pass>
void gate_up_panels(const Pass& pass, const detail::expert_item<typename P::w_type>& item, const detail::gate_up_tile& tile,
                    const detail::gate_up_tile* following) {
  using w_ptr = const typename P::w_type*;
  constexpr int MR = NR == gate_up_cols(1) ? 1 : NR == gate_up_cols(2) ? 2 : NR == gate_up_cols(3) ? 3 : max_rows;
  const index H = pass.hidden;
  const int rows = tile.row_end - tile.row_begin, width = tile.col_end - tile.col_begin;
  const typename P::a_type* a[max_tile_rows];
  for (int r = 0; r < rows; ++r)
    a[r] = pass.x + static_cast<index>(item.rows[tile.row_begin + r].token) * pass.ldx;
  float g[max_tile_rows][max_tile_cols], u[max_tile_rows][max_tile_cols];
  w_ptr wg[NR], wu[NR], ng[NR], nu[NR];
  const char* next_rows[2 * NR];
  const int blocks = (rows + MR - 1) / MR;
  const index iterations = (H + P::chunk - 1) / P::chunk;
  const index row_bytes = H * static_cast<index>(sizeof(typename P::w_type));
  const index ldw = H + pass.weight_row_pad;  // the weight rows' stride (tile_pass::weight_row_pad)
  // Columns past the tile repeat its last one; their results are dropped.
  GROVE_SIMD_UNROLL
  for (int c = 0; c < NR; ++c) {
    const index col = tile.col_begin + (c < width ? c : width - 1);
    wg[c] = item.gate + col * ldw;
    wu[c] = item.up + col * ldw;
  }
  for (int c0 = 0; c0 < width; c0 += NR) {
    bool more = c0 + NR < width;
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      const index col = tile.col_begin + (c0 + NR + c < width ? c0 + NR + c : width - 1);
      ng[c] = item.gate + col * ldw;
      nu[c] = item.up + col * ldw;
      next_rows[c] = reinterpret_cast<const char*>(ng[c]);
      next_rows[NR + c] = reinterpret_cast<const char*>(nu[c]);
    }
    if (!more && following != nullptr) {
      // Last panel: prefetch the first panel of the tile this thread runs next.
      const auto& f = pass.gate_up_spans[following->item];
      const int f_width = following->col_end - following->col_begin;
      for (int c = 0; c < NR; ++c) {
        const index col = following->col_begin + (c < f_width ? c : f_width - 1);
        next_rows[c] = reinterpret_cast<const char*>(f.gate + col * ldw);
        next_rows[NR + c] = reinterpret_cast<const char*>(f.up + col * ldw);
      }
      more = true;
    }
    const int valid = width - c0 < NR ? width - c0 : NR;
    const gate_up_panel<P> panel{a, wg, wu, next_rows, more, row_bytes, blocks, iterations, H, valid, c0};
    if (NR > gate_up_tail_cols && valid <= gate_up_tail_cols)
      gate_up_row_blocks<P, MR, (NR > gate_up_tail_cols ? gate_up_tail_cols : NR), NR>(panel, rows, g, u);
    else
      gate_up_row_blocks<P, MR, NR, NR>(panel, rows, g, u);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      wg[c] = ng[c];
      wu[c] = nu[c];
    }
  }
  const index at = item.h_offset + tile.row_begin * item.inter + tile.col_begin;
  if (pass.gate_out != nullptr) {
    // Training: keep the pre-activations, in the layout of h.
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < width; ++c) {
        pass.gate_out[at + r * item.inter + c] = g[r][c];
        pass.up_out[at + r * item.inter + c] = u[r][c];
      }
  }
  if (pass.h != nullptr)
    for (int r = 0; r < rows; ++r) swiglu_row(g[r], u[r], width, pass.h + at + r * item.inter);
}

/// A gate/up tile of `item` with operands P, at the panel width that fits its rows.
template <class P, class Pass>
void gate_up_item_tile(const Pass& pass, const detail::expert_item<typename P::w_type>& item,
                       const detail::gate_up_tile& tile, const detail::gate_up_tile* following) {
  const int rows = tile.row_end - tile.row_begin;
  if (rows >= max_rows)
    gate_up_panels<P, gate_up_cols(max_rows)>(pass, item, tile, following);
  else if (rows == 3)
    gate_up_panels<P, gate_up_cols(3)>(pass, item, tile, following);
  else if (rows == 2)
    gate_up_panels<P, gate_up_cols(2)>(pass, item, tile, following);
  else
    gate_up_panels<P, gate_up_cols(1)>(pass, item, tile, following);
}

/// One gate/up tile (rows ≤ max_tile_rows, columns ≤ max_tile_cols); `following` (or null) is
/// the tile the calling thread runs next, whose first panel is prefetched at the end of this one.
/// (`thread`: the calling thread's number, for kernels with per-thread scratch; unused here.)
template <class Pass>
void gate_up_tile(const Pass& pass, const detail::gate_up_tile& tile, const detail::gate_up_tile* following, int) {
  using A = std::remove_const_t<std::remove_pointer_t<decltype(pass.x)>>;
  using W = std::remove_const_t<std::remove_pointer_t<decltype(pass.items->gate)>>;
  using P = typename operands_for<A, W>::type;
  gate_up_item_tile<P>(pass, pass.gate_up_spans[tile.item], tile, following);
}

/// One row block of a down panel: dot_block, then the weighted scatter-add y[token] += w · out
/// (one add per element per item).
template <class P, int MR, int NR, int PR = NR>
void down_block(const typename P::a_type* const* a, const typename P::w_type* const* w, const prefetch_window& pw,
                index K, int valid, float* const* y, const float* weight, index c0) {
  float out[MR * NR];
  if (pw.begin < pw.end)
    dot_block<P, MR, NR, true, PR>(a, w, K, out, pw);
  else
    dot_block<P, MR, NR, false, PR>(a, w, K, out, pw);
  GROVE_SIMD_UNROLL
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < valid; ++c) y[r][c0 + c] = fbatch::fmadd_scalar(weight[r], out[r * NR + c], y[r][c0 + c]);
}

/// down_block for a row block of mr ≤ MR rows, in a panel of NW columns (NR, or the narrow tail).
template <class P, int MR, int NW, int NR>
void down_rows(int mr, const typename P::a_type* const* a, const typename P::w_type* const* w,
               const prefetch_window& pw, index K, int valid, float* const* y, const float* weight, index c0) {
  switch (mr) {
    case 4: down_block<P, MR >= 4 ? 4 : 1, NW, NR>(a, w, pw, K, valid, y, weight, c0); break;
    case 3: down_block<P, MR >= 3 ? 3 : 1, NW, NR>(a, w, pw, K, valid, y, weight, c0); break;
    case 2: down_block<P, MR >= 2 ? 2 : 1, NW, NR>(a, w, pw, K, valid, y, weight, c0); break;
    default: down_block<P, 1, NW, NR>(a, w, pw, K, valid, y, weight, c0); break;
  }
}

/// An item's rows against y's columns [c_begin, c_end), in panels of NR down-projection rows,
/// each weighted row added into its group row of `partial` ([group rows, c_end - c_begin]).
template <class P, int NR, class Pass>
void down_panels(const Pass& pass, const detail::expert_item<typename P::w_type>& item, index c_begin, index c_end,
                 float* partial, const detail::expert_item<typename P::w_type>* following, index following_col) {
  using w_ptr = const typename P::w_type*;
  constexpr int MR = NR == down_cols(1) ? 1 : NR == down_cols(2) ? 2 : NR == down_cols(3) ? 3 : max_rows;
  const index K = item.inter;
  const index rows = item.row_count;
  const index width = c_end - c_begin;
  const std::int32_t* slots = pass.group_slots + item.first_row;
  w_ptr w[NR], next[NR];
  const char* next_rows[NR];
  const int blocks = static_cast<int>((rows + MR - 1) / MR);
  const index iterations = (K + P::chunk - 1) / P::chunk;
  const index row_bytes = K * static_cast<index>(sizeof(typename P::w_type));
  const index ldk = K + pass.weight_row_pad;  // the weight rows' stride (tile_pass::weight_row_pad)
  GROVE_SIMD_UNROLL
  for (int c = 0; c < NR; ++c) w[c] = item.down + (c_begin + c < c_end ? c_begin + c : c_end - 1) * ldk;
  for (index c0 = c_begin; c0 < c_end; c0 += NR) {
    bool more = c0 + NR < c_end;
    index prefetch_row_bytes = row_bytes;
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      next[c] = item.down + (c0 + NR + c < c_end ? c0 + NR + c : c_end - 1) * ldk;
      next_rows[c] = reinterpret_cast<const char*>(next[c]);
    }
    if (!more && following != nullptr) {
      // Last panel: prefetch the first panel of the item (or tile) that comes next.
      for (int c = 0; c < NR; ++c)
        next_rows[c] = reinterpret_cast<const char*>(following->down +
                                                     (following_col + c) * (following->inter + pass.weight_row_pad));
      prefetch_row_bytes = following->inter * static_cast<index>(sizeof(typename P::w_type));
      more = true;
    }
    const int valid = c_end - c0 < NR ? static_cast<int>(c_end - c0) : NR;
    for (index r0 = 0; r0 < rows; r0 += MR) {
      const int mr = rows - r0 < MR ? static_cast<int>(rows - r0) : MR;
      const typename P::a_type* a[MR];
      float* out[MR];
      float weight[MR];
      for (int r = 0; r < mr; ++r) {
        a[r] = pass.h + item.h_offset + (r0 + r) * K;
        out[r] = partial + static_cast<index>(slots[r0 + r]) * width;
        weight[r] = item.rows[r0 + r].weight;
      }
      const int block = static_cast<int>(r0 / MR);
      const prefetch_window pw = more ? share_of(next_rows, NR, prefetch_row_bytes, block, blocks, iterations)
                                      : prefetch_window{next_rows, 0, 0, 0};
      if (NR > down_tail_cols && valid <= down_tail_cols)
        down_rows<P, MR, (NR > down_tail_cols ? down_tail_cols : NR), NR>(mr, a, w, pw, K, valid, out, weight, c0 - c_begin);
      else
        down_rows<P, MR, NR, NR>(mr, a, w, pw, K, valid, out, weight, c0 - c_begin);
    }
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) w[c] = next[c];
  }
}

/// n floats of `to` set to +0 (the down tiles here and the dx tiles of backward_tiles-inl.hpp,
/// which is included after this file, start each group's partial with it).
inline void zero_floats(float* to, index n) {
  index i = 0;
  for (; i + lanes <= n; i += lanes) fbatch::zero().store(to + i);
  if (i < n) fbatch::zero().store_partial(to + i, static_cast<int>(n - i));
}
/// to[i] = to[i] + from[i] for n floats (the fold of a partial; one rounding per element).
inline void add_floats(float* to, const float* from, index n) {
  index i = 0;
  for (; i + lanes <= n; i += lanes) (fbatch::load(to + i) + fbatch::load(from + i)).store(to + i);
  if (i < n) {
    const int m = static_cast<int>(n - i);
    (fbatch::load_partial(to + i, m) + fbatch::load_partial(from + i, m)).store_partial(to + i, m);
  }
}
inline void copy_floats(float* to, const float* from, index n) {
  index i = 0;
  for (; i + lanes <= n; i += lanes) fbatch::load(from + i).store(to + i);
  if (i < n) fbatch::load_partial(from + i, static_cast<int>(n - i)).store_partial(to + i, static_cast<int>(n - i));
}

/// What every format's down tile does around its items, in the canonical order
/// (plan/combine.hpp): columns [tile·down_cols, …) of y zeroed (unless the pass writes
/// partials), then group by group: the group's partial (this thread's scratch) from +0,
/// `run_item(pass, item, c_begin, c_end, partial, next_item, next_col)` for each of the group's
/// items, and the partial added to y or stored as the group's partials. `next_item` and
/// `next_col` are what an item prefetches at its end: the next item's first panel of at most
/// `prefetch_cols` rows, or the first of the tile this thread runs next (`following`, or -1).
/// The quantized tiles (quantized_tiles-inl.hpp) run their items through it too.
template <class Pass, class RunItem>
void down_tile_in_groups(const Pass& pass, index tile, index following, float* partial, index prefetch_cols,
                         const RunItem& run_item) {
  using item_type = std::remove_const_t<std::remove_pointer_t<decltype(pass.items)>>;
  const index c_begin = tile * pass.down_cols;
  const index c_end = c_begin + pass.down_cols < pass.hidden ? c_begin + pass.down_cols : pass.hidden;
  const index width = c_end - c_begin;
  if (pass.partials == nullptr)
    for (index t = 0; t < pass.tokens; ++t) zero_floats(pass.y + t * pass.ldy + c_begin, width);
  for (index g = 0; g < pass.group_count; ++g) {
    const detail::group_span& group = pass.groups[g];
    zero_floats(partial, group.row_count * width);
    for (index i = group.item_begin; i < group.item_end; ++i) {
      const item_type* next_item = nullptr;
      index next_col = c_begin;
      if (i + 1 < pass.item_count) {
        next_item = &pass.items[i + 1];
      } else if (following >= 0) {
        next_item = &pass.items[0];
        next_col = following * pass.down_cols;
      }
      // The prefetch reads at most prefetch_cols rows from next_col: stay inside the matrix.
      if (next_item != nullptr && next_col + prefetch_cols > pass.hidden) next_col = pass.hidden - prefetch_cols;
      if (next_col < 0) next_item = nullptr;
      run_item(pass, pass.items[i], c_begin, c_end, partial, next_item, next_col);
    }
    if (pass.partials != nullptr) {
      for (index r = 0; r < group.row_count; ++r)
        copy_floats(pass.partials + (group.first_row + r) * pass.ldp + c_begin, partial + r * width, width);
    } else {
      for (index r = 0; r < group.row_count; ++r)
        add_floats(pass.y + static_cast<index>(group.rows[r].token) * pass.ldy + c_begin, partial + r * width, width);
    }
  }
}

/// The fp32 and bf16 items of a down tile: down_panels at the width that fits the item's rows.
/// (A struct, not a lambda: clang's target pragma does not reach lambdas.)
template <class P>
struct down_panel_items {
  template <class Pass, class Item>
  void operator()(const Pass& pass, const Item& item, index c_begin, index c_end, float* partial,
                  const Item* next_item, index next_col) const {
    if (item.row_count >= max_rows)
      down_panels<P, down_cols(max_rows)>(pass, item, c_begin, c_end, partial, next_item, next_col);
    else if (item.row_count == 3)
      down_panels<P, down_cols(3)>(pass, item, c_begin, c_end, partial, next_item, next_col);
    else if (item.row_count == 2)
      down_panels<P, down_cols(2)>(pass, item, c_begin, c_end, partial, next_item, next_col);
    else
      down_panels<P, down_cols(1)>(pass, item, c_begin, c_end, partial, next_item, next_col);
  }
};

/// One down tile: columns [tile·down_cols, ...) of y, zeroed, then group by group: the group's
/// items summed into `partial` (this thread's scratch, from +0), which is then added to y, or
/// stored as the group's partials. `following` (or -1) is the tile the calling thread runs next
/// (prefetched at the very end).
template <class Pass>
void down_tile(const Pass& pass, index tile, index following, float* partial, int) {
  using A = std::remove_const_t<std::remove_pointer_t<decltype(pass.h)>>;
  using W = std::remove_const_t<std::remove_pointer_t<decltype(pass.items->gate)>>;
  using P = typename operands_for<A, W>::type;
  down_tile_in_groups(pass, tile, following, partial, down_cols(1), down_panel_items<P>{});
}

/// Copies rows [r0, r1) of x into the padded staging buffer (fp32).
inline void stage_rows(const float* x, index ldx_in, index hidden, index r0, index r1, float* out, index ld_out) {
  for (index t = r0; t < r1; ++t) {
    const float* src = x + t * ldx_in;
    float* dst = out + t * ld_out;
    index c = 0;
    for (; c + lanes <= hidden; c += lanes) fbatch::load(src + c).store(dst + c);
    if (c < hidden) fbatch::load_partial(src + c, static_cast<int>(hidden - c)).store_partial(dst + c, static_cast<int>(hidden - c));
  }
}
/// Rounds rows [r0, r1) of x to bf16 into the staging buffer (for vdpbf16ps).
inline void stage_rows(const float* x, index ldx_in, index hidden, index r0, index r1, std::uint16_t* out,
                       index ld_out) {
  for (index t = r0; t < r1; ++t) {
    const float* src = x + t * ldx_in;
    std::uint16_t* dst = out + t * ld_out;
    index c = 0;
    for (; c + lanes <= hidden; c += lanes) fbatch::load(src + c).store_bf16(dst + c);
    if (c < hidden)
      fbatch::load_partial(src + c, static_cast<int>(hidden - c)).store_bf16_partial(dst + c, static_cast<int>(hidden - c));
  }
}

}  // namespace GROVE_TILES_NS
}  // namespace detail
GROVE_END_NAMESPACE

#endif  // GROVE_TILES_NS
