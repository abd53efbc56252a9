#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

#include "grove/error.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// Longest path an error message quotes whole: above any real path (PATH_MAX is 4096 on Linux),
/// far below a shard name an index may spell.
inline constexpr std::size_t max_quoted_path_bytes = 4096;

/// "'dir/file.safetensors'", cut like excerpt() when absurdly long.
inline std::string quoted(const std::filesystem::path& p) {
  return "'" + excerpt(p.string(), max_quoted_path_bytes) + "'";
}

/// "'model.layers.0.mlp.gate.weight'": a tensor name or a JSON key as a message quotes it, cut
/// to max_quoted_bytes (a file chooses its names).
inline std::string quoted_name(std::string_view name) { return "'" + excerpt(name) + "'"; }

/// "[3, 4]"; a shape of thousands of dimensions is cut to max_quoted_bytes.
inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    if (s.size() > max_quoted_bytes) return s + "\u2026 (" + std::to_string(shape.size()) + " dimensions)]";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace detail
GROVE_END_NAMESPACE
