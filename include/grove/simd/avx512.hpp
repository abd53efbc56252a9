#pragma once

// batch<float, avx512>: sixteen floats in a ZMM register (AVX-512 F/BW/DQ/VL). Every function
// carries the AVX-512 target attribute, so this header compiles in a translation unit built for
// baseline x86-64; its functions may only run after simd::supported(isa::avx512) said yes.

#include <cstdint>

#include "grove/simd/arch.hpp"
#include "grove/simd/scalar.hpp"

#if GROVE_SIMD_X86

#define GROVE_AVX512_INLINE GROVE_SIMD_INLINE(GROVE_SIMD_TARGET_AVX512)

GROVE_SIMD_SILENCE_BEGIN
GROVE_BEGIN_NAMESPACE
namespace simd {

namespace avx512_detail {
GROVE_AVX512_INLINE __mmask16 lane_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
GROVE_AVX512_INLINE __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
/// Round-to-nearest-even to bf16 bits (scalar.hpp's rule), sixteen lanes narrowed to 16 bits.
GROVE_AVX512_INLINE __m256i narrow_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i out = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  out = _mm512_mask_or_epi32(out, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(out);
}
}  // namespace avx512_detail

template <>
struct batch<float, avx512> {
  static constexpr int size = 16;
  __m512 value;

  GROVE_AVX512_INLINE static batch zero() { return {_mm512_setzero_ps()}; }
  GROVE_AVX512_INLINE static batch broadcast(float v) { return {_mm512_set1_ps(v)}; }
  GROVE_AVX512_INLINE static batch load(const float* p) { return {_mm512_loadu_ps(p)}; }
  /// The first n lanes from p, the others zero; reads nothing past p + n.
  GROVE_AVX512_INLINE static batch load_partial(const float* p, int n) {
    return {_mm512_maskz_loadu_ps(avx512_detail::lane_mask(n), p)};
  }
  GROVE_AVX512_INLINE static batch load_bf16(const std::uint16_t* p) {
    return {avx512_detail::widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  GROVE_AVX512_INLINE static batch load_bf16_partial(const std::uint16_t* p, int n) {
    return {avx512_detail::widen_bf16(_mm256_maskz_loadu_epi16(avx512_detail::lane_mask(n), p))};
  }
  /// Sixteen int8 values as floats (exact).
  GROVE_AVX512_INLINE static batch load_int8(const std::int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
  GROVE_AVX512_INLINE void store(float* p) const { _mm512_storeu_ps(p, value); }
  GROVE_AVX512_INLINE void store_partial(float* p, int n) const {
    _mm512_mask_storeu_ps(p, avx512_detail::lane_mask(n), value);
  }
  GROVE_AVX512_INLINE void store_bf16(std::uint16_t* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), avx512_detail::narrow_bf16(value));
  }
  GROVE_AVX512_INLINE void store_bf16_partial(std::uint16_t* p, int n) const {
    _mm256_mask_storeu_epi16(p, avx512_detail::lane_mask(n), avx512_detail::narrow_bf16(value));
  }
  /// out[i] = reduce_add(in[i]) for sixteen batches at once, with the same additions in the same
  /// tree as reduce_add (so the same bits), in 15 shuffle-and-add steps instead of 16 reductions.
  GROVE_AVX512_INLINE static void reduce_lanes(const batch* in, float* out) {
    // The tree leaves lane 4q + i holding input 4i + q: feed input 4i + q with batch 4q + i.
    __m512 t[8], u[4], v[2];
    GROVE_SIMD_UNROLL_ALWAYS
    for (int k = 0; k < 8; ++k) {
      const __m512 x = in[source(2 * k)].value, y = in[source(2 * k + 1)].value;
      t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    GROVE_SIMD_UNROLL_ALWAYS
    for (int m = 0; m < 4; ++m)
      u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * m], t[2 * m + 1], 0x88),
                           _mm512_shuffle_f32x4(t[2 * m], t[2 * m + 1], 0xDD));
    GROVE_SIMD_UNROLL_ALWAYS
    for (int n = 0; n < 2; ++n)
      v[n] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * n], u[2 * n + 1], 0x44),
                           _mm512_shuffle_ps(u[2 * n], u[2 * n + 1], 0xEE));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD)));
  }
  static constexpr int source(int p) { return 4 * (p % 4) + p / 4; }

  /// a·b + c on plain floats, fused (one rounding), never left to compiler contraction.
  GROVE_AVX512_INLINE static float fmadd_scalar(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
  }
};

using avx512_batch = batch<float, avx512>;

GROVE_AVX512_INLINE avx512_batch operator+(avx512_batch a, avx512_batch b) { return {_mm512_add_ps(a.value, b.value)}; }
GROVE_AVX512_INLINE avx512_batch operator-(avx512_batch a, avx512_batch b) { return {_mm512_sub_ps(a.value, b.value)}; }
GROVE_AVX512_INLINE avx512_batch operator*(avx512_batch a, avx512_batch b) { return {_mm512_mul_ps(a.value, b.value)}; }
GROVE_AVX512_INLINE avx512_batch operator/(avx512_batch a, avx512_batch b) { return {_mm512_div_ps(a.value, b.value)}; }
/// a·b + c, one rounding.
/// Keeps a loaded value in a register: without it the compiler may fold the load into every
/// instruction that uses the value (an FMA with a memory operand), so that a vector meant to
/// be loaded once per iteration and reused by many FMAs is loaded by each of them, and the
/// kernel becomes bound by loads instead of FMAs.
GROVE_AVX512_INLINE void pin(avx512_batch& a) { __asm__("" : "+v"(a.value)); }
GROVE_AVX512_INLINE avx512_batch fma(avx512_batch a, avx512_batch b, avx512_batch c) {
  return {_mm512_fmadd_ps(a.value, b.value, c.value)};
}
/// Sum of the lanes in a fixed order: halves, quarters, then as AVX2 does.
GROVE_AVX512_INLINE float reduce_add(avx512_batch a) {
  const __m512 h = _mm512_add_ps(a.value, _mm512_shuffle_f32x4(a.value, a.value, 0x4E));
  const __m256 s8 = _mm512_castps512_ps256(h);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
/// e^x for x in [-87.3, 88] (clamped outside), within 2 ulp: 2^n · p(r), Cephes' polynomial
/// (the same operations as the AVX2 version).
GROVE_AVX512_INLINE avx512_batch exp(avx512_batch a) {
  __m512 x = _mm512_min_ps(_mm512_max_ps(a.value, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return {_mm512_mul_ps(p, _mm512_castsi512_ps(e))};
}

}  // namespace simd
GROVE_END_NAMESPACE
GROVE_SIMD_SILENCE_END

#endif  // GROVE_SIMD_X86
