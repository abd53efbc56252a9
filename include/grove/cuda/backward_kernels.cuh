// grove CUDA backend: backward on the device with the forward's plan (docs/math.md, "Backward";
// docs/cuda.md, "Backward").
//
// One persistent launch, four kinds of tile, routed experts and adjugates alike:
//   gate_up_grad    recompute g = G x, u = U x and dhᵤ = Dᵀ dy (unit weight) in one tile with
//                   three products; write h, dg = w·dhᵤ ⊙ u ⊙ silu'(g), du = w·dhᵤ ⊙ silu(g),
//                   and ⟨dhᵤ, h⟩ = ⟨dy, E(x)⟩ per row and tile (deterministic partials of dw)
//   input_grad      dx[token] += [dg | du] · [G; U] (waits for its row tile)
//   weight_gate_up  ∂G += dgᵀ x, ∂U += duᵀ x over all rows of the MLP (waits for the MLP)
//   weight_down     ∂D += (w·dy)ᵀ h over all rows of the MLP (waits for the MLP)
// Then dw_s per pick (pick_grad_kernel): the experts' part, what a runner's backward returns.
// The router's part (cuda::device_router::backward) is the logit gradient (logit_grad_kernel)
// and the router's two small GEMMs dx += dl W_r, ∂W_r += dlᵀ x.
// Weight-gradient tiles own their output elements, so they add without atomics and are
// deterministic; dx uses fp32 atomics or, deterministically, a per-row buffer.
#pragma once

#include <cstdint>

#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/expert_kernels.cuh"
#include "grove/cuda/schedule.cuh"
#include "grove/cuda/tile_gemm.cuh"

GROVE_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

template <class T>
__device__ void gate_up_grad_item(const expert_args<T>& a, const schedule_arrays<const int>& s, const work_item& it,
                                  unsigned char* smem) {
  const int m = it.mlp, hidden = a.w.shape.hidden, n_m = a.w.shape.intermediate(m);
  const int first = s.offsets[m], rows = s.offsets[m + 1] - first;
  const int r0 = it.a * tile_m, n0 = it.b * tile_n;
  const operand<T> in[2] = {token_rows(a.x, hidden, a.rows + first, rows),
                            token_rows(a.dy, hidden, a.rows + first, rows)};
  operand<T> w[3] = {weight_rows(a.w.gate[m], n_m, hidden), weight_rows(a.w.up[m], n_m, hidden), {}};
  // Dᵀ: D is [H, N_m]; its logical rows are n (extent N_m) and runs are its rows h (= k).
  w[2].runs.base = a.w.down[m];
  w[2].runs.ld = n_m;
  w[2].runs.count = hidden;
  w[2].extent = n_m;
  w[2].k_contiguous = false;
  tile_products<T, 2, 3, 3>(smem, in, r0, w, n0, {0, 0, 1}, {0, 1, 2}, 0, hidden);
  const float* g = result_tile(smem, 0);
  const float* u = result_tile(smem, 1);
  float* dh = result_tile(smem, 2);  // becomes dhᵤ · h for the row sums
  T* h = a.region(a.act, m, first, 1);
  T* grad = a.region(a.act_grad, m, first, 2);
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n, r = r0 + i, n = n0 + j;
    const int c = i * tile_ldc + j;
    if (r < rows && n < n_m) {
      const float gv = g[c], uv = u[c], dhu = dh[c];
      const float act = silu(gv), hv = act * uv;
      const float scaled = a.rows[first + r].weight * dhu;
      h[static_cast<std::int64_t>(r) * n_m + n] = from_float<T>(hv);
      T* grad_row = grad + static_cast<std::int64_t>(r) * 2 * n_m;
      grad_row[n] = from_float<T>(scaled * uv * silu_derivative(gv));
      grad_row[n_m + n] = from_float<T>(scaled * act);
      dh[c] = dhu * hv;
    } else {
      dh[c] = 0.0f;
    }
  }
  __syncthreads();
  // Row sums of dhᵤ·h: two threads per row, 32 columns each, in column order.
  {
    const int i = static_cast<int>(threadIdx.x) / 2, half = static_cast<int>(threadIdx.x) % 2;
    float sum = 0.0f;
    for (int j = half * (tile_n / 2); j < (half + 1) * (tile_n / 2); ++j) sum += dh[i * tile_ldc + j];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (half == 0 && r0 + i < rows) a.dw_partial[static_cast<std::int64_t>(first + r0 + i) * a.dw_stride + it.b] = sum;
  }
  static_assert(tile_threads == 2 * tile_m, "GROVE_CUDA_ROW_SUMS_USE_TWO_THREADS_PER_ROW");
  __syncthreads();
  if (threadIdx.x == 0) {
    signal_ready(&a.row_tile_ready[s.row_tiles[m] + it.a]);
    signal_ready(&a.mlp_ready[m]);
  }
}

