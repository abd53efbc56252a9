// grove CUDA backend: the unified Grove expert kernel (docs/cuda.md, "Schedule").
//
// ONE persistent launch runs every routed expert and every activated adjugate of a batch.
// Blocks take tickets from a global counter; tickets first name gate/up tiles of any MLP
// (routed experts first, adjugates after, so the little adjugate tiles fill the tail of the
// big ones), then down tiles. A gate/up tile computes h = silu(G x) ⊙ (U x) for 64 rows ×
// 64 intermediate columns and publishes it; a down tile waits until every gate/up tile of its
// 64 rows is published, computes 64 rows × 64 hidden columns of D h and adds them, times the
// row's weight (w_s, or λ·c_j for an adjugate), to y — with fp32 atomics, or, in the
// deterministic mode, into a per-row buffer that combine_kernel sums per token in the canonical
// order of plan/combine.hpp (or group_partials_kernel writes per (token, group)).
#pragma once

#include <cstdint>

#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/device_weights.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/cuda/tile_gemm.cuh"

GROVE_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

/// What the persistent expert kernels (forward and backward) read and write.
template <class T>
struct expert_args {
  device_weights<T> w;
  const T* x = nullptr;   ///< [T, H]
  const T* dy = nullptr;  ///< [T, H], backward only
  const int* schedule = nullptr;  ///< schedule_arrays base (offsets first): the plan's offsets
  const dispatch_row* rows = nullptr;
  T* act = nullptr;             ///< h per row: routed rows (first offsets[E]) of width I, then adjugate rows of width Ia
  T* act_grad = nullptr;        ///< [dg | du] per row, widths 2I / 2Ia (backward)
  float* dw_partial = nullptr;  ///< [rows, dw_stride]: ⟨Dᵀdy, h⟩ per row and intermediate tile (backward)
  int dw_stride = 0;
  int* ticket = nullptr;
  int* row_tile_ready = nullptr;  ///< per (MLP, row tile): gate/up tiles published
  int* mlp_ready = nullptr;       ///< per MLP: gate/up-gradient tiles published (backward)
  float* out = nullptr;           ///< atomic: [T, H] sums (y or dx); deterministic: [rows, H] per-row terms
  bool deterministic = false;
  device_gradients grads;  ///< backward only

  [[nodiscard]] __device__ schedule_arrays<const int> plan_schedule() const {
    return schedule_arrays<const int>::at(schedule, static_cast<int>(w.shape.mlps()));
  }
  /// Start of MLP m's first row (dispatch position `first`) in a per-row buffer whose rows are
  /// `factor`·N_m wide. The routed rows come first; offsets[E] counts them (T·k for a plan routed
  /// on the device, fewer for a host plan with holes or restricted to some groups).
  template <class U>
  __device__ U* region(U* base, int m, int first, int factor) const {
    const std::int64_t routed = schedule[w.shape.experts];
    const std::int64_t wide = static_cast<std::int64_t>(factor) * w.shape.expert_intermediate;
    if (m < w.shape.experts) return base + first * wide;
    return base + routed * wide + (first - routed) * factor * w.shape.adjugate_intermediate;
  }
};

/// The rows of weight matrix `p` ([rows, cols] row-major), read along K = cols.
template <class T>
__device__ inline operand<T> weight_rows(const T* p, int rows, int cols) {
  operand<T> o;
  o.runs.base = p;
  o.runs.ld = cols;
  o.runs.count = rows;
  o.extent = cols;
  return o;
}

/// The tokens of MLP m's dispatch rows, gathered from a [T, H] activation, read along K = H.
template <class T>
__device__ inline operand<T> token_rows(const T* src, int hidden, const dispatch_row* rows, int count) {
  operand<T> o;
  o.runs.base = src;
  o.runs.ld = hidden;
  o.runs.gather = rows;
  o.runs.count = count;
  o.extent = hidden;
  return o;
}

/// Fetches the next ticket and decodes it (thread 0), shares the item with the block.
template <class Decode>
__device__ inline work_item next_item(int* ticket, work_item* shared_item, Decode decode) {
  __syncthreads();  // everyone is done with the previous item's shared state
  if (threadIdx.x == 0) *shared_item = decode(atomicAdd(ticket, 1));
  __syncthreads();
  return *shared_item;
}

