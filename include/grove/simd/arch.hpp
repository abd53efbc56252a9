#pragma once

// Instruction sets grove's CPU kernels are written for, the run-time check of which of them the
// machine has, and the target attributes that let one translation unit, compiled for baseline
// x86-64, hold kernels for every one of them (docs/performance.md, "Run-time dispatch").
//
// The design follows xsimd (architectures as tag types, `batch<T, Arch>`, one header per
// instruction set, the best available one picked at run time). xsimd 8.1 itself cannot be used
// for that here: it defines batch<float, avx2> or batch<float, avx512f> only when the whole
// translation unit is compiled with -mavx2 / -mavx512f (XSIMD_WITH_* follow __AVX2__ and
// __AVX512F__), and its always-inline functions carry no target attributes. A header-only
// library cannot impose such flags on its users, so grove's batches wrap the intrinsics
// themselves, each function carrying the target attribute of its instruction set.

#include <cstdint>
#include <string>
#include <string_view>

#include "grove/error.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define GROVE_SIMD_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define GROVE_SIMD_X86 0
#endif

#if GROVE_SIMD_X86
// Target strings of the instruction-set levels grove dispatches to. Every function of a level
// carries its string, and a kernel region (detail/expert_tiles-inl.hpp) is compiled under it.
#define GROVE_SIMD_TARGET_AVX2 "avx,avx2,fma,f16c"
#define GROVE_SIMD_TARGET_AVX512 "avx,avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl"
#define GROVE_SIMD_TARGET_AVX512_BF16 "avx,avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"
// The block formats' integer dots at the avx512_bf16 level (vpdpbusd).
#define GROVE_SIMD_TARGET_AVX512_VNNI "avx,avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"
#define GROVE_SIMD_INLINE(targets) inline __attribute__((always_inline, target(targets)))
#endif

#define GROVE_SIMD_PRAGMA_(text) _Pragma(#text)
#define GROVE_SIMD_PRAGMA(text) GROVE_SIMD_PRAGMA_(text)
/// Asks the compiler to unroll the next loop completely (its trip count is a constant):
/// register-blocked code needs its arrays of vectors in registers.
#define GROVE_SIMD_UNROLL_ALWAYS GROVE_SIMD_PRAGMA(GCC unroll 64)

// g++ 12's AVX-512 intrinsics start from _mm512_undefined_*() (`__m512 __Y = __Y;`), which
// -Wuninitialized reports once they are inlined into code compiled through a target attribute
// rather than -mavx512f (GCC bug 105593). The SIMD headers and kernel regions silence it.
#if defined(__GNUC__) && !defined(__clang__)
#define GROVE_SIMD_SILENCE_BEGIN                                  \
  _Pragma("GCC diagnostic push")                                  \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")          \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define GROVE_SIMD_SILENCE_END _Pragma("GCC diagnostic pop")
#else
#define GROVE_SIMD_SILENCE_BEGIN
#define GROVE_SIMD_SILENCE_END
#endif

GROVE_BEGIN_NAMESPACE
namespace simd {

/// Architecture tags (as in xsimd): a kernel written for `batch<float, Arch>` is instantiated
/// once per tag. `width` is the number of floats in one register.
struct scalar {
  static constexpr int width = 1;
  static constexpr int registers = 16;
  static constexpr const char* name() { return "scalar"; }
};
struct avx2 {
  static constexpr int width = 8;
  static constexpr int registers = 16;
  static constexpr const char* name() { return "avx2"; }
};
struct avx512 {
  static constexpr int width = 16;
  static constexpr int registers = 32;
  static constexpr const char* name() { return "avx512"; }
};
/// AVX-512 plus AVX512_BF16 (vdpbf16ps: dot products of bf16 pairs accumulated in fp32).
struct avx512_bf16 : avx512 {
  static constexpr const char* name() { return "avx512_bf16"; }
};

/// The same levels as a run-time value, ordered from least to most capable.
enum class isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

/// Number of levels (isa values run from 0 to isa_count - 1).
inline constexpr int isa_count = 4;

[[nodiscard]] inline const char* isa_name(isa level) {
  switch (level) {
    case isa::scalar: return "scalar";
    case isa::avx2: return "avx2";
    case isa::avx512: return "avx512";
    case isa::avx512_bf16: return "avx512_bf16";
  }
  return "unknown";
}

/// What this CPU (and its operating system, which must save the wider registers) supports.
struct cpu_features {
  bool avx2_fma = false;     ///< AVX2 + FMA3, OS saves YMM state
  bool avx512 = false;       ///< AVX-512 F, BW, DQ, VL, OS saves ZMM state
  bool avx512_bf16 = false;  ///< AVX512_BF16 and AVX512_VNNI on top of avx512 (every CPU with the
                             ///< first has the second; the level's block-format kernels use it)
};

}  // namespace simd

