#pragma once

#include <cstddef>
#include <cstdint>

#include "grove/version.hpp"

/// Marks the few core functions CUDA kernels call too (the layer's sizes, the MLP numbering), so
/// that the CUDA backend reads the same definitions rather than twins of them.
#if defined(__CUDACC__)
#define GROVE_HOST_DEVICE __host__ __device__
#else
#define GROVE_HOST_DEVICE
#endif

GROVE_BEGIN_NAMESPACE

/// Index type for sizes and positions, the same as Eigen::Index.
using index = std::ptrdiff_t;

/// Marks a size that is known only at run time (from a checkpoint, say), as Eigen::Dynamic does.
inline constexpr int dynamic = -1;

/// The adjugate scale λ as a compile-time ratio Num/Den. clang 14 has no floating-point
/// template parameters, so a fixed λ is written `ratio<1, 20>` (0.05) rather than `0.05`.
template <std::intmax_t Num, std::intmax_t Den = 1>
struct ratio {
  static_assert(Den > 0, "GROVE_SCALE_RATIO_DENOMINATOR_MUST_BE_POSITIVE");
  static constexpr std::intmax_t num = Num;
  static constexpr std::intmax_t den = Den;
  static constexpr double value = static_cast<double>(Num) / static_cast<double>(Den);
};

/// λ chosen at run time (read from config.json, or given on the command line).
struct dynamic_scale {};

/// Scale-bound policies: the paper asks for λ <= G / E; `check_scale_bound` enforces that
/// (at compile time where λ, E and G are fixed), `unchecked_scale_bound` is the explicit opt-out.
struct check_scale_bound {
  static constexpr bool enforced = true;
};
struct unchecked_scale_bound {
  static constexpr bool enforced = false;
};

GROVE_END_NAMESPACE