template <class T>
__device__ void input_grad_item(const expert_args<T>& a, const schedule_arrays<const int>& s, const work_item& it,
                                unsigned char* smem) {
  const int m = it.mlp, hidden = a.w.shape.hidden, n_m = a.w.shape.intermediate(m);
  const int first = s.offsets[m], rows = s.offsets[m + 1] - first;
  const int r0 = it.a * tile_m, h0 = it.b * tile_n;
  wait_ready(&a.row_tile_ready[s.row_tiles[m] + it.a], ceil_div(n_m, tile_n));
  // [dg | du] (K = 2·N_m) times [G; U] (runs k < N_m from G, the rest from U; contiguous along H).
  operand<T> grad[1] = {weight_rows<T>(a.region(a.act_grad, m, first, 2), rows, 2 * n_m)};
  grad[0].coherent = true;
  operand<T> gu[1];
  gu[0].runs.base = a.w.gate[m];
  gu[0].runs.base2 = a.w.up[m];
  gu[0].runs.split = n_m;
  gu[0].runs.ld = hidden;
  gu[0].runs.count = 2 * n_m;
  gu[0].extent = hidden;
  gu[0].k_contiguous = false;
  tile_products<T, 1, 1, 1>(smem, grad, r0, gu, h0, {0}, {0}, 0, 2 * n_m);
  const float* c = result_tile(smem, 0);
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n, r = r0 + i, col = h0 + j;
    if (r >= rows || col >= hidden) continue;
    const float v = c[i * tile_ldc + j];
    if (a.deterministic)
      a.out[static_cast<std::int64_t>(first + r) * hidden + col] = v;
    else
      atomicAdd(&a.out[static_cast<std::int64_t>(a.rows[first + r].token) * hidden + col], v);
  }
}

template <class T>
__device__ void weight_gate_up_item(const expert_args<T>& a, const schedule_arrays<const int>& s, const work_item& it,
                                    unsigned char* smem) {
  const int m = it.mlp, hidden = a.w.shape.hidden, n_m = a.w.shape.intermediate(m);
  const int first = s.offsets[m], rows = s.offsets[m + 1] - first;
  const int n0 = it.a * tile_m, h0 = it.b * tile_n;
  wait_ready(&a.mlp_ready[m], s.gate_up[m + 1] - s.gate_up[m]);
  // dgᵀ and duᵀ: logical rows n, runs are the MLP's rows (= k).
  T* grad = a.region(a.act_grad, m, first, 2);
  operand<T> d[2];
  for (int p = 0; p < 2; ++p) {
    d[p].runs.base = grad + p * n_m;
    d[p].runs.ld = 2 * n_m;
    d[p].runs.count = rows;
    d[p].extent = n_m;
    d[p].k_contiguous = false;
    d[p].coherent = true;
  }
  operand<T> x[1] = {token_rows(a.x, hidden, a.rows + first, rows)};
  x[0].k_contiguous = false;  // runs are the rows (= k), contiguous along H
  tile_products<T, 2, 1, 2>(smem, d, n0, x, h0, {0, 1}, {0, 0}, 0, rows);
  const float* cg = result_tile(smem, 0);
  const float* cu = result_tile(smem, 1);
  float* gate = a.grads.gate[m];
  float* up = a.grads.up[m];
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n, n = n0 + i, col = h0 + j;
    if (n >= n_m || col >= hidden) continue;
    const std::int64_t at = static_cast<std::int64_t>(n) * hidden + col;
    gate[at] += cg[i * tile_ldc + j];
    up[at] += cu[i * tile_ldc + j];
  }
}

