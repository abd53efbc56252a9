#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/formats/format_traits.hpp"
#include "grove/weights/layer_weights.hpp"

GROVE_BEGIN_NAMESPACE

namespace detail {
/// The error of value i (row-major) of tensor `info`, which is not finite.
[[noreturn]] inline void non_finite_value(const tensor_info& info, index i, double value) {
  throw error("grove: tensor '" + info.name + "' holds a non-finite value (" + std::to_string(value) + ") at row " +
              std::to_string(i / info.cols) + ", column " + std::to_string(i % info.cols));
}
/// Throws non_finite_value for the first of n fp32 values of tensor `info` that is not finite;
/// values[i] is the tensor's value first + i.
inline void require_finite(const tensor_info& info, const float* values, index n, index first = 0) {
  for (index i = 0; i < n; ++i)
    if (!std::isfinite(values[i])) non_finite_value(info, first + i, values[i]);
}
}  // namespace detail

/// Throws grove::error naming the first tensor that holds a NaN or an infinity, and where.
/// Loading a checkpoint calls it; a layer built from caller buffers can call it once.
template <class T>
void check_finite(const layer_weights<T>& weights) {
  using storage = std::remove_const_t<T>;
  std::vector<float> row;
  std::vector<storage> rows_of_blocks;  // a block format's tensor, from its panels (formats/quantized.hpp)
  weights.for_each_tensor([&](const tensor_info& info, T* const& p) {
    if (p == nullptr) return;
    if constexpr (is_block_format<storage>) {
      // Each row decoded, so that the error names the value (a block is not finite exactly
      // when its scale is not).
      row.resize(static_cast<std::size_t>(info.cols));
      const index units = units_per_row<storage>(info.cols);
      rows_of_blocks.resize(static_cast<std::size_t>(info.rows * units));
      panels_to_rows(p, info.rows, units, rows_of_blocks.data());
      for (index r = 0; r < info.rows; ++r) {
        decode_row(rows_of_blocks.data() + r * units, info.cols, row.data());
        detail::require_finite(info, row.data(), info.cols, r * info.cols);
      }
    } else {
      for (index i = 0; i < info.size(); ++i) {
        const double value = format_traits<storage>::to_float(p[i]);
        if (!std::isfinite(value)) detail::non_finite_value(info, i, value);
      }
    }
  });
}

GROVE_END_NAMESPACE
