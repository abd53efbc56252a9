#pragma once

// batch<float, avx2>: eight floats in a YMM register (AVX2 + FMA3). Every function carries the
// AVX2 target attribute, so this header compiles in a translation unit built for baseline
// x86-64; its functions may only run after simd::supported(isa::avx2) said yes.

#include <cstdint>
#include <cstring>

#include "grove/simd/arch.hpp"
#include "grove/simd/scalar.hpp"

#if GROVE_SIMD_X86

#define GROVE_AVX2_INLINE GROVE_SIMD_INLINE(GROVE_SIMD_TARGET_AVX2)

GROVE_SIMD_SILENCE_BEGIN
GROVE_BEGIN_NAMESPACE
namespace simd {

namespace avx2_detail {
GROVE_AVX2_INLINE __m256i lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
GROVE_AVX2_INLINE __m256 widen_bf16(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
/// Round-to-nearest-even to bf16 bits in the low 16 bits of each 32-bit lane (scalar.hpp's rule).
GROVE_AVX2_INLINE __m128i narrow_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i out = _mm256_blendv_epi8(rounded, quiet, nan);
  // Values are < 2^16: pack the eight 32-bit lanes to 16 bits, in order.
  const __m256i packed = _mm256_packus_epi32(out, out);  // [0..3 0..3 | 4..7 4..7]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
}  // namespace avx2_detail

template <>
struct batch<float, avx2> {
  static constexpr int size = 8;
  __m256 value;

  GROVE_AVX2_INLINE static batch zero() { return {_mm256_setzero_ps()}; }
  GROVE_AVX2_INLINE static batch broadcast(float v) { return {_mm256_set1_ps(v)}; }
  GROVE_AVX2_INLINE static batch load(const float* p) { return {_mm256_loadu_ps(p)}; }
  /// The first n lanes from p, the others zero; reads nothing past p + n.
  GROVE_AVX2_INLINE static batch load_partial(const float* p, int n) {
    return {_mm256_maskload_ps(p, avx2_detail::lane_mask(n))};
  }
  GROVE_AVX2_INLINE static batch load_bf16(const std::uint16_t* p) {
    return {avx2_detail::widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  GROVE_AVX2_INLINE static batch load_bf16_partial(const std::uint16_t* p, int n) {
    std::uint16_t tmp[8] = {};
    std::memcpy(tmp, p, sizeof(std::uint16_t) * static_cast<std::size_t>(n));
    return load_bf16(tmp);
  }
  /// Eight int8 values as floats (exact).
  GROVE_AVX2_INLINE static batch load_int8(const std::int8_t* p) {
    std::int64_t bytes;
    std::memcpy(&bytes, p, sizeof bytes);
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bytes)))};
  }
  GROVE_AVX2_INLINE void store(float* p) const { _mm256_storeu_ps(p, value); }
  GROVE_AVX2_INLINE void store_partial(float* p, int n) const {
    _mm256_maskstore_ps(p, avx2_detail::lane_mask(n), value);
  }
  GROVE_AVX2_INLINE void store_bf16(std::uint16_t* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), avx2_detail::narrow_bf16(value));
  }
  GROVE_AVX2_INLINE void store_bf16_partial(std::uint16_t* p, int n) const {
    std::uint16_t tmp[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), avx2_detail::narrow_bf16(value));
    std::memcpy(p, tmp, sizeof(std::uint16_t) * static_cast<std::size_t>(n));
  }
  /// out[i] = reduce_add(in[i]) for eight batches at once, with the same additions in the same
  /// tree as reduce_add (so the same bits), in 7 shuffle-and-add steps instead of 8 reductions.
  GROVE_AVX2_INLINE static void reduce_lanes(const batch* in, float* out) {
    // The tree leaves lane 4h + i holding input 2i + h: feed input 2i + h with batch 4h + i.
    __m256 t[4], v[2];
    GROVE_SIMD_UNROLL_ALWAYS
    for (int k = 0; k < 4; ++k) {
      const __m256 x = in[source(2 * k)].value, y = in[source(2 * k + 1)].value;
      t[k] = _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
    }
    GROVE_SIMD_UNROLL_ALWAYS
    for (int n = 0; n < 2; ++n)
      v[n] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * n], t[2 * n + 1], 0x44),
                           _mm256_shuffle_ps(t[2 * n], t[2 * n + 1], 0xEE));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_shuffle_ps(v[0], v[1], 0x88), _mm256_shuffle_ps(v[0], v[1], 0xDD)));
  }
  static constexpr int source(int p) { return 4 * (p % 2) + p / 2; }

  /// a·b + c on plain floats, fused (one rounding), never left to compiler contraction.
  GROVE_AVX2_INLINE static float fmadd_scalar(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
  }
};

using avx2_batch = batch<float, avx2>;

GROVE_AVX2_INLINE avx2_batch operator+(avx2_batch a, avx2_batch b) { return {_mm256_add_ps(a.value, b.value)}; }
GROVE_AVX2_INLINE avx2_batch operator-(avx2_batch a, avx2_batch b) { return {_mm256_sub_ps(a.value, b.value)}; }
GROVE_AVX2_INLINE avx2_batch operator*(avx2_batch a, avx2_batch b) { return {_mm256_mul_ps(a.value, b.value)}; }
GROVE_AVX2_INLINE avx2_batch operator/(avx2_batch a, avx2_batch b) { return {_mm256_div_ps(a.value, b.value)}; }
/// a·b + c, one rounding.
/// Keeps a loaded value in a register: without it the compiler may fold the load into every
/// instruction that uses the value (an FMA with a memory operand), so that a vector meant to
/// be loaded once per iteration and reused by many FMAs is loaded by each of them, and the
/// kernel becomes bound by loads instead of FMAs.
GROVE_AVX2_INLINE void pin(avx2_batch& a) { __asm__("" : "+x"(a.value)); }
GROVE_AVX2_INLINE avx2_batch fma(avx2_batch a, avx2_batch b, avx2_batch c) {
  return {_mm256_fmadd_ps(a.value, b.value, c.value)};
}
/// Sum of the lanes, in a fixed order (halves, then quarters, then pairs).
GROVE_AVX2_INLINE float reduce_add(avx2_batch a) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a.value), _mm256_extractf128_ps(a.value, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}
/// e^x for x in [-87.3, 88] (clamped outside), within 2 ulp: 2^n · p(r), Cephes' polynomial.
GROVE_AVX2_INLINE avx2_batch exp(avx2_batch a) {
  __m256 x = _mm256_min_ps(_mm256_max_ps(a.value, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p, _mm256_castsi256_ps(e))};
}

}  // namespace simd
GROVE_END_NAMESPACE
GROVE_SIMD_SILENCE_END

#endif  // GROVE_SIMD_X86
