// grove CUDA backend: routing on the device (docs/math.md, steps 1–5; docs/cuda.md, "Plan on
// the device"). Four launches, no host synchronisation:
//   1. router_logits_kernel  l = W_r x (fp32 accumulation; split over H for small batches)
//   2. select_kernel         top-k, renormalised weights, distinct groups; per 32-token chunk a
//                            bitmask of which (token, slot) positions went to which MLP
//   3. scan_kernel           per-MLP offsets (prefix over chunks, then over MLPs) and the
//                            prefix arrays of the persistent schedule
//   4. scatter_kernel        every row to offsets[m] + earlier chunks + rank in its chunk's mask
// (The non-generic kernels are templates only so that a header can define them in many TUs.)
// The counting sort is stable by construction (ranks come from bitmasks, not atomics), so each
// MLP lists its tokens in ascending order, exactly as grove::route does on the CPU.
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

/// Everything the routing kernels read and write (device pointers into a device_router's plan
/// storage and scratch, and its runner's error flag).
struct routing_args {
  layer_dims shape;
  int tokens = 0;
  int top_k = 0;
  int max_groups = 0;
  float scale = 0;
  adjugate_mode adjugates = adjugate_mode::once_per_token;
  int splits = 1;  ///< router split-K factor; > 1: partial logits [splits][T][E]
  const float* partials = nullptr;
  const float* bias = nullptr;
  float* logits = nullptr;
  std::int32_t* topk_ids = nullptr;
  float* topk_weights = nullptr;
  std::int32_t* token_groups = nullptr;
  float* group_weights = nullptr;
  std::int32_t* groups_per_token = nullptr;
  std::int32_t* pick_group_slot = nullptr;
  std::uint32_t* chunk_masks = nullptr;  ///< [chunks][E+G][k]
  int* chunk_counts = nullptr;           ///< [E+G][chunks]
  int* chunk_base = nullptr;             ///< [E+G][chunks]
  int* schedule = nullptr;               ///< schedule_arrays base, 5 × (E+G+1)
  dispatch_row* rows = nullptr;
  std::int32_t* row_of_pick = nullptr;   ///< [T, k]
  std::int32_t* row_of_group = nullptr;  ///< [T, k]
  int* error_flag = nullptr;

  [[nodiscard]] __host__ __device__ int chunks() const { return ceil_div(tokens, chunk_tokens); }
  [[nodiscard]] __host__ __device__ int buckets() const { return shape.mlps(); }
};

/// Step 1: logits (or split-K partial logits) of a tile of tokens × a tile of experts.
template <class T>
__global__ void __launch_bounds__(tile_threads)
    router_logits_kernel(device_weights<T> w, const T* x, int tokens, int k_per_split, float* out) {
  unsigned char* smem = dynamic_shared<unsigned char>();
  const int hidden = w.shape.hidden, experts = w.shape.experts;
  const int r0 = static_cast<int>(blockIdx.x) * tile_m, n0 = static_cast<int>(blockIdx.y) * tile_n;
  const int k_begin = static_cast<int>(blockIdx.z) * k_per_split;
  const int k_end = k_begin + k_per_split < hidden ? k_begin + k_per_split : hidden;
  operand<T> a[1], b[1];
  a[0].runs.base = x;
  a[0].runs.ld = hidden;
  a[0].runs.count = tokens;
  a[0].extent = hidden;
  b[0].runs.base = w.router;
  b[0].runs.ld = hidden;
  b[0].runs.count = experts;
  b[0].extent = hidden;
  tile_products<T, 1, 1, 1>(smem, a, r0, b, n0, {0}, {0}, k_begin, k_end);
  const float* c = result_tile(smem, 0);
  float* dst = out + static_cast<std::int64_t>(blockIdx.z) * tokens * experts;
  for (int idx = static_cast<int>(threadIdx.x); idx < tile_m * tile_n; idx += tile_threads) {
    const int i = idx / tile_n, j = idx % tile_n;
    const int t = r0 + i, e = n0 + j;
    if (t < tokens && e < experts) dst[static_cast<std::int64_t>(t) * experts + e] = c[i * tile_ldc + j];
  }
}

/// The selection order of docs/math.md, step 2: higher score first, ties to the lower index.
__host__ __device__ inline bool ranks_before(float score_a, int index_a, float score_b, int index_b) {
  return score_a > score_b || (score_a == score_b && index_a < index_b);
}