template <class T>
__device__ void weight_down_item(const expert_args<T>& a, const schedule_arrays<const int>& s, const work_item& it,
                                 unsigned char* smem) {
  const int m = it.mlp, hidden = a.w.shape.hidden, n_m = a.w.shape.intermediate(m);
  const int first = s.offsets[m], rows = s.offsets[m + 1] - first;
  const int h0 = it.a * tile_m, n0 = it.b * tile_n;
  wait_ready(&a.mlp_ready[m], s.gate_up[m + 1] - s.gate_up[m]);
  // (w·dy)ᵀ: logical rows h, runs are the MLP's rows, each scaled by its routing weight.
  operand<T> dy[1] = {token_rows(a.dy, hidden, a.rows + first, rows)};
  dy[0].k_contiguous = false;
  dy[0].runs.scaled = true;
  operand<T> h[1] = {weight_rows<T>(a.region(a.act, m, first, 1), rows, n_m)};
  h[0].k_contiguous = false;
  h[0].coherent = true;
  tile_products<T, 1, 1, 1>(smem, dy, h0, h, n0, {0}, {0}, 0, rows);
  const float* c = result_tile(smem, 0);
  float* down = a.grads.down[m];
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n, col = h0 + i, n = n0 + j;
    if (col >= hidden || n >= n_m) continue;
    down[static_cast<std::int64_t>(col) * n_m + n] += c[i * tile_ldc + j];
  }
}

/// The unified backward of every routed expert and adjugate of the plan.
template <class T>
__global__ void __launch_bounds__(tile_threads) backward_experts_kernel(expert_args<T> a) {
  unsigned char* smem = dynamic_shared<unsigned char>();
  __shared__ work_item item;
  const schedule_arrays<const int> s = a.plan_schedule();
  for (;;) {
    const work_item it = next_item(a.ticket, &item, [&](int q) { return backward_item(q, s, a.w.shape); });
    switch (it.kind) {
      case item_kind::gate_up_grad:
        gate_up_grad_item(a, s, it, smem);
        break;
      case item_kind::input_grad:
        input_grad_item(a, s, it, smem);
        break;
      case item_kind::weight_gate_up:
        weight_gate_up_item(a, s, it, smem);
        break;
      case item_kind::weight_down:
        weight_down_item(a, s, it, smem);
        break;
      default:
        return;
    }
  }
}

/// What pick_grad_kernel reads and writes.
struct pick_grad_args {
  device_plan plan;
  const float* dw_partial = nullptr;
  int dw_stride = 0;
  int expert_tiles = 0;    ///< ceil(I / tile_n): partials per routed row
  int adjugate_tiles = 0;  ///< ceil(Ia / tile_n): partials per adjugate row
  float* dw = nullptr;     ///< [T, k]
};

/// dw_s = ⟨dy, E_{e_s}(x)⟩ + λ⟨dy, A_{e_s / group_size}(x)⟩ (docs/math.md, "Backward") from the
/// per-row, per-tile partials, each row's summed in tile order; 0 for a pick without a row in the
/// plan. A thread per (token, slot).
template <class = void>
__global__ void __launch_bounds__(routing_threads) pick_grad_kernel(pick_grad_args a) {
  const device_plan& p = a.plan;
  const std::int64_t pick = static_cast<std::int64_t>(blockIdx.x) * routing_threads + threadIdx.x;
  if (pick >= static_cast<std::int64_t>(p.tokens) * p.top_k) return;
  const std::int64_t tk = pick - pick % p.top_k;
  auto row_sum = [&](int row, int tiles) {
    float sum = 0.0f;
    for (int i = 0; i < tiles; ++i) sum += a.dw_partial[static_cast<std::int64_t>(row) * a.dw_stride + i];
    return sum;
  };
  const int own = p.row_of_pick[pick];
  float dw = own >= 0 ? row_sum(own, a.expert_tiles) : 0.0f;
  const int slot = p.pick_group_slot[pick];
  const int adjugate = slot >= 0 ? p.row_of_group[tk + slot] : -1;
  if (own >= 0 && adjugate >= 0) dw += p.scale * row_sum(adjugate, a.adjugate_tiles);
  a.dw[pick] = dw;
}

