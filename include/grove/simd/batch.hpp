#pragma once

// grove's SIMD layer, in one include: batch<float, Arch> for every instruction-set level
// (scalar.hpp, avx2.hpp, avx512.hpp, avx512_bf16.hpp), the run-time check (arch.hpp), and the
// macros that compile a region of generic code for one level.
//
// Generic kernels are templates over Arch written against batch<float, Arch>. To let the
// compiler inline the batch functions (which carry their level's target attribute) into such a
// kernel, the kernel itself must be compiled for that level: GROVE_SIMD_BEGIN_REGION(target) /
// GROVE_SIMD_END_REGION() give every function defined between them the target attribute
// (#pragma GCC target with g++, #pragma clang attribute with clang). A header that defines
// kernels for several levels therefore includes its generic part once per level inside such
// regions (see kernels/cpu/detail/expert_tiles-inl.hpp). Lambdas are not covered by clang's
// pragma: generic kernel code must not use them.

#include "grove/simd/arch.hpp"
#include "grove/simd/avx2.hpp"
#include "grove/simd/avx512.hpp"
#include "grove/simd/avx512_bf16.hpp"
#include "grove/simd/scalar.hpp"


#if GROVE_SIMD_X86 && defined(__clang__)
#define GROVE_SIMD_BEGIN_REGION(targets) \
  GROVE_SIMD_PRAGMA(clang attribute push(__attribute__((target(targets))), apply_to = function))
#define GROVE_SIMD_END_REGION() GROVE_SIMD_PRAGMA(clang attribute pop)
#elif GROVE_SIMD_X86
#define GROVE_SIMD_BEGIN_REGION(targets) _Pragma("GCC push_options") GROVE_SIMD_PRAGMA(GCC target(targets))
#define GROVE_SIMD_END_REGION() _Pragma("GCC pop_options")
#endif

/// Complete unrolling of a loop with a constant trip count (see arch.hpp).
#define GROVE_SIMD_UNROLL GROVE_SIMD_UNROLL_ALWAYS

GROVE_BEGIN_NAMESPACE
namespace simd {

/// The float batch an architecture tag computes with (avx512_bf16 uses AVX-512's).
template <class Arch>
struct float_arch {
  using type = Arch;
};
template <>
struct float_arch<avx512_bf16> {
  using type = avx512;
};

template <class Arch>
using float_batch = batch<float, typename float_arch<Arch>::type>;

}  // namespace simd
GROVE_END_NAMESPACE