namespace detail {

#if GROVE_SIMD_X86
inline std::uint64_t read_xcr0() {
  std::uint32_t eax = 0, edx = 0;
  // xgetbv with ecx = 0; written as asm so that no -mxsave is needed.
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
}

inline simd::cpu_features detect_cpu_features() {
  simd::cpu_features f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(1, 0, a, b, c, d);
  const bool osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u, fma = (c >> 12) & 1u, f16c = (c >> 29) & 1u;
  if (!osxsave || !avx) return f;
  const std::uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6u) == 0x6u;      // SSE + AVX state
  const bool zmm_state = (xcr0 & 0xE6u) == 0xE6u;    // + opmask, ZMM_Hi256, Hi16_ZMM
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1u;
  const bool avx512f = (b >> 16) & 1u, avx512dq = (b >> 17) & 1u, avx512bw = (b >> 30) & 1u,
             avx512vl = (b >> 31) & 1u;
  const bool avx512vnni = (c >> 11) & 1u;
  const unsigned max_subleaf = a;
  bool bf16 = false;
  if (max_subleaf >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    bf16 = (a >> 5) & 1u;
  }
  f.avx2_fma = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2_fma && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  f.avx512_bf16 = f.avx512 && bf16 && avx512vnni;
  return f;
}
#else
inline simd::cpu_features detect_cpu_features() { return {}; }
#endif

}  // namespace detail

namespace simd {

/// The features of the machine this runs on, detected once.
[[nodiscard]] inline const cpu_features& detected_cpu_features() {
  static const cpu_features features = grove::detail::detect_cpu_features();
  return features;
}

/// True when kernels of `level` can run here (and were compiled in: only scalar elsewhere than x86).
[[nodiscard]] inline bool supported(isa level) {
  const cpu_features& f = detected_cpu_features();
  switch (level) {
    case isa::scalar: return true;
    case isa::avx2: return f.avx2_fma;
    case isa::avx512: return f.avx512;
    case isa::avx512_bf16: return f.avx512_bf16;
  }
  return false;
}

/// The most capable level this machine runs.
[[nodiscard]] inline isa best_isa() {
  for (int level = isa_count - 1; level > 0; --level)
    if (supported(static_cast<isa>(level))) return static_cast<isa>(level);
  return isa::scalar;
}

/// Throws grove::error when `level` cannot run on this machine.
inline void require_supported(isa level) {
  grove::detail::require(supported(level), "grove: the instruction set '", isa_name(level),
                         "' was requested but this CPU (or build) does not support it");
}

/// The level named `name` (as isa_name writes it); throws grove::error for another name.
[[nodiscard]] inline isa parse_isa(std::string_view name) {
  for (int level = 0; level < isa_count; ++level)
    if (name == isa_name(static_cast<isa>(level))) return static_cast<isa>(level);
  grove::detail::fail("grove: unknown instruction set '", name, "' (scalar, avx2, avx512 or avx512_bf16)");
}

}  // namespace simd
GROVE_END_NAMESPACE
