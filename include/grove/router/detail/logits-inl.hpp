// The router's logit kernel, written once against simd::batch<float, Arch> and compiled once per
// instruction-set level by router/logits.hpp (no include guard, on purpose), like the expert
// tiles. Every logit l[t][e] = ⟨x_t, W_r[e]⟩ is its own chain: one vector accumulator over H in
// chunks of the batch width (the last chunk zero-padded), then one fixed reduction. Blocking over
// tokens and experts only decides which chains run side by side, never the order inside one, so a
// token's logits are the same bits in every batch and at every position (batch invariance).
//
// No lambdas here: clang's target pragma does not reach them.

#ifndef GROVE_LOGITS_NS
#error "compiled once per instruction set by grove/router/logits.hpp: include that instead"
#else

GROVE_BEGIN_NAMESPACE
namespace detail {
namespace GROVE_LOGITS_NS {

using arch = GROVE_LOGITS_ARCH;
using fbatch = simd::float_batch<arch>;
constexpr int lanes = fbatch::size;
/// Tokens and experts per block: MR·NR accumulators, MR activation registers and a weight
/// register fit the register file (16 vector registers on AVX2: 5 × 2 + 5 + 1; 32 on AVX-512:
/// 5 × 5 + 5 + 1). More tokens per block read each router row from L2 fewer times, which keeps a
/// large batch from waiting on L2: on AVX2 (Zen 3) 5 × 2 runs routing at T = 128 and 512 in 0.87
/// to 0.89 of the time of 2 × 4, and on AVX-512 (Zen 4) 5 × 5 runs them in 0.74 to 0.80 of the
/// time of 6 × 4 (docs/performance.md, "Router logits"; 7 × 3, 6 × 3, 5 × 4, 4 × 5, 4 × 6 and
/// 3 × 8 were all slower). The block shape never changes the bits.
constexpr int block_rows = 5;
constexpr int block_experts = arch::registers >= 32 ? 5 : 2;
/// Experts per block for a lone token: 8 (more router rows in flight when nothing is reused
/// from registers).
constexpr int lone_block_experts = 8;

/// Columns of x (and of the router) per step of a block: MR rows of x × this many floats stay in
/// L1 (8 KiB for four rows) while the block's router rows stream from L2 past them. A chain that
/// spans several steps carries its vector accumulator through memory, so splitting H into steps
/// never changes the order inside a chain (a multiple of every level's width).
constexpr index hidden_step = 512;
static_assert(hidden_step % lanes == 0);

/// One step [k_begin, k_end) of MR tokens × NR experts of chains: the accumulators start at zero
/// (first step) or from `state`; after the last step (k_end == hidden, whose tail may be a partial
/// chunk) they are reduced into out[r * NR + c], otherwise stored back to `state`.
template <int MR, int NR>
void logit_block(const float* const* x, const float* const* w, index k_begin, index k_end, index hidden,
                 fbatch* state, float* out) {
  fbatch acc[MR][NR];
  if (k_begin == 0) {
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) {
      GROVE_SIMD_UNROLL
      for (int c = 0; c < NR; ++c) acc[r][c] = fbatch::zero();
    }
  } else {
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) {
      GROVE_SIMD_UNROLL
      for (int c = 0; c < NR; ++c) acc[r][c] = state[r * NR + c];
    }
  }
  index k = k_begin;
  for (; k + lanes <= k_end; k += lanes) {
    fbatch xv[MR];
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) xv[r] = fbatch::load(x[r] + k);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      const fbatch wv = fbatch::load(w[c] + k);
      GROVE_SIMD_UNROLL
      for (int r = 0; r < MR; ++r) acc[r][c] = simd::fma(xv[r], wv, acc[r][c]);
    }
  }
  if (k < k_end) {  // the zero-padded last chunk of H (k_end == hidden here)
    const int n = static_cast<int>(k_end - k);
    fbatch xv[MR];
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) xv[r] = fbatch::load_partial(x[r] + k, n);
    GROVE_SIMD_UNROLL
    for (int c = 0; c < NR; ++c) {
      const fbatch wv = fbatch::load_partial(w[c] + k, n);
      GROVE_SIMD_UNROLL
      for (int r = 0; r < MR; ++r) acc[r][c] = simd::fma(xv[r], wv, acc[r][c]);
    }
  }
  if (k_end == hidden) {
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) {
      GROVE_SIMD_UNROLL
      for (int c = 0; c < NR; ++c) out[r * NR + c] = simd::reduce_add(acc[r][c]);
    }
  } else {
    GROVE_SIMD_UNROLL
    for (int r = 0; r < MR; ++r) {
      GROVE_SIMD_UNROLL
      for (int c = 0; c < NR; ++c) state[r * NR + c] = acc[r][c];
    }
  }
}

