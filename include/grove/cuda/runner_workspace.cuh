// grove CUDA backend: the device memory a cuda_runner's passes use besides the plan and the
// weights (docs/cuda.md, "The runner").
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <type_traits>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/device_weights.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/cuda/tile_gemm.cuh"

GROVE_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

/// Width of the per-row dw partials: one per intermediate tile of the widest MLP.
inline int dw_stride_of(const layer_dims& d) {
  return ceil_div(static_cast<int>(std::max(d.expert_intermediate, d.adjugate_intermediate)), tile_n);
}

/// A runner's scratch in device memory (and the host staging of host requests), sized for
/// batches of up to max_tokens tokens of the largest layer (dims, k) it has run: every buffer is
/// reserved from those bounds, never from a batch's actual size, so once a runner has run a
/// layer's passes it allocates nothing more for that layer (`allocations` stops growing).
struct runner_workspace {
  // ---- the expert passes ----
  device_buffer<int> counters;               ///< ticket, row-tile and MLP readiness counters
  device_buffer<float> act_f32, act_grad_f32;  ///< h, [dg | du] per row (fp32 passes)
  device_buffer<bfloat16> act_bf16, act_grad_bf16;  ///< the same for BF16 passes
  device_buffer<float> row_values;           ///< [rows, H] one weighted term per row (deterministic combine, partials)
  device_buffer<float> y_accum;              ///< [T, H] fp32 sums of a BF16 y (atomic combine)
  device_buffer<float> dw_partial;           ///< [rows, dw_stride] backward
  // ---- host requests: the plan, inputs and outputs on their way to and from the host ----
  plan_storage plan;
  host_plan host;
  device_buffer<dispatch_row> group_rows;  ///< the plan's group rows (partials)
  device_buffer<float> x, out, dy, dx, dw;
  device_buffer<bfloat16> x_bf16;
  std::unique_ptr<device_parameters<float>> grads;  ///< the experts' gradients of one backward
  std::vector<float> grads_host;                   ///< one MLP's gradients on their way to the host

  std::size_t allocations = 0;  ///< times a buffer had to grow

  template <class U>
  void reserve(device_buffer<U>& buffer, std::size_t count) {
    allocations += buffer.reserve(count) ? 1 : 0;
  }

  template <class T>
  device_buffer<T>& act() {
    if constexpr (std::is_same_v<T, float>)
      return act_f32;
    else
      return act_bf16;
  }
  template <class T>
  device_buffer<T>& act_grad() {
    if constexpr (std::is_same_v<T, float>)
      return act_grad_f32;
    else
      return act_grad_bf16;
  }

  /// What an expert pass with T-typed weights on a layer of `d` with top-k `k` needs: h (and for
  /// `training` [dg | du] and the dw partials), the per-row terms when `per_row`, an fp32
  /// accumulator of y when `accumulate_y`.
  template <class T>
  void reserve_pass(const layer_dims& d, int k, int max_tokens, bool per_row, bool accumulate_y, bool training) {
    const capacity cap = capacity::of(max_tokens, k, static_cast<int>(d.mlps()));
    const auto rows = static_cast<std::size_t>(cap.rows);
    const auto hidden = static_cast<std::size_t>(d.hidden);
    reserve(counters, 1 + static_cast<std::size_t>(cap.row_tiles) + static_cast<std::size_t>(d.mlps()));
    // T·k routed rows of width I, then at most T·k adjugate rows of width Ia.
    const std::size_t h = static_cast<std::size_t>(max_tokens) * static_cast<std::size_t>(k) *
                          static_cast<std::size_t>(d.expert_intermediate + d.adjugate_intermediate);
    reserve(act<T>(), h);
    if (per_row) reserve(row_values, rows * hidden);
    if (accumulate_y) reserve(y_accum, static_cast<std::size_t>(max_tokens) * hidden);
    if (training) {
      reserve(act_grad<T>(), 2 * h);
      reserve(dw_partial, rows * static_cast<std::size_t>(dw_stride_of(d)));
    }
  }

  /// What a host request's plan needs: the plan storage and its host staging.
  void reserve_host_plan(const layer_dims& d, int k, int max_tokens) {
    allocations += plan.reserve(d, k, max_tokens, false);
  }

  /// The experts' gradient buffer of a layer of `d` (replaced when the dims change).
  device_parameters<float>& gradients(const layer_dims& d) {
    if (!grads || !(grads->dims() == d)) {
      grads = std::make_unique<device_parameters<float>>(d);
      ++allocations;
    }
    const std::size_t widest = static_cast<std::size_t>(std::max(d.expert_intermediate, d.adjugate_intermediate));
    if (grads_host.size() < 3 * widest * static_cast<std::size_t>(d.hidden)) {
      grads_host.resize(3 * widest * static_cast<std::size_t>(d.hidden));
      ++allocations;
    }
    return *grads;
  }

  [[nodiscard]] std::size_t bytes() const {
    std::size_t total = counters.size() * sizeof(int) +
                        sizeof(float) * (act_f32.size() + act_grad_f32.size() + row_values.size() + y_accum.size() +
                                         dw_partial.size() + x.size() + out.size() + dy.size() + dx.size() + dw.size()) +
                        sizeof(bfloat16) * (act_bf16.size() + act_grad_bf16.size() + x_bf16.size()) +
                        sizeof(dispatch_row) * group_rows.size() + plan.bytes();
    if (grads) total += grads->value_count() * sizeof(float) + static_cast<std::size_t>(grads->dims().experts) * 4;
    return total;
  }
};

}  // namespace detail
}  // namespace cuda
GROVE_END_NAMESPACE
