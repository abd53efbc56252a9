#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// A small, fully specified normal generator (splitmix64 + Box–Muller). std::normal_distribution
/// is implementation-defined, so a seed would give other weights under another standard
/// library; this one gives the same numbers everywhere, which tests and demos rely on.
class normal_generator {
 public:
  explicit normal_generator(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next_u64() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in (0, 1], 53 bits.
  double uniform() { return (static_cast<double>(next_u64() >> 11) + 1.0) * 0x1.0p-53; }

  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double r = std::sqrt(-2.0 * std::log(uniform()));
    const double phi = 2.0 * std::numbers::pi * uniform();
    spare_ = r * std::sin(phi);
    has_spare_ = true;
    return r * std::cos(phi);
  }

 private:
  std::uint64_t state_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace detail
GROVE_END_NAMESPACE
