// grove CUDA backend: the routing plan (plan/routing_plan.hpp) as it lives in device memory, the
// storage it lives in, and its host copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/cuda/common.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/plan/dispatch.hpp"

GROVE_BEGIN_NAMESPACE
namespace cuda {

/// One row of expert work: the row of every backend (plan/dispatch.hpp), with an fp32 weight.
using dispatch_row = grove::dispatch_row<float>;
/// How adjugates enter the plan (plan/dispatch.hpp).
using grove::adjugate_mode;

/// The routing decision for one batch in device memory: the content of grove::routing_plan<float>
/// (docs/routing.md), laid out for the kernels. Its pointers point into a plan_storage: a
/// cuda::device_router's (a plan routed on the device, valid until that router's next route())
/// or a cuda_runner's (a host plan it uploaded for one call).
///
/// Differences from the host plan, all in layout rather than content:
///   - expert and adjugate rows share one array and one offset table over the E + G MLPs of
///     grove::mlp_numbering: rows of routed expert e are [offsets[e], offsets[e+1]), rows of
///     adjugate j are [offsets[E+j], offsets[E+j+1]). offsets[E] == T·k for a plan routed on the
///     device; a host plan with holes (plan_from_rows) or restricted to some groups has fewer
///     expert rows;
///   - the adjugate rows are those of the plan's mode: each (token, picked group) once with
///     weight λ·c_j (once_per_token, the host plan's adjugate rows), each pick's group with
///     weight λ·w_s (once_per_pick), or none;
///   - row_of_pick / row_of_group give, per token, the position of each of its rows (the inverse
///     of the dispatch), which the combine and backward use;
///   - within each MLP the rows are in ascending token order (then slot order), exactly as on
///     the CPU.
struct device_plan {
  int tokens = 0;
  int experts = 0;
  int groups = 0;
  int group_size = 0;
  int top_k = 0;
  int max_groups = 0;  ///< min(k, G)
  float scale = 0;     ///< λ
  adjugate_mode adjugates = adjugate_mode::once_per_token;

  const float* logits = nullptr;               ///< [T, E] router logits, fp32 (nullptr in a plan uploaded from the host)
  const std::int32_t* topk_ids = nullptr;      ///< [T, k] descending selection score, ties lower index first; -1: a hole
  const float* topk_weights = nullptr;         ///< [T, k] softmax of the picked logits
  const std::int32_t* token_groups = nullptr;  ///< [T, max_groups] distinct groups in order of first pick, -1 padded
  const float* group_weights = nullptr;        ///< [T, max_groups] c_j, 0 padded
  const std::int32_t* groups_per_token = nullptr;  ///< [T] n_g
  /// [T, k] which row_of_group entry holds pick s's adjugate row: its group slot (once_per_token),
  /// s (once_per_pick), -1 (none, or a hole)
  const std::int32_t* pick_group_slot = nullptr;
  /// [E + G + 1] rows per MLP, prefix: the first of the schedule's five prefix arrays
  /// (schedule_arrays), which follow it in the same allocation
  const std::int32_t* offsets = nullptr;
  const dispatch_row* rows = nullptr;          ///< [offsets[E+G]]
  const std::int32_t* row_of_pick = nullptr;   ///< [T, k] position of (t, s) in rows; -1: no row in this plan
  const std::int32_t* row_of_group = nullptr;  ///< [T, k] position of the token's adjugate rows in rows, -1 padded
  const int* error_flag = nullptr;             ///< non-zero once a router logit was NaN (the runner's flag)
};

/// A host copy of a device plan (std::vectors, row-major): what download() reads back for tests
/// and inspection, and what to_device_layout() (plan_layout.cuh) writes for a cuda_runner to
/// upload. Fields as in device_plan; `schedule` holds all five prefix arrays, `offsets` its first.
struct host_plan {
  int tokens = 0, experts = 0, groups = 0, group_size = 0, top_k = 0, max_groups = 0;
  float scale = 0;
  adjugate_mode adjugates = adjugate_mode::once_per_token;
  std::vector<float> logits, topk_weights, group_weights;
  std::vector<std::int32_t> topk_ids, token_groups, groups_per_token, pick_group_slot, offsets, schedule, row_of_pick,
      row_of_group;
  std::vector<dispatch_row> rows;