/// dl_{e_s} = w_s (dw_s − Σ_r w_r dw_r), dl_e = 0 elsewhere (docs/math.md, "Backward"): the
/// gradient of the router logits. A warp per token.
template <class = void>
__global__ void __launch_bounds__(routing_threads) logit_grad_kernel(device_plan p, const float* dw, float* dl) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int t = static_cast<int>(blockIdx.x) * (routing_threads / 32) + static_cast<int>(threadIdx.x) / 32;
  if (t >= p.tokens) return;
  const int k = p.top_k;
  const std::int64_t tk = static_cast<std::int64_t>(t) * k;
  float mine = 0.0f, w = 0.0f;
  int id = -1;
  if (lane < k) {
    id = p.topk_ids[tk + lane];
    w = p.topk_weights[tk + lane];
    mine = dw[tk + lane];
  }
  float mean = 0.0f;
  for (int s = 0; s < k; ++s) mean += __shfl_sync(0xffffffffu, w * mine, s);
  float* out = dl + static_cast<std::int64_t>(t) * p.experts;
  for (int e = lane; e < p.experts; e += 32) out[e] = 0.0f;
  __syncwarp();
  if (lane < k && id >= 0) out[id] = w * (mine - mean);
}

/// Router input gradient: dx[t, h] += Σ_e dl[t, e] W_r[e, h]. Tiles own their outputs.
template <class T>
__global__ void __launch_bounds__(tile_threads)
    router_input_grad_kernel(device_weights<T> w, const float* dl, int tokens, float* dx) {
  unsigned char* smem = dynamic_shared<unsigned char>();
  const int hidden = w.shape.hidden, experts = w.shape.experts;
  const int t0 = static_cast<int>(blockIdx.x) * tile_m, h0 = static_cast<int>(blockIdx.y) * tile_n;
  operand<float> a[1];
  a[0].runs.base = dl;
  a[0].runs.ld = experts;
  a[0].runs.count = tokens;
  a[0].extent = experts;
  operand<T> b[1];
  b[0].runs.base = w.router;
  b[0].runs.ld = hidden;
  b[0].runs.count = experts;
  b[0].extent = hidden;
  b[0].k_contiguous = false;
  tile_products<T, 1, 1, 1>(smem, a, t0, b, h0, {0}, {0}, 0, experts);
  const float* c = result_tile(smem, 0);
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n, t = t0 + i, col = h0 + j;
    if (t < tokens && col < hidden) dx[static_cast<std::int64_t>(t) * hidden + col] += c[i * tile_ldc + j];
  }
}

/// Router weight gradient: ∂W_r[e, h] += Σ_t dl[t, e] x[t, h]. Tiles own their outputs.
template <class T>
__global__ void __launch_bounds__(tile_threads)
    router_weight_grad_kernel(layer_dims shape, const float* dl, const T* x, int tokens, float* grad_router) {
  unsigned char* smem = dynamic_shared<unsigned char>();
  const int hidden = shape.hidden, experts = shape.experts;
  const int e0 = static_cast<int>(blockIdx.x) * tile_m, h0 = static_cast<int>(blockIdx.y) * tile_n;
  operand<float> a[1];
  a[0].runs.base = dl;
  a[0].runs.ld = experts;
  a[0].runs.count = tokens;
  a[0].extent = experts;
  a[0].k_contiguous = false;
  operand<T> b[1];
  b[0].runs.base = x;
  b[0].runs.ld = hidden;
  b[0].runs.count = tokens;
  b[0].extent = hidden;
  b[0].k_contiguous = false;
  tile_products<T, 1, 1, 1>(smem, a, e0, b, h0, {0}, {0}, 0, tokens);
  const float* c = result_tile(smem, 0);
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n, e = e0 + i, col = h0 + j;
    if (e < experts && col < hidden) grad_router[static_cast<std::int64_t>(e) * hidden + col] += c[i * tile_ldc + j];
  }
}

}  // namespace detail
}  // namespace cuda
GROVE_END_NAMESPACE
