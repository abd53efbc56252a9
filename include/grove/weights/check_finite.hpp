#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/formats/format_traits.hpp"
#include "grove/weights/layer_weights.hpp"

GROVE_BEGIN_NAMESPACE

/// Throws grove::error naming the first tensor that holds a NaN or an infinity, and where.
/// Loading a checkpoint calls it; a layer built from caller buffers can call it once.
template <class T>
void check_finite(const layer_weights<T>& weights) {
  using storage = std::remove_const_t<T>;
  const auto fail = [](const tensor_info& info, index i, double value) {
    throw error("grove: tensor '" + info.name + "' holds a non-finite value (" + std::to_string(value) + ") at row " +
                std::to_string(i / info.cols) + ", column " + std::to_string(i % info.cols));
  };
  std::vector<float> row;
  weights.for_each_tensor([&](const tensor_info& info, T* const& p) {
    if (p == nullptr) return;
    if constexpr (is_block_format<storage>) {
      // A block's values are its scale times small integers: finite exactly when the scale is.
      row.resize(static_cast<std::size_t>(info.cols));
      const index units = units_per_row<storage>(info.cols);
      for (index r = 0; r < info.rows; ++r) {
        decode_row(p + r * units, info.cols, row.data());
        for (index c = 0; c < info.cols; ++c)
          if (!std::isfinite(row[static_cast<std::size_t>(c)])) fail(info, r * info.cols + c, row[static_cast<std::size_t>(c)]);
      }
    } else {
      for (index i = 0; i < info.size(); ++i) {
        const double value = format_traits<storage>::to_float(p[i]);
        if (!std::isfinite(value)) fail(info, i, value);
      }
    }
  });
}

GROVE_END_NAMESPACE
