// grove CUDA backend: the routing plan (plan/routing_plan.hpp) as it lives in device memory.
#pragma once

#include <cstdint>
#include <vector>

#include "grove/cuda/common.cuh"
#include "grove/plan/dispatch.hpp"

GROVE_BEGIN_NAMESPACE
namespace cuda {

/// One row of expert work: the row of every backend (plan/dispatch.hpp), with an fp32 weight.
using dispatch_row = grove::dispatch_row<float>;
/// How adjugates enter the plan (plan/dispatch.hpp).
using grove::adjugate_mode;

/// The routing decision for one batch in device memory: the same content as
/// grove::routing_plan<float> (docs/routing.md), laid out for the kernels. All pointers are device
/// pointers into a grove::cuda::layer's workspace, valid until its next route().
///
/// Differences from the host plan, all in layout rather than content:
///   - expert and adjugate rows share one array and one offset table over the E + G MLPs of
///     grove::mlp_numbering: rows of routed expert e are [offsets[e], offsets[e+1]), rows of
///     adjugate j are [offsets[E+j], offsets[E+j+1]); offsets[E] == T·k always;
///   - row_of_pick / row_of_group give, per token, the position of each of its rows (the inverse
///     of the dispatch), which the deterministic combine and backward use;
///   - within each MLP the rows are in ascending token order, exactly as on the CPU.
struct device_plan {
  int tokens = 0;
  int experts = 0;
  int groups = 0;
  int group_size = 0;
  int top_k = 0;
  int max_groups = 0;  ///< min(k, G)
  float scale = 0;     ///< λ
  adjugate_mode adjugates = adjugate_mode::once_per_token;

  const float* logits = nullptr;               ///< [T, E] router logits, fp32
  const std::int32_t* topk_ids = nullptr;      ///< [T, k] descending selection score, ties lower index first
  const float* topk_weights = nullptr;         ///< [T, k] softmax of the picked logits
  const std::int32_t* token_groups = nullptr;  ///< [T, max_groups] distinct groups in order of first pick, -1 padded
  const float* group_weights = nullptr;        ///< [T, max_groups] c_j, 0 padded
  const std::int32_t* groups_per_token = nullptr;  ///< [T] n_g
  const std::int32_t* pick_group_slot =
      nullptr;                            ///< [T, k] which row_of_group entry holds pick s's adjugate row (-1: none)
  const std::int32_t* offsets = nullptr;  ///< [E + G + 1]
  const dispatch_row* rows = nullptr;     ///< [offsets[E+G]]
  const std::int32_t* row_of_pick = nullptr;   ///< [T, k] position of (t, s) in rows
  const std::int32_t* row_of_group = nullptr;  ///< [T, k] position of the token's adjugate rows in rows, -1 padded
  const int* error_flag = nullptr;             ///< non-zero when a router logit was NaN
};

/// A host copy of a device_plan (std::vectors, row-major), for tests and inspection.
struct host_plan {
  int tokens = 0, experts = 0, groups = 0, group_size = 0, top_k = 0, max_groups = 0;
  float scale = 0;
  std::vector<float> logits, topk_weights, group_weights;
  std::vector<std::int32_t> topk_ids, token_groups, groups_per_token, pick_group_slot, offsets, row_of_pick,
      row_of_group;
  std::vector<dispatch_row> rows;
};

namespace detail {
template <class T>
std::vector<T> copy_to_host(const T* device, std::size_t count) {
  std::vector<T> host(count);
  if (count)
    check(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy of the plan");
  return host;
}
}  // namespace detail

/// Copies a plan to the host. Synchronises with the device (call it outside timed regions).
inline host_plan download(const device_plan& p) {
  using detail::copy_to_host;
  detail::check(cudaDeviceSynchronize(), "waiting for the routing kernels");
  host_plan h;
  h.tokens = p.tokens;
  h.experts = p.experts;
  h.groups = p.groups;
  h.group_size = p.group_size;
  h.top_k = p.top_k;
  h.max_groups = p.max_groups;
  h.scale = p.scale;
  const auto t = static_cast<std::size_t>(p.tokens);
  const auto k = static_cast<std::size_t>(p.top_k);
  const auto g = static_cast<std::size_t>(p.max_groups);
  h.offsets = copy_to_host(p.offsets, static_cast<std::size_t>(p.experts + p.groups + 1));
  if (t == 0) {
    h.offsets.assign(h.offsets.size(), 0);
    return h;
  }
  h.logits = copy_to_host(p.logits, t * static_cast<std::size_t>(p.experts));
  h.topk_ids = copy_to_host(p.topk_ids, t * k);
  h.topk_weights = copy_to_host(p.topk_weights, t * k);
  h.token_groups = copy_to_host(p.token_groups, t * g);
  h.group_weights = copy_to_host(p.group_weights, t * g);
  h.groups_per_token = copy_to_host(p.groups_per_token, t);
  h.pick_group_slot = copy_to_host(p.pick_group_slot, t * k);
  h.row_of_pick = copy_to_host(p.row_of_pick, t * k);
  h.row_of_group = copy_to_host(p.row_of_group, t * k);
  h.rows = copy_to_host(p.rows, static_cast<std::size_t>(h.offsets.back()));
  return h;
}

}  // namespace cuda
GROVE_END_NAMESPACE