/// Experts per pass over the tokens: their router rows stay in L2 while every block of tokens
/// streams past them once. 64 rows (512 KiB at H = 2048) on AVX-512, whose machines here have 1 to
/// 2 MiB of L2 per core; 32 (256 KiB) on AVX2, whose Zen 3 machines have 512 KiB, which 64 rows
/// filled (they then streamed from L3 for every block of tokens).
constexpr index experts_per_pass = arch::registers >= 32 ? 64 : 32;

/// MR tokens (rows of x at xr) against experts [e_begin, e_end) in blocks of NR, step by step
/// over H (hidden_step); `state` holds the chains' accumulators between steps.
template <int MR, int NR>
void token_block(const float* const* xr, int rows, index t0, const float* router, index e_begin, index e_end,
                 index hidden, float* logits, index ldl, fbatch* state) {
  // A lone token's row of x stays in L1 anyway: its chains run over H in one step.
  const index step = MR == 1 ? hidden : hidden_step;
  for (index k0 = 0; k0 < hidden; k0 += step) {
    const index k1 = hidden - k0 < step ? hidden : k0 + step;
    fbatch* block_state = state;
    for (index e0 = e_begin; e0 < e_end; e0 += NR, block_state += MR * NR) {
      const int cols = e_end - e0 < NR ? static_cast<int>(e_end - e0) : NR;
      const float* wr[NR];
      for (int c = 0; c < NR; ++c) wr[c] = router + (e0 + (c < cols ? c : cols - 1)) * hidden;
      float out[MR * NR];
      logit_block<MR, NR>(xr, wr, k0, k1, hidden, block_state, out);
      if (k1 == hidden)
        for (int r = 0; r < MR && r < rows; ++r)
          for (int c = 0; c < cols; ++c) logits[(t0 + r) * ldl + e0 + c] = out[r * NR + c];
    }
  }
}

/// logits [tokens, experts] (row stride ldl) of x [tokens, hidden] (row stride ldx) against the
/// router [experts, hidden]: a pass per chunk of experts, in it a block of tokens at a time against
/// every expert block of the chunk, a step of H at a time (the block's rows of x stay in L1).
/// Short blocks repeat their last row or expert and drop the result.
inline void router_logits(const float* x, index ldx, index tokens, const float* router, index experts, index hidden,
                          float* logits, index ldl) {
  // The accumulators of one token block's chains across an expert chunk: block_rows × (a chunk
  // rounded up to whole expert blocks) vectors (23 KiB on AVX-512), on the stack.
  constexpr index state_vectors = block_rows * (experts_per_pass + lone_block_experts);
  static_assert(block_experts <= lone_block_experts, "the state holds a chunk rounded up to whole blocks");
  alignas(64) fbatch state[state_vectors];
  for (index chunk = 0; chunk < experts; chunk += experts_per_pass) {
    const index chunk_end = experts - chunk < experts_per_pass ? experts : chunk + experts_per_pass;
    for (index t0 = 0; t0 < tokens; t0 += block_rows) {
      const int rows = tokens - t0 < block_rows ? static_cast<int>(tokens - t0) : block_rows;
      const float* xr[block_rows];
      for (int r = 0; r < block_rows; ++r) xr[r] = x + (t0 + (r < rows ? r : rows - 1)) * ldx;
      // Short blocks (the batch's last) get their own instantiation, so no chain is computed twice.
      static_assert(block_rows == 5, "one case per row count below");
      switch (rows) {
        case 5: token_block<5, block_experts>(xr, rows, t0, router, chunk, chunk_end, hidden, logits, ldl, state); break;
        case 4: token_block<4, block_experts>(xr, rows, t0, router, chunk, chunk_end, hidden, logits, ldl, state); break;
        case 3: token_block<3, block_experts>(xr, rows, t0, router, chunk, chunk_end, hidden, logits, ldl, state); break;
        case 2: token_block<2, block_experts>(xr, rows, t0, router, chunk, chunk_end, hidden, logits, ldl, state); break;
        default:
          token_block<1, lone_block_experts>(xr, rows, t0, router, chunk, chunk_end, hidden, logits, ldl, state);
          break;
      }
    }
  }
}

}  // namespace GROVE_LOGITS_NS
}  // namespace detail
GROVE_END_NAMESPACE

#endif  // GROVE_LOGITS_NS
