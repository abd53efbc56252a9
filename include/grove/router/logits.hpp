#pragma once

// Router logits l = W_r x, batch-invariant: a token's logits, and so its picks, are the same bits
// whatever batch it is in and wherever it sits in it (docs/routing.md, "Batch invariance"). Eigen
// cannot promise that: its matrix-vector and matrix-matrix paths, and its blocking, change with T.
// Expert parallelism depends on it: a token routed in another process's batch picks the same
// experts.

#include "grove/config/dynamic.hpp"
#include "grove/simd/batch.hpp"

// The kernel, once per instruction-set level (see simd/batch.hpp on regions).
#define GROVE_LOGITS_NS logits_scalar
#define GROVE_LOGITS_ARCH simd::scalar
#include "grove/router/detail/logits-inl.hpp"
#undef GROVE_LOGITS_NS
#undef GROVE_LOGITS_ARCH

#if GROVE_SIMD_X86
GROVE_SIMD_SILENCE_BEGIN
GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX2)
#define GROVE_LOGITS_NS logits_avx2
#define GROVE_LOGITS_ARCH simd::avx2
#include "grove/router/detail/logits-inl.hpp"
#undef GROVE_LOGITS_NS
#undef GROVE_LOGITS_ARCH
GROVE_SIMD_END_REGION()

GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX512)
#define GROVE_LOGITS_NS logits_avx512
#define GROVE_LOGITS_ARCH simd::avx512
#include "grove/router/detail/logits-inl.hpp"
#undef GROVE_LOGITS_NS
#undef GROVE_LOGITS_ARCH
GROVE_SIMD_END_REGION()
GROVE_SIMD_SILENCE_END
#endif

GROVE_BEGIN_NAMESPACE
namespace detail {

/// fp32 logits [T, E] (row stride ldl) of x [T, H] (row stride ldx) and the router [E, H], with
/// the kernel of `level` (avx512_bf16 runs AVX-512's). Each level sums in its own fixed order, so
/// the bits depend on the level, never on the batch.
inline void router_logits(simd::isa level, const float* x, index ldx, index tokens, const float* router,
                          index experts, index hidden, float* logits, index ldl) {
#if GROVE_SIMD_X86
  switch (level) {
    case simd::isa::avx2: logits_avx2::router_logits(x, ldx, tokens, router, experts, hidden, logits, ldl); return;
    case simd::isa::avx512:
    case simd::isa::avx512_bf16:
      logits_avx512::router_logits(x, ldx, tokens, router, experts, hidden, logits, ldl);
      return;
    case simd::isa::scalar: break;
  }
#else
  (void)level;
#endif
  logits_scalar::router_logits(x, ldx, tokens, router, experts, hidden, logits, ldl);
}

/// fp64 logits (the finite-difference tests' precision): one plain chain per logit.
inline void router_logits(simd::isa, const double* x, index ldx, index tokens, const double* router, index experts,
                          index hidden, double* logits, index ldl) {
  for (index t = 0; t < tokens; ++t)
    for (index e = 0; e < experts; ++e) {
      double sum = 0;
      for (index c = 0; c < hidden; ++c) sum += x[t * ldx + c] * router[e * hidden + c];
      logits[t * ldl + e] = sum;
    }
}

/// The level routing uses: the best this machine runs, looked up once.
inline simd::isa routing_isa() {
  static const simd::isa level = simd::best_isa();
  return level;
}

}  // namespace detail
GROVE_END_NAMESPACE
