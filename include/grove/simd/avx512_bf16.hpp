#pragma once

// AVX512_BF16 on top of batch<float, avx512>: `bf16_pairs` holds 32 bfloat16 values, and
// dot_pairs(acc, a, b) is vdpbf16ps: acc[i] += a[2i]·b[2i] + a[2i+1]·b[2i+1], products of bf16
// inputs accumulated in fp32 (the instruction rounds to nearest even, treats bf16 denormals as
// zero and flushes denormal results, whatever MXCSR says). Functions carry the AVX512_BF16
// target attribute and may only run after simd::supported(isa::avx512_bf16) said yes.

#include <cstdint>

#include "grove/simd/arch.hpp"
#include "grove/simd/avx512.hpp"

#if GROVE_SIMD_X86

#define GROVE_AVX512_BF16_INLINE GROVE_SIMD_INLINE(GROVE_SIMD_TARGET_AVX512_BF16)

GROVE_SIMD_SILENCE_BEGIN
GROVE_BEGIN_NAMESPACE
namespace simd {

template <class Arch>
struct bf16_pairs;

template <>
struct bf16_pairs<avx512_bf16> {
  /// bf16 elements per register.
  static constexpr int size = 32;
  __m512i value;

  GROVE_AVX512_BF16_INLINE static bf16_pairs load(const std::uint16_t* p) {
    return {_mm512_loadu_si512(reinterpret_cast<const void*>(p))};
  }
  /// The first n elements from p, the others zero; reads nothing past p + n.
  GROVE_AVX512_BF16_INLINE static bf16_pairs load_partial(const std::uint16_t* p, int n) {
    const auto mask = static_cast<__mmask32>(n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1u);
    return {_mm512_maskz_loadu_epi16(mask, p)};
  }
};

/// acc + Σ over each lane's pair of a·b (vdpbf16ps).
GROVE_AVX512_BF16_INLINE avx512_batch dot_pairs(avx512_batch acc, bf16_pairs<avx512_bf16> a,
                                                bf16_pairs<avx512_bf16> b) {
  return {_mm512_dpbf16_ps(acc.value, reinterpret_cast<__m512bh>(a.value), reinterpret_cast<__m512bh>(b.value))};
}

}  // namespace simd
GROVE_END_NAMESPACE
GROVE_SIMD_SILENCE_END

#endif  // GROVE_SIMD_X86
