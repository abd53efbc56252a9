#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/formats/format_traits.hpp"
#include "grove/weights/layer_weights.hpp"

GROVE_BEGIN_NAMESPACE

/// Throws grove::error naming the first tensor that holds a NaN or an infinity, and where.
/// Loading a checkpoint calls it; a layer built from caller buffers can call it once.
template <class T>
void check_finite(const layer_weights<T>& weights) {
  weights.for_each_tensor([](const tensor_info& info, T* const& p) {
    if (p == nullptr) return;
    for (index i = 0; i < info.size(); ++i) {
      const double value = format_traits<std::remove_const_t<T>>::to_float(p[i]);
      if (!std::isfinite(value))
        throw error("grove: tensor '" + info.name + "' holds a non-finite value (" + std::to_string(value) +
                    ") at row " + std::to_string(i / info.cols) + ", column " + std::to_string(i % info.cols));
    }
  });
}

GROVE_END_NAMESPACE