/// Forward gate/up tile: h[rows r0.., columns n0..] = silu(G x) ⊙ (U x) (docs/math.md, step 4).
template <class T>
__device__ void gate_up_item(const expert_args<T>& a, const schedule_arrays<const int>& s, const work_item& it,
                             unsigned char* smem) {
  const int m = it.mlp, hidden = a.w.shape.hidden, n_m = a.w.shape.intermediate(m);
  const int first = s.offsets[m], rows = s.offsets[m + 1] - first;
  const int r0 = it.a * tile_m, n0 = it.b * tile_n;
  const operand<T> x[1] = {token_rows(a.x, hidden, a.rows + first, rows)};
  const operand<T> w[2] = {weight_rows(a.w.gate[m], n_m, hidden), weight_rows(a.w.up[m], n_m, hidden)};
  tile_products<T, 1, 2, 2>(smem, x, r0, w, n0, {0, 0}, {0, 1}, 0, hidden);
  const float* g = result_tile(smem, 0);
  const float* u = result_tile(smem, 1);
  T* h = a.region(a.act, m, first, 1);
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n, r = r0 + i, n = n0 + j;
    if (r < rows && n < n_m)
      h[static_cast<std::int64_t>(r) * n_m + n] = from_float<T>(silu(g[i * tile_ldc + j]) * u[i * tile_ldc + j]);
  }
  __syncthreads();
  if (threadIdx.x == 0) signal_ready(&a.row_tile_ready[s.row_tiles[m] + it.a]);
}

/// Forward down tile: y[token, h0..] += weight · (D h) for rows r0.. (step 6), once the row
/// tile's h is complete.
template <class T>
__device__ void down_item(const expert_args<T>& a, const schedule_arrays<const int>& s, const work_item& it,
                          unsigned char* smem) {
  const int m = it.mlp, hidden = a.w.shape.hidden, n_m = a.w.shape.intermediate(m);
  const int first = s.offsets[m], rows = s.offsets[m + 1] - first;
  const int r0 = it.a * tile_m, h0 = it.b * tile_n;
  wait_ready(&a.row_tile_ready[s.row_tiles[m] + it.a], ceil_div(n_m, tile_n));
  operand<T> h[1] = {weight_rows<T>(a.region(a.act, m, first, 1), rows, n_m)};
  h[0].coherent = true;
  const operand<T> d[1] = {weight_rows(a.w.down[m], hidden, n_m)};
  tile_products<T, 1, 1, 1>(smem, h, r0, d, h0, {0}, {0}, 0, n_m);
  const float* c = result_tile(smem, 0);
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n, r = r0 + i, col = h0 + j;
    if (r >= rows || col >= hidden) continue;
    const dispatch_row row = a.rows[first + r];
    const float v = row.weight * c[i * tile_ldc + j];
    if (a.deterministic)
      a.out[static_cast<std::int64_t>(first + r) * hidden + col] = v;
    else
      atomicAdd(&a.out[static_cast<std::int64_t>(row.token) * hidden + col], v);
  }
}

/// The unified forward: every gate/up and down tile of every routed expert and adjugate.
template <class T>
__global__ void __launch_bounds__(tile_threads) forward_experts_kernel(expert_args<T> a) {
  unsigned char* smem = dynamic_shared<unsigned char>();
  __shared__ work_item item;
  const schedule_arrays<const int> s = a.plan_schedule();
  for (;;) {
    const work_item it = next_item(a.ticket, &item, [&](int q) { return forward_item(q, s, a.w.shape); });
    if (it.kind == item_kind::gate_up)
      gate_up_item(a, s, it, smem);
    else if (it.kind == item_kind::down)
      down_item(a, s, it, smem);
    else
      return;
  }
}

/// The canonical order of a token's terms (plan/combine.hpp; docs/routing.md, "The canonical
/// sum"): the token's picks that have a row in this plan, by ascending expert id, so that groups
/// ascend and each group's experts ascend within it. Writes their slots to `order` and returns
/// how many there are. At most k <= 32 entries: an insertion sort, run by one thread of a block.
__device__ inline int canonical_slots(const device_plan& p, int t, int* order) {
  const std::int64_t tk = static_cast<std::int64_t>(t) * p.top_k;
  int count = 0;
  for (int s = 0; s < p.top_k; ++s) {
    if (p.row_of_pick[tk + s] < 0) continue;  // a hole, or a pick of a group the plan does not hold
    const std::int32_t expert = p.topk_ids[tk + s];
    int at = count++;
    for (; at > 0 && p.topk_ids[tk + order[at - 1]] > expert; --at) order[at] = order[at - 1];
    order[at] = s;
  }
  return count;
}