  /// Storage to_device_layout reuses from call to call (so that a warm runner allocates
  /// nothing). Not part of the plan's value.
  struct layout_scratch {
    std::vector<int> rows_per_mlp;
    std::vector<index> offsets, cursor;
    std::vector<dispatch_row> pick_rows;
  } scratch;
};

/// Device memory for the plans of batches of up to `max_tokens` tokens of a layer of `dims`
/// routed with top-k `top_k`: what a device_plan points into. Sized once (reserve) and reused.
class plan_storage {
 public:
  /// Makes room for such plans, keeping the buffers that are large enough already; `logits`:
  /// also [T, E] logits (a router writes them; an uploaded host plan has none). Returns the
  /// number of allocations it made.
  std::size_t reserve(const layer_dims& dims, int top_k, int max_tokens, bool logits) {
    const detail::capacity cap = detail::capacity::of(max_tokens, top_k, static_cast<int>(dims.mlps()));
    const auto tokens = static_cast<std::size_t>(max_tokens);
    const auto k = static_cast<std::size_t>(top_k);
    const auto max_groups = static_cast<std::size_t>(std::min<index>(top_k, dims.groups));
    std::size_t made = 0;
    auto grow = [&](auto& buffer, std::size_t count) { made += buffer.reserve(count) ? 1 : 0; };
    if (logits) grow(logits_, tokens * static_cast<std::size_t>(dims.experts));
    for (auto* per_pick : {&topk_ids_, &pick_group_slot_, &row_of_pick_, &row_of_group_}) grow(*per_pick, tokens * k);
    grow(topk_weights_, tokens * k);
    grow(token_groups_, tokens * max_groups);
    grow(group_weights_, tokens * max_groups);
    grow(groups_per_token_, tokens);
    grow(schedule_, detail::schedule_arrays<int>::arrays * static_cast<std::size_t>(dims.mlps() + 1));
    grow(rows_, static_cast<std::size_t>(cap.rows));
    return made;
  }

  /// A plan of `tokens` tokens over this storage (pointers set, contents as last written).
  [[nodiscard]] device_plan view(const layer_dims& dims, int top_k, float scale, adjugate_mode adjugates, int tokens,
                                 const int* error_flag) const {
    device_plan p;
    p.tokens = tokens;
    p.experts = static_cast<int>(dims.experts);
    p.groups = static_cast<int>(dims.groups);
    p.group_size = static_cast<int>(dims.group_size());
    p.top_k = top_k;
    p.max_groups = static_cast<int>(std::min<index>(top_k, dims.groups));
    p.scale = scale;
    p.adjugates = adjugates;
    p.logits = logits_.empty() ? nullptr : logits_.data();
    p.topk_ids = topk_ids_.data();
    p.topk_weights = topk_weights_.data();
    p.token_groups = token_groups_.data();
    p.group_weights = group_weights_.data();
    p.groups_per_token = groups_per_token_.data();
    p.pick_group_slot = pick_group_slot_.data();
    p.offsets = schedule_.data();
    p.rows = rows_.data();
    p.row_of_pick = row_of_pick_.data();
    p.row_of_group = row_of_group_.data();
    p.error_flag = error_flag;
    return p;
  }