/// Step 2. One block per chunk of 32 tokens, one warp per token at a time.
template <class = void>
__global__ void __launch_bounds__(routing_threads) select_kernel(routing_args a) {
  std::uint32_t* masks = dynamic_shared<std::uint32_t>();  // [E+G][k]
  const int buckets = a.buckets(), k = a.top_k, experts = a.shape.experts;
  const int chunk = static_cast<int>(blockIdx.x);
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  constexpr unsigned all = 0xffffffffu;
  for (int i = static_cast<int>(threadIdx.x); i < buckets * k; i += routing_threads) masks[i] = 0u;

  // Compare on the logits unless a bias is present and non-zero (sigmoid saturates in fp32).
  bool use_bias = false;
  if (a.bias != nullptr)
    for (int e = lane; e < experts; e += 32) use_bias |= a.bias[e] != 0.0f;
  use_bias = __any_sync(all, use_bias);
  __syncthreads();

  bool saw_nan = false;
  for (int tl = warp; tl < chunk_tokens; tl += routing_threads / 32) {
    const int t = chunk * chunk_tokens + tl;
    if (t >= a.tokens) break;
    float* logits = a.logits + static_cast<std::int64_t>(t) * experts;
    if (a.splits > 1) {
      // Deterministic split-K reduction, in split order.
      for (int e = lane; e < experts; e += 32) {
        float sum = 0.0f;
        for (int s = 0; s < a.splits; ++s)
          sum += a.partials[(static_cast<std::int64_t>(s) * a.tokens + t) * experts + e];
        logits[e] = sum;
      }
      __syncwarp();
    }

    // Top-k by repeated warp arg-max over the experts ranked after the previous pick.
    float prev_score = INFINITY;
    int prev_index = -1, my_id = -1;
    for (int s = 0; s < k; ++s) {
      float best_score = -INFINITY;
      int best_index = 0x7fffffff;
      for (int e = lane; e < experts; e += 32) {
        const float l = logits[e];
        float score = use_bias ? sigmoid(l) + a.bias[e] : l;
        if (isnan(score)) {
          saw_nan = true;
          score = -INFINITY;
        }
        const bool eligible = ranks_before(prev_score, prev_index, score, e);
        if (eligible && ranks_before(score, e, best_score, best_index)) {
          best_score = score;
          best_index = e;
        }
      }
      GROVE_UNROLL
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_score = __shfl_xor_sync(all, best_score, offset);
        const int other_index = __shfl_xor_sync(all, best_index, offset);
        if (ranks_before(other_score, other_index, best_score, best_index)) {
          best_score = other_score;
          best_index = other_index;
        }
      }
      prev_score = best_score;
      prev_index = best_index;
      if (lane == s) my_id = best_index;
    }

    // Weights: softmax of the picked logits (step 3), summed in slot order as on the CPU.
    const float my_logit = lane < k ? logits[my_id] : -INFINITY;
    float top = my_logit;
    GROVE_UNROLL
    for (int offset = 16; offset > 0; offset >>= 1) top = fmaxf(top, __shfl_xor_sync(all, top, offset));
    const float ex = lane < k ? expf(my_logit - top) : 0.0f;
    float sum = 0.0f;
    for (int s = 0; s < k; ++s) sum += __shfl_sync(all, ex, s);
    const float weight = ex / sum;

    // Distinct groups in order of first pick and c_j (step 5); lane g holds group slot g.
    const int my_group = lane < k ? my_id / static_cast<int>(a.shape.group_size()) : -1;  // 32-bit division
    int held_group = -1, count = 0, my_group_slot = -1;
    float held_weight = 0.0f;
    for (int s = 0; s < k; ++s) {
      const int group = __shfl_sync(all, my_group, s);
      const float w = __shfl_sync(all, weight, s);
      const unsigned match = __ballot_sync(all, lane < count && held_group == group);
      const int at = match ? __ffs(static_cast<int>(match)) - 1 : count;
      if (!match) {
        if (lane == at) held_group = group;
        ++count;
      }
      if (lane == at) held_weight += w;
      if (lane == s) my_group_slot = at;
    }

    const std::int64_t tk = static_cast<std::int64_t>(t) * k;
    if (lane < k) {
      a.topk_ids[tk + lane] = my_id;
      a.topk_weights[tk + lane] = weight;
      a.pick_group_slot[tk + lane] = a.adjugates == adjugate_mode::once_per_token  ? my_group_slot
                                     : a.adjugates == adjugate_mode::once_per_pick ? lane
                                                                                   : -1;
    }
    if (lane < a.max_groups) {
      const std::int64_t tg = static_cast<std::int64_t>(t) * a.max_groups + lane;
      a.token_groups[tg] = lane < count ? held_group : -1;
      a.group_weights[tg] = lane < count ? held_weight : 0.0f;
    }
    if (lane == 0) a.groups_per_token[t] = count;

    // Mark positions tl·k + slot in the masks of the buckets the token's rows go to.
    auto mark = [&](int bucket, int slot) {
      const int position = tl * k + slot;
      atomicOr(&masks[bucket * k + position / 32], 1u << (position % 32));
    };
    if (lane < k) mark(my_id, lane);
    if (a.adjugates == adjugate_mode::once_per_token && lane < count) mark(experts + held_group, lane);
    if (a.adjugates == adjugate_mode::once_per_pick && lane < k) mark(experts + my_group, lane);
  }
  if (__any_sync(all, saw_nan) && lane == 0) atomicExch(a.error_flag, 1);
  __syncthreads();

  const std::int64_t cell = static_cast<std::int64_t>(chunk) * buckets * k;
  for (int i = static_cast<int>(threadIdx.x); i < buckets * k; i += routing_threads) a.chunk_masks[cell + i] = masks[i];
  const int chunks = a.chunks();
  for (int m = static_cast<int>(threadIdx.x); m < buckets; m += routing_threads) {
    int n = 0;
    for (int w = 0; w < k; ++w) n += __popc(masks[m * k + w]);
    a.chunk_counts[static_cast<std::int64_t>(m) * chunks + chunk] = n;
  }
}