/// One past the last entry of `order` (of `count`) in the group of order[begin].
__device__ inline int group_end(const device_plan& p, int t, const int* order, int count, int begin) {
  const std::int64_t tk = static_cast<std::int64_t>(t) * p.top_k;
  const int group = p.topk_ids[tk + order[begin]] / p.group_size;
  int end = begin + 1;
  while (end < count && p.topk_ids[tk + order[end]] / p.group_size == group) ++end;
  return end;
}

/// p(t, g), column h: from +0, the per-row terms of the group's picks order[begin, end) in that
/// order, each followed by its own adjugate term in once_per_pick mode, then the group's adjugate
/// term in once_per_token mode. `values` holds one weighted term per dispatch row ([rows, H]).
__device__ inline float group_partial(const device_plan& p, const float* values, int hidden, int h, int t,
                                      const int* order, int begin, int end) {
  const std::int64_t tk = static_cast<std::int64_t>(t) * p.top_k;
  auto term = [&](int row) { return values[static_cast<std::int64_t>(row) * hidden + h]; };
  float sum = 0.0f;
  for (int i = begin; i < end; ++i) {
    const int s = order[i];
    sum += term(p.row_of_pick[tk + s]);
    if (p.adjugates == adjugate_mode::once_per_pick && p.row_of_group[tk + s] >= 0) sum += term(p.row_of_group[tk + s]);
  }
  if (p.adjugates == adjugate_mode::once_per_token) {
    const int slot = p.pick_group_slot[tk + order[begin]];
    const int row = slot >= 0 ? p.row_of_group[tk + slot] : -1;
    if (row >= 0) sum += term(row);
  }
  return sum;
}

/// Deterministic combine, a block per (token, 256 columns): out[t] = (…((init + p(t, g1)) +
/// p(t, g2)) + …) over the token's groups ascending, init = 0 (y) or out[t] itself (dx:
/// `accumulate`), the canonical order of plan/combine.hpp.
template <class Out>
__global__ void combine_kernel(device_plan p, const float* values, int hidden, Out* out, bool accumulate) {
  __shared__ int order[max_top_k];
  __shared__ int count;
  const int t = static_cast<int>(blockIdx.x);
  if (threadIdx.x == 0) count = canonical_slots(p, t, order);
  __syncthreads();
  const int h = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  if (h >= hidden) return;
  const std::int64_t at = static_cast<std::int64_t>(t) * hidden + h;
  float sum = accumulate ? to_float(out[at]) : 0.0f;
  for (int begin = 0; begin < count;) {
    const int end = group_end(p, t, order, count, begin);
    sum = sum + group_partial(p, values, hidden, h, t, order, begin, end);
    begin = end;
  }
  out[at] = from_float<Out>(sum);
}

/// The group partials (runner::forward_partials), a block per (group row, 256 columns): row r of
/// `out` is p(t, g) of group row r, (t, group slot) = (group_rows[r].token, .slot), summed as
/// combine_kernel sums it, so that combine_partials of these rows gives combine_kernel's y.
template <class = void>
__global__ void group_partials_kernel(device_plan p, const float* values, const dispatch_row* group_rows, int hidden,
                                      float* out) {
  __shared__ int order[max_top_k];
  __shared__ int range[2];
  const int r = static_cast<int>(blockIdx.x);
  const int t = group_rows[r].token;
  if (threadIdx.x == 0) {
    const int count = canonical_slots(p, t, order);
    const int group = p.token_groups[static_cast<std::int64_t>(t) * p.max_groups + group_rows[r].slot];
    const std::int64_t tk = static_cast<std::int64_t>(t) * p.top_k;
    int begin = 0;
    while (begin < count && p.topk_ids[tk + order[begin]] / p.group_size != group) ++begin;
    range[0] = begin;
    range[1] = begin < count ? group_end(p, t, order, count, begin) : begin;
  }
  __syncthreads();
  const int h = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  if (h >= hidden) return;
  out[static_cast<std::int64_t>(r) * hidden + h] =
      range[0] < range[1] ? group_partial(p, values, hidden, h, t, order, range[0], range[1]) : 0.0f;
}

template <class T>
__global__ void convert_kernel(const float* in, T* out, std::int64_t count) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(in[i]);
}

}  // namespace detail
}  // namespace cuda
GROVE_END_NAMESPACE