  /// Copies a host plan in the device layout (to_device_layout's) into this storage, ordered on
  /// `stream` (the logits are not copied: the experts do not read them).
  void upload(const host_plan& h, cudaStream_t stream) {
    topk_ids_.upload_async(h.topk_ids, stream);
    topk_weights_.upload_async(h.topk_weights, stream);
    token_groups_.upload_async(h.token_groups, stream);
    group_weights_.upload_async(h.group_weights, stream);
    groups_per_token_.upload_async(h.groups_per_token, stream);
    pick_group_slot_.upload_async(h.pick_group_slot, stream);
    schedule_.upload_async(h.schedule, stream);
    rows_.upload_async(h.rows, stream);
    row_of_pick_.upload_async(h.row_of_pick, stream);
    row_of_group_.upload_async(h.row_of_group, stream);
  }

  /// What a router's kernels write through (the plan view is read-only).
  [[nodiscard]] float* logits() const { return logits_.data(); }
  [[nodiscard]] std::int32_t* topk_ids() const { return topk_ids_.data(); }
  [[nodiscard]] float* topk_weights() const { return topk_weights_.data(); }
  [[nodiscard]] std::int32_t* token_groups() const { return token_groups_.data(); }
  [[nodiscard]] float* group_weights() const { return group_weights_.data(); }
  [[nodiscard]] std::int32_t* groups_per_token() const { return groups_per_token_.data(); }
  [[nodiscard]] std::int32_t* pick_group_slot() const { return pick_group_slot_.data(); }
  [[nodiscard]] int* schedule() const { return schedule_.data(); }
  [[nodiscard]] dispatch_row* rows() const { return rows_.data(); }
  [[nodiscard]] std::int32_t* row_of_pick() const { return row_of_pick_.data(); }
  [[nodiscard]] std::int32_t* row_of_group() const { return row_of_group_.data(); }
  /// Zeroes the schedule (an empty plan: every MLP has no rows), ordered on `stream`.
  void clear_schedule(cudaStream_t stream) { schedule_.zero(stream); }

  [[nodiscard]] std::size_t bytes() const {
    return sizeof(float) * (logits_.size() + topk_weights_.size() + group_weights_.size()) +
           sizeof(std::int32_t) * (topk_ids_.size() + token_groups_.size() + groups_per_token_.size() +
                                   pick_group_slot_.size() + schedule_.size() + row_of_pick_.size() +
                                   row_of_group_.size()) +
           sizeof(dispatch_row) * rows_.size();
  }

 private:
  device_buffer<float> logits_, topk_weights_, group_weights_;
  device_buffer<std::int32_t> topk_ids_, token_groups_, groups_per_token_, pick_group_slot_, schedule_, row_of_pick_,
      row_of_group_;
  device_buffer<dispatch_row> rows_;
};

namespace detail {
template <class T>
std::vector<T> copy_to_host(const T* device, std::size_t count) {
  std::vector<T> host(count);
  if (count && device != nullptr)
    check(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy of the plan");
  else
    host.clear();
  return host;
}
}  // namespace detail

/// Copies a plan to the host. Synchronises with the device (call it outside timed regions).
inline host_plan download(const device_plan& p) {
  using detail::copy_to_host;
  detail::check(cudaDeviceSynchronize(), "waiting for the plan's kernels");
  host_plan h;
  h.tokens = p.tokens;
  h.experts = p.experts;
  h.groups = p.groups;
  h.group_size = p.group_size;
  h.top_k = p.top_k;
  h.max_groups = p.max_groups;
  h.scale = p.scale;
  h.adjugates = p.adjugates;
  const auto mlps = static_cast<std::size_t>(p.experts + p.groups);
  const auto t = static_cast<std::size_t>(p.tokens);
  const auto k = static_cast<std::size_t>(p.top_k);
  const auto g = static_cast<std::size_t>(p.max_groups);
  h.schedule = copy_to_host(p.offsets, detail::schedule_arrays<int>::arrays * (mlps + 1));
  if (t == 0) h.schedule.assign(h.schedule.size(), 0);  // an empty plan: whatever the storage held is not its
  h.offsets.assign(h.schedule.begin(), h.schedule.begin() + static_cast<std::ptrdiff_t>(mlps + 1));
  if (t == 0) return h;
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