__device__ inline int warp_inclusive_scan(int v) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  GROVE_UNROLL
  for (int d = 1; d < 32; d <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

__device__ inline schedule_terms warp_inclusive_scan(schedule_terms v) {
  v.rows = warp_inclusive_scan(v.rows);
  v.row_tiles = warp_inclusive_scan(v.row_tiles);
  v.gate_up = warp_inclusive_scan(v.gate_up);
  v.down = warp_inclusive_scan(v.down);
  v.weights = warp_inclusive_scan(v.weights);
  return v;
}

inline constexpr int scan_threads = 1024;

/// Step 3, one block of 1024 threads: per-MLP chunk prefixes (a warp per MLP), then the five
/// schedule prefixes over MLPs (a block scan in segments of 1024 MLPs).
template <class = void>
__global__ void __launch_bounds__(scan_threads) scan_kernel(routing_args a) {
  int* totals = dynamic_shared<int>();  // [E+G]
  __shared__ schedule_terms warp_sums[scan_threads / 32];
  __shared__ schedule_terms carry;
  const int buckets = a.buckets(), chunks = a.chunks();
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  for (int m = warp; m < buckets; m += scan_threads / 32) {
    int running = 0;
    for (int c0 = 0; c0 < chunks; c0 += 32) {
      const int c = c0 + lane;
      const std::int64_t at = static_cast<std::int64_t>(m) * chunks + c;
      const int v = c < chunks ? a.chunk_counts[at] : 0;
      const int inclusive = warp_inclusive_scan(v);
      if (c < chunks) a.chunk_base[at] = running + inclusive - v;
      running += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) totals[m] = running;
  }
  if (threadIdx.x == 0) carry = schedule_terms{};
  __syncthreads();

  const schedule_arrays<int> s = schedule_arrays<int>::at(a.schedule, buckets);
  for (int base = 0; base < buckets; base += scan_threads) {
    const int m = base + static_cast<int>(threadIdx.x);
    const schedule_terms mine = m < buckets ? schedule_terms::of(m, totals[m], a.shape) : schedule_terms{};
    const schedule_terms inclusive = warp_inclusive_scan(mine);
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      const schedule_terms w = warp_sums[lane];
      warp_sums[lane] = warp_inclusive_scan(w) - w;
    }
    __syncthreads();
    const schedule_terms exclusive = carry + warp_sums[warp] + inclusive - mine;
    if (m < buckets) exclusive.store(s, m);
    __syncthreads();
    if (threadIdx.x == scan_threads - 1) carry = exclusive + mine;
    __syncthreads();
  }
  if (threadIdx.x == 0) carry.store(s, buckets);
}

/// Step 4. A warp per chunk, a lane per token: each row to its stable position.
template <class = void>
__global__ void __launch_bounds__(routing_threads) scatter_kernel(routing_args a) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int chunk = static_cast<int>(blockIdx.x) * (routing_threads / 32) + static_cast<int>(threadIdx.x) / 32;
  const int t = chunk * chunk_tokens + lane;
  if (t >= a.tokens) return;
  const int k = a.top_k, experts = a.shape.experts, buckets = a.buckets(), chunks = a.chunks();
  const int* offsets = a.schedule;  // schedule_arrays::offsets comes first
  const std::int64_t tk = static_cast<std::int64_t>(t) * k;
  auto place = [&](int bucket, int slot, float weight) {
    const int pos =
        dispatch_position(offsets, a.chunk_base, a.chunk_masks, buckets, chunks, k, chunk, bucket, lane * k + slot);
    a.rows[pos] = dispatch_row{t, slot, weight};
    return pos;
  };
  for (int s = 0; s < k; ++s) a.row_of_pick[tk + s] = place(a.topk_ids[tk + s], s, a.topk_weights[tk + s]);
  const int group_size = a.shape.group_size();
  for (int s = 0; s < k; ++s) {
    int pos = -1;
    if (a.adjugates == adjugate_mode::once_per_token) {
      const std::int64_t tg = static_cast<std::int64_t>(t) * a.max_groups + s;
      if (s < a.groups_per_token[t]) pos = place(experts + a.token_groups[tg], s, a.scale * a.group_weights[tg]);
    } else if (a.adjugates == adjugate_mode::once_per_pick) {
      pos = place(experts + a.topk_ids[tk + s] / group_size, s, a.scale * a.topk_weights[tk + s]);
    }
    a.row_of_group[tk + s] = pos;
  }
}

}  // namespace detail
}  // namespace cuda
GROVE_END_NAMESPACE
